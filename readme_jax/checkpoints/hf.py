"""Hugging Face Llama checkpoints (config.json + safetensors) in and out, without torch.

HF stores linear weights as ``[out, in]`` per layer under names like
``model.layers.3.self_attn.q_proj.weight``; we hold ``[in, out]`` stacked over layers
(see ``readme_jax/model/decoder.py``), so loading transposes and stacks, saving undoes it.
bf16 files load through safetensors' numpy API (``ml_dtypes.bfloat16``).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from readme_jax.checkpoints.finite import check_finite
from readme_jax.config import ModelConfig
from readme_jax.errors import CheckpointError

# our per-layer name -> (HF name inside model.layers.{i}., transpose?)
LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "ffn_norm": ("post_attention_layernorm.weight", False),
    "wg": ("mlp.gate_proj.weight", True),
    "wu": ("mlp.up_proj.weight", True),
    "wd": ("mlp.down_proj.weight", True),
}


def np_dtype(dtype) -> np.dtype:
    """numpy dtype for "float32" / "bfloat16" / "float16" (bfloat16 via ml_dtypes)."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(dtype)
    except TypeError:
        raise CheckpointError(f"unknown dtype {dtype!r}; expected float32, bfloat16 or float16") from None


def _dtype_name(dtype) -> str:
    name = np_dtype(dtype).name
    if name not in ("float32", "bfloat16", "float16"):
        raise CheckpointError(f"dtype must be float32, bfloat16 or float16, got {name!r}")
    return name


# ----------------------------------------------------------------------------- config


def _hf_value(raw: dict, key: str, where: Path, default=None):
    if key in raw and raw[key] is not None:
        return raw[key]
    if default is None:
        raise CheckpointError(f"{where}: missing required key {key!r}")
    return default


def config_from_hf(raw: dict, where: Path, dtype="float32") -> ModelConfig:
    """ModelConfig from a parsed HF ``config.json`` (Llama only; unsupported features raise)."""
    archs = raw.get("architectures") or []
    if "LlamaForCausalLM" not in archs and raw.get("model_type") != "llama":
        raise CheckpointError(
            f"{where}: expected a Llama checkpoint (architectures containing 'LlamaForCausalLM' or "
            f"model_type 'llama'), found architectures={archs!r}, model_type={raw.get('model_type')!r}")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act must be 'silu', found {act!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise CheckpointError(f"{where}: {flag}=true is not supported (our Llama has no biases)")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    llama3 = None
    if rope_type == "llama3":
        try:
            llama3 = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                      int(rope["original_max_position_embeddings"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: rope type 'llama3' needs factor, low_freq_factor, high_freq_factor "
                                  f"and original_max_position_embeddings ({e!r})") from None
    elif rope_type != "default":
        raise CheckpointError(f"{where}: rope type {rope_type!r} is not supported, only 'default' and 'llama3'")
    theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
    d = int(_hf_value(raw, "hidden_size", where))
    h = int(_hf_value(raw, "num_attention_heads", where))
    name = _dtype_name(dtype)
    return ModelConfig(
        vocab_size=int(_hf_value(raw, "vocab_size", where)),
        d_model=d,
        n_layers=int(_hf_value(raw, "num_hidden_layers", where)),
        n_heads=h,
        n_kv_heads=int(_hf_value(raw, "num_key_value_heads", where, h)),
        head_dim=int(_hf_value(raw, "head_dim", where, d // h)),
        ffn_dim=int(_hf_value(raw, "intermediate_size", where)),
        rope_theta=float(theta),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_seq_len=int(raw.get("max_position_embeddings", 2048)),
        rope_llama3=llama3,
        dtype=name,
        param_dtype=name,
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """The HF ``config.json`` dict for ``cfg`` (readable by transformers 4.x and 5.x)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": ({"rope_theta": cfg.rope_theta, "rope_type": "default"} if cfg.rope_llama3 is None else
                            {"rope_theta": cfg.rope_theta, "rope_type": "llama3", "factor": cfg.rope_llama3[0],
                             "low_freq_factor": cfg.rope_llama3[1], "high_freq_factor": cfg.rope_llama3[2],
                             "original_max_position_embeddings": cfg.rope_llama3[3]}),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": cfg.param_dtype,
    }


# ----------------------------------------------------------------------------- tensors


def _weight_files(d: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file (single file or sharded index)."""
    single = d / "model.safetensors"
    index = d / "model.safetensors.index.json"
    if single.is_file():
        with safe_open(single, framework="numpy") as f:
            return {k: single for k in f.keys()}
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        out = {}
        for name, fname in wm.items():
            p = d / fname
            if not p.is_file():
                raise CheckpointError(f"{index}: shard {fname!r} (holding {name!r}) not found in {d}")
            out[name] = p
        return out
    raise CheckpointError(f"{d}: no model.safetensors or model.safetensors.index.json found")


def load_hf(path, dtype="float32") -> tuple[ModelConfig, dict]:
    """Read an HF Llama directory into ``(ModelConfig, arrays)`` (numpy arrays in ``dtype``)."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"HF checkpoint directory not found: {d}")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{d}: missing config.json")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    cfg = config_from_hf(raw, cfg_path, dtype)
    dt = np_dtype(dtype)
    try:
        files = _weight_files(d)
        with contextlib.ExitStack() as stack:
            return cfg, _read_arrays(d, cfg, files, dt, stack)
    except SafetensorError as e:  # truncated or garbled file
        raise CheckpointError(f"{d}: a safetensors file cannot be read ({str(e).splitlines()[0]}); "
                              "the checkpoint is incomplete or corrupt") from None


def _read_arrays(d: Path, cfg: ModelConfig, files: dict, dt, stack: contextlib.ExitStack) -> dict:
    handles: dict[Path, object] = {}

    def get(name: str, shape: tuple, transpose: bool) -> np.ndarray:
        if name not in files:
            raise CheckpointError(f"{d}: missing tensor {name!r} (expected shape {shape})")
        p = files[name]
        if p not in handles:
            handles[p] = stack.enter_context(safe_open(p, framework="numpy"))
        a = handles[p].get_tensor(name)
        if tuple(a.shape) != shape:
            raise CheckpointError(f"{p}: tensor {name!r} has shape {tuple(a.shape)}, expected {shape}")
        check_finite(a, name, p)
        with np.errstate(over="ignore"):  # an overflow is reported just below, naming the tensor
            a = (a.T if transpose else a).astype(dt)
        check_finite(a, name, p, f"its values overflow {dt.name} (load it in a wider dtype)")
        return np.ascontiguousarray(a)

    L, D, V, F = cfg.n_layers, cfg.d_model, cfg.vocab_size, cfg.ffn_dim
    Hq, Hk = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    hf_shape = {"attn_norm": (D,), "wq": (Hq, D), "wk": (Hk, D), "wv": (Hk, D), "wo": (D, Hq),
                "ffn_norm": (D,), "wg": (F, D), "wu": (F, D), "wd": (D, F)}
    arrays: dict = {"embed": get("model.embed_tokens.weight", (V, D), False),
                    "final_norm": get("model.norm.weight", (D,), False)}
    if not cfg.tie_embeddings:
        arrays["lm_head"] = get("lm_head.weight", (V, D), True)
    layers = {}
    for ours, (hf, tr) in tqdm(LAYER_NAMES.items(), desc=f"load {d.name}", leave=False):
        layers[ours] = np.stack([get(f"model.layers.{i}.{hf}", hf_shape[ours], tr) for i in range(L)])
    arrays["layers"] = layers
    return arrays


def save_hf(path, cfg: ModelConfig, arrays: dict, tokenizer=None, max_shard_bytes: int | None = None) -> Path:
    """Write ``config.json`` + safetensors (sharded with an index when ``max_shard_bytes`` is set).

    ``tokenizer`` (a :class:`readme_jax.checkpoints.tokenizer.Tokenizer`) is saved beside when given.
    """
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
    dt = np_dtype(cfg.param_dtype)

    def arr(a, transpose=False):
        a = np.asarray(a)
        return np.ascontiguousarray((a.T if transpose else a).astype(dt))

    tensors = {"model.embed_tokens.weight": arr(arrays["embed"]),
               "model.norm.weight": arr(arrays["final_norm"])}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = arr(arrays["lm_head"], True)
    for ours, (hf, tr) in LAYER_NAMES.items():
        stacked = arrays["layers"][ours]
        for i in range(cfg.n_layers):
            tensors[f"model.layers.{i}.{hf}"] = arr(stacked[i], tr)
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(tensors, d / "model.safetensors", metadata=meta)
    else:
        shards, cur, size = [], {}, 0
        for name, a in tensors.items():
            if cur and size + a.nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[name] = a
            size += a.nbytes
        shards.append(cur)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, d / fname, metadata=meta)
            weight_map.update({k: fname for k in shard})
        total = sum(a.nbytes for a in tensors.values())
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer is not None:
        tokenizer.save_hf(d)
    return d

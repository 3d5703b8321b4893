"""GGUF (llama.cpp) Llama checkpoints in: metadata -> ModelConfig, tensors -> our arrays.

GGUF tensors come out of ``GGUFReader`` as numpy rows = output features (``[out, in]``, like HF),
so each matrix is transposed to our ``[in, out]`` and stacked over layers. Quantized tensors are
dequantized with ``gguf.quants.dequantize``.

llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` so that its interleaved
(GPT-J style) RoPE gives the same result as HF's rotate-half RoPE::

    w.reshape(n_head, 2, hd // 2, D).swapaxes(1, 2).reshape(n_head * hd, D)

Our model uses rotate-half RoPE, so :func:`unpermute_qk` inverts that (``n_head`` is the KV head
count for ``attn_k``).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from tqdm import tqdm

from readme_jax.checkpoints.finite import check_finite
from readme_jax.checkpoints.hf import np_dtype
from readme_jax.config import ModelConfig
from readme_jax.errors import CheckpointError

SUPPORTED_TYPES = frozenset({QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
                             QT.Q4_K, QT.Q5_K, QT.Q6_K})  # K-quants: the common Q4_K_M / Q5_K_M / Q6_K files

# our per-layer name -> GGUF name inside blk.{i}.
LAYER_NAMES = {
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "wo": "attn_output.weight",
    "ffn_norm": "ffn_norm.weight",
    "wg": "ffn_gate.weight",
    "wu": "ffn_up.weight",
    "wd": "ffn_down.weight",
}


def open_gguf(path_or_reader) -> tuple[gguf.GGUFReader, str]:
    """``(reader, name for messages)`` for a path or an already open ``GGUFReader``."""
    if isinstance(path_or_reader, gguf.GGUFReader):
        return path_or_reader, str(getattr(path_or_reader, "_readme_path", "<gguf>"))
    p = Path(path_or_reader)
    if not p.is_file():
        raise CheckpointError(f"GGUF file not found: {p}")
    try:
        reader = gguf.GGUFReader(p)
    except Exception as e:  # gguf raises ValueError/struct.error/... on a bad file
        raise CheckpointError(f"{p}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    reader._readme_path = str(p)
    return reader, str(p)


def permute_qk(w_OI: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF rotate-half -> interleaved RoPE); ``[out, in]``."""
    out = w_OI.shape[0]
    return w_OI.reshape(n_head, 2, out // n_head // 2, *w_OI.shape[1:]).swapaxes(1, 2).reshape(w_OI.shape)


def unpermute_qk(w_OI: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`: GGUF q/k rows back to HF rotate-half order."""
    out = w_OI.shape[0]
    return w_OI.reshape(n_head, out // n_head // 2, 2, *w_OI.shape[1:]).swapaxes(1, 2).reshape(w_OI.shape)


def gguf_field(reader, key: str, where: str, default=...):
    """A GGUF metadata value, or ``default``; CheckpointError naming the key when missing and no default."""
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise CheckpointError(f"{where}: missing metadata key {key!r}")
        return default
    return f.contents()


def _f32(v) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(v)))


def config_from_gguf(reader, where: str, dtype="float32") -> ModelConfig:
    """ModelConfig from ``llama.*`` metadata (architecture must be llama, dense, unscaled RoPE)."""
    arch = gguf_field(reader, "general.architecture", where)
    if arch != "llama":
        raise CheckpointError(f"{where}: general.architecture must be 'llama', found {arch!r}")
    if int(gguf_field(reader, "llama.expert_count", where, 0)) > 0:
        raise CheckpointError(f"{where}: llama.expert_count > 0 (a MoE GGUF); only dense Llama is supported")
    scaling = gguf_field(reader, "llama.rope.scaling.type", where, "none")
    if scaling not in ("none", None):
        raise CheckpointError(f"{where}: llama.rope.scaling.type {scaling!r} is not supported, only 'none'")
    if "rope_freqs.weight" in _tensors(reader):  # Llama 3.1+ GGUFs carry their RoPE scaling as this tensor
        raise CheckpointError(f"{where}: holds rope_freqs.weight (Llama 3.1+ RoPE scaling), which the GGUF "
                              "loader does not apply yet; load the model's Hugging Face directory instead "
                              "(rope_type llama3 is supported there)")
    d = int(gguf_field(reader, "llama.embedding_length", where))
    h = int(gguf_field(reader, "llama.attention.head_count", where))
    hd = int(gguf_field(reader, "llama.attention.key_length", where, d // h))
    rope_dim = int(gguf_field(reader, "llama.rope.dimension_count", where, hd))
    if rope_dim != hd:
        raise CheckpointError(f"{where}: llama.rope.dimension_count {rope_dim} != head dim {hd} "
                              "(partial RoPE is not supported)")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        vocab = len(tokens.data)
    elif "llama.vocab_size" in reader.fields:
        vocab = int(gguf_field(reader, "llama.vocab_size", where))
    else:
        t = _tensors(reader).get("token_embd.weight")
        if t is None:
            raise CheckpointError(f"{where}: cannot tell the vocabulary size (no tokenizer.ggml.tokens, "
                                  "llama.vocab_size or token_embd.weight)")
        vocab = int(t.shape[-1])
    name = np_dtype(dtype).name
    return ModelConfig(
        vocab_size=vocab,
        d_model=d,
        n_layers=int(gguf_field(reader, "llama.block_count", where)),
        n_heads=h,
        n_kv_heads=int(gguf_field(reader, "llama.attention.head_count_kv", where, h)),
        head_dim=hd,
        ffn_dim=int(gguf_field(reader, "llama.feed_forward_length", where)),
        rope_theta=_f32(gguf_field(reader, "llama.rope.freq_base", where, 10000.0)),
        norm_eps=_f32(gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", where)),
        tie_embeddings="output.weight" not in _tensors(reader),
        max_seq_len=int(gguf_field(reader, "llama.context_length", where, 2048)),
        dtype=name,
        param_dtype=name,
    )


def _tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def read_tensor(t, shape_OI: tuple, where: str) -> np.ndarray:
    """One GGUF tensor as float32 numpy ``[out, in]`` (checked against ``shape_OI``)."""
    found = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost first
    if found != tuple(shape_OI):
        raise CheckpointError(f"{where}: tensor {t.name!r} has shape {found}, expected {tuple(shape_OI)}")
    qt = QT(int(t.tensor_type))
    if qt not in SUPPORTED_TYPES:
        raise CheckpointError(f"{where}: tensor {t.name!r} has unsupported type {qt.name}; supported: "
                              f"{', '.join(sorted(q.name for q in SUPPORTED_TYPES))}")
    a = np.asarray(t.data) if qt == QT.F32 else gguf.quants.dequantize(np.asarray(t.data), qt)
    a = np.asarray(a, dtype=np.float32).reshape(shape_OI)
    check_finite(a, t.name, where)
    return a


def load_gguf(path, dtype="float32") -> tuple[ModelConfig, dict]:
    """Read a llama GGUF into ``(ModelConfig, arrays)`` (numpy arrays in ``dtype``)."""
    reader, where = open_gguf(path)
    cfg = config_from_gguf(reader, where, dtype)
    tensors = _tensors(reader)
    dt = np_dtype(dtype)
    L, D, V, F = cfg.n_layers, cfg.d_model, cfg.vocab_size, cfg.ffn_dim
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    shape_OI = {"attn_norm": (D,), "wq": (H * hd, D), "wk": (K * hd, D), "wv": (K * hd, D), "wo": (D, H * hd),
                "ffn_norm": (D,), "wg": (F, D), "wu": (F, D), "wd": (D, F)}
    names = ["token_embd.weight", "output_norm.weight"] + ([] if cfg.tie_embeddings else ["output.weight"])
    names += [f"blk.{i}.{g}" for i in range(L) for g in LAYER_NAMES.values()]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    bar = tqdm(total=len(names), desc=f"dequantize {Path(where).name}", unit="tensor", leave=False)

    def get(name, shape):
        with np.errstate(over="ignore"):  # an overflow is reported just below, naming the tensor
            a = read_tensor(tensors[name], shape, where).astype(dt)
        check_finite(a, name, where, f"its values overflow {dt.name} (load it in a wider dtype)")
        bar.update(1)
        return a

    arrays: dict = {"embed": get("token_embd.weight", (V, D)), "final_norm": get("output_norm.weight", (D,))}
    if not cfg.tie_embeddings:
        arrays["lm_head"] = np.ascontiguousarray(get("output.weight", (V, D)).T)
    per_layer: dict[str, list] = {k: [] for k in LAYER_NAMES}
    for i in range(L):
        for ours, g in LAYER_NAMES.items():
            a = get(f"blk.{i}.{g}", shape_OI[ours])
            if ours == "wq":
                a = unpermute_qk(a, H)
            elif ours == "wk":
                a = unpermute_qk(a, K)
            per_layer[ours].append(a if a.ndim == 1 else a.T)
    bar.close()
    arrays["layers"] = {k: np.ascontiguousarray(np.stack(v)) for k, v in per_layer.items()}
    return cfg, arrays

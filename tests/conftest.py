"""Shared fixtures: random Llama weights in our layout, and writers for HF dirs and GGUF files."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from readme_jax.config import ModelConfig, tiny_model_config
from readme_jax.model.moe import MoEBackbone
from readme_jax.model.readme_model import ReadMEModel
from readme_jax.model.router import RouterConfig, make_router


def random_llama_arrays(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random float32 numpy weights in our layout, scaled so logits are O(1)."""
    rng = np.random.default_rng(seed)
    L, D, V, F = cfg.n_layers, cfg.d_model, cfg.vocab_size, cfg.ffn_dim
    Hq, Hk = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim

    def mat(*shape):
        return (rng.standard_normal(shape) * shape[-2] ** -0.5).astype(np.float32)

    def norm(*shape):
        return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)

    out = {"embed": rng.standard_normal((V, D)).astype(np.float32), "final_norm": norm(D),
           "layers": {"attn_norm": norm(L, D), "wq": mat(L, D, Hq), "wk": mat(L, D, Hk), "wv": mat(L, D, Hk),
                      "wo": mat(L, Hq, D), "ffn_norm": norm(L, D), "wg": mat(L, D, F), "wu": mat(L, D, F),
                      "wd": mat(L, F, D)}}
    if not cfg.tie_embeddings:
        out["lm_head"] = mat(D, V)
    return out


def tiny_readme(n_experts: int, backbone_seed: int, router_seed: int, expert_dim: int = 16,
                cfg: ModelConfig | None = None):
    """A tiny random Read-ME model (fixed-layout experts, router embedding from the backbone's)."""
    cfg = cfg or tiny_model_config()
    bb = MoEBackbone(cfg, rngs=nnx.Rngs(backbone_seed), n_experts=n_experts, expert_dim=expert_dim)
    router = make_router(RouterConfig(width=16, n_heads=2, ffn_dim=16, seed=router_seed), n_experts, cfg.vocab_size,
                         cfg.max_seq_len, backbone_embed_VD=bb.embed[...])
    return ReadMEModel.from_modules(router, bb)


@pytest.fixture
def make_hf_dir(tmp_path):
    """Factory: ``make_hf_dir(cfg=None, seed=0, **save_kw) -> (dir, cfg, arrays)`` via ``save_hf``."""
    from readme_jax.checkpoints.hf import save_hf

    count = [0]

    def make(cfg: ModelConfig | None = None, seed: int = 0, **save_kw):
        cfg = cfg or tiny_model_config()
        arrays = random_llama_arrays(cfg, seed)
        count[0] += 1
        d = save_hf(tmp_path / f"hf{count[0]}", cfg, arrays, **save_kw)
        return d, cfg, arrays

    return make


def write_gguf(path, *, metadata: dict | None = None, tensors: dict | None = None, arch: str = "llama",
               tokenizer: dict | None = None):
    """Write a GGUF file. ``tensors``: name -> (float32 array [out, in], GGMLQuantizationType);
    ``tokenizer``: {"tokens", "types", "merges", "pre", "bos", "eos", "chat_template"} (optional; also
    "model" (default gpt2; pre None to omit it), "scores", "unk", "pad", "add_bos", "add_space_prefix");
    ``metadata``: extra key -> value (int -> uint32, float -> float32, str, bool)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    if tokenizer is not None:
        w.add_tokenizer_model(tokenizer.get("model", "gpt2"))
        if tokenizer.get("pre", "smollm") is not None:
            w.add_tokenizer_pre(tokenizer.get("pre", "smollm"))
        w.add_token_list(tokenizer["tokens"])
        w.add_token_types(tokenizer["types"])
        if "merges" in tokenizer:
            w.add_token_merges(tokenizer["merges"])
        if "scores" in tokenizer:
            w.add_token_scores(tokenizer["scores"])
        w.add_bos_token_id(tokenizer.get("bos", 1))
        w.add_eos_token_id(tokenizer.get("eos", 2))
        for key in ("unk", "pad"):
            if key in tokenizer:
                getattr(w, f"add_{key}_token_id")(tokenizer[key])
        for key in ("add_bos", "add_space_prefix"):
            if key in tokenizer:
                w.add_bool(f"tokenizer.ggml.{key}_token" if key == "add_bos" else f"tokenizer.ggml.{key}",
                           tokenizer[key])
        if tokenizer.get("chat_template"):
            w.add_chat_template(tokenizer["chat_template"])
    for name, (arr, qtype) in (tensors or {}).items():
        if np.asarray(arr).dtype == np.uint8:  # raw quantized blocks [rows, bytes per row], as given
            w.add_tensor(name, np.ascontiguousarray(arr), raw_dtype=qtype)
            continue
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def gguf_writer():
    """The :func:`write_gguf` helper, as a fixture."""
    return write_gguf


@pytest.fixture(scope="session")
def llama_arrays():
    """The :func:`random_llama_arrays` helper, as a fixture."""
    return random_llama_arrays


@pytest.fixture(scope="session")
def byte_tokenizer():
    """A 259-token byte-level BPE: <|endoftext|>, <|im_start|>, <|im_end|>, then the 256 byte symbols."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from readme_jax.checkpoints.tokenizer import Tokenizer, bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    symbols = sorted(bytes_to_unicode().values())
    tk = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + symbols)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    return Tokenizer(tk, bos_id=1, eos_id=2, chat_template="{{ messages[0]['content'] }}")


# ----------------------------------------------------------------------------- the tiny end-to-end run

TINY_STAGES = ["chat_data", "dense_eval", "refactor", "refactor_eval", "train", "baseline", "final_eval", "chat_eval",
               "serve_bench", "report"]


def tiny_run_config(out, cache_dir, *extra):
    """The RunConfig of ``readme-jax run --config tiny_test output_dir=OUT data.cache_dir=... EXTRA``."""
    from readme_jax import cli

    args = cli.build_parser().parse_args(["run", "--config", "tiny_test", "--no-progress", f"output_dir={out}",
                                          f"data.cache_dir={cache_dir}", *extra])
    return cli.load_run_config(args)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("domains"))


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, cache_dir):
    """Every stage of the tiny run, killed once in ``baseline`` and rerun: ``(out, first log, second log)``.
    Shared by the workflow tests (read it, or copy it before changing anything)."""
    from readme_jax.workflow import run as run_mod

    out = tmp_path_factory.mktemp("run")
    cfg = tiny_run_config(out, cache_dir, "stages=[" + ",".join(TINY_STAGES) + "]")
    log = []
    real_baseline = run_mod.STAGE_FNS["baseline"]
    calls = {"n": 0}

    def crashing_baseline(ws):  # the first attempt dies in the middle of the run
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt("simulated kill")
        return real_baseline(ws)

    run_mod.STAGE_FNS["baseline"] = crashing_baseline
    try:
        with pytest.raises(KeyboardInterrupt):
            run_mod.run(cfg, progress=False, log=log.append)
        first = list(log)
        log.clear()
        run_mod.run(cfg, progress=False, log=log.append)
    finally:
        run_mod.STAGE_FNS["baseline"] = real_baseline
    return out, first, list(log)

"""`readme-jax run --config tiny_test model=PATH` end to end on the model formats users bring, each made
here offline: a Llama-3.1-style HF directory (llama3 RoPE scaling, GQA, untied head, bf16 weights), a
GGUF whose matrices are all Q4_K, and a Llama-2-style GGUF with a SentencePiece tokenizer. Logit parity of each loader is pinned in test_checkpoints_hf.py /
test_checkpoints_gguf.py (transformers, float64 block references); here: the loaded model is the file's
model, and the stages run on it to finite perplexities (every stage under `-m slow`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from readme_jax import cli
from readme_jax.checkpoints import load_model
from readme_jax.checkpoints.tokenizer import bytes_to_unicode
from readme_jax.config import tiny_model_config

FULL = "stages=[dense_eval,refactor,refactor_eval,train,baseline,final_eval]"
FAST = "stages=[dense_eval,refactor]"  # the fast suite: the model loads, is evaluated and refactored
SLOW = pytest.mark.slow  # every stage: ~2 min per model on the 2-core CPU
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _run(model_path, out, cache_dir, stages: str, *extra: str) -> list[float]:
    """Run ``stages`` on ``model_path``; every perplexity the dense (and final) evaluations wrote."""
    rc = cli.main(["run", "--config", "tiny_test", "--no-progress", f"output_dir={out}", f"data.cache_dir={cache_dir}",
                   f"model={model_path}", stages, *extra])
    assert rc == 0
    assert (out / "refactor" / "done.json").is_file()
    vals = list(json.loads((out / "dense_eval" / "done.json").read_text())["ppl"].values())
    if stages == FULL:
        final = json.loads((out / "final_eval" / "done.json").read_text())["ppl"]
        assert {"dense", "pruned_dense_tuned", "readme_trained"} <= set(final)
        vals += [v for per_domain in final.values() for v in per_domain.values()]
    assert vals and all(np.isfinite(v) and v > 1 for v in vals)
    return vals


@pytest.mark.parametrize("stages", [FAST, pytest.param(FULL, marks=SLOW)], ids=["fast", "all_stages"])
def test_run_on_a_llama31_hf_directory(make_hf_dir, byte_tokenizer, tmp_path, cache_dir, stages):
    cfg = tiny_model_config(vocab_size=byte_tokenizer.vocab_size, n_heads=4, n_kv_heads=2, tie_embeddings=False,
                            max_seq_len=256, rope_theta=500000.0, rope_llama3=(8.0, 1.0, 4.0, 32),
                            param_dtype="bfloat16")
    d, cfg, _ = make_hf_dir(cfg, seed=3, tokenizer=byte_tokenizer)
    model, _ = load_model(d)
    assert model.cfg.rope_llama3 == (8.0, 1.0, 4.0, 32) and not model.cfg.tie_embeddings
    _run(d, tmp_path / "run", cache_dir, stages, "data.chat_prompts=0")  # loading the model is the point; chat: test_workflow


def _q4_k_rows(rng, rows: int, cols: int) -> np.ndarray:
    """Random but well-scaled Q4_K super-blocks (d and dmin small positive f16) for a [rows, cols] matrix."""
    raw = rng.integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
    for off in (0, 2):  # d, dmin
        raw[..., off:off + 2] = np.frombuffer(rng.uniform(1e-4, 3e-4, raw.shape[:2]).astype(np.float16).tobytes(),
                                              np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("stages", [FAST, pytest.param(FULL, marks=SLOW)], ids=["fast", "all_stages"])
def test_run_on_a_q4_k_gguf(tmp_path, gguf_writer, llama_arrays, cache_dir, stages):
    from test_checkpoints_gguf import gguf_tensors, llama_md, ref_q4_k

    tokens = SPECIALS + sorted(bytes_to_unicode().values()) + ["Ġt"]
    # K-quant rows are 256 values: every matrix's input width is 256
    cfg = tiny_model_config(d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=256, n_layers=2,
                            vocab_size=len(tokens), tie_embeddings=True)
    rng = np.random.default_rng(5)
    tensors = {}
    for name, (w, _) in gguf_tensors(cfg, llama_arrays(cfg, seed=4)).items():
        quantize = name.startswith("blk.") and w.ndim == 2
        tensors[name] = (_q4_k_rows(rng, *w.shape), Q.Q4_K) if quantize else (w, Q.F32)
    md = {k: v for k, v in llama_md(cfg).items() if k != "llama.vocab_size"}
    path = gguf_writer(tmp_path / "q4k.gguf", metadata=md, tensors=tensors, tokenizer={
        "tokens": tokens, "types": [3] * 3 + [1] * (len(tokens) - 3), "merges": ["Ġ t"], "pre": "smollm"})
    model, tok = load_model(path)
    assert tok.vocab_size == cfg.vocab_size
    # the loaded FFN down matrix is the Q4_K blocks' float64 reference (ours: [in, out])
    raw = tensors["blk.1.ffn_down.weight"][0].reshape(cfg.d_model, -1, 144)
    want = np.stack([np.concatenate([ref_q4_k(raw[r, b]) for b in range(raw.shape[1])]) for r in range(raw.shape[0])])
    np.testing.assert_allclose(np.asarray(model.arrays()["layers"]["wd"][1]).T, want, rtol=1e-5, atol=1e-6)
    _run(path, tmp_path / "run", cache_dir, stages, "data.chat_prompts=0")  # a base model: no chat template


@pytest.mark.parametrize("stages", [FAST, pytest.param(FULL, marks=SLOW)], ids=["fast", "all_stages"])
def test_run_on_a_sentencepiece_gguf(tmp_path, gguf_writer, llama_arrays, cache_dir, stages, capsys):
    pytest.importorskip("sentencepiece")
    from test_checkpoints_gguf import gguf_tensors, llama_md
    from test_tokenizer_gguf import sp_vocab, train_sentencepiece

    vocab = sp_vocab(train_sentencepiece())
    cfg = tiny_model_config(vocab_size=len(vocab["tokens"]), ffn_dim=64, tie_embeddings=True, max_seq_len=128)
    md = {k: v for k, v in llama_md(cfg).items() if k != "llama.vocab_size"}  # vocab from the token list
    path = gguf_writer(tmp_path / "spm-llama.gguf", metadata=md, tensors=gguf_tensors(cfg, llama_arrays(cfg, seed=3)),
                       tokenizer=vocab)
    _, tok = load_model(path)
    assert tok.encode("hello world")[0] == tok.bos_id  # Llama-2 convention: BOS added
    # the chat domain needs the model's chat template: a base model is told which key turns it off
    rc = cli.main(["run", "--config", "tiny_test", "--no-progress", f"output_dir={tmp_path / 'chat'}",
                   f"data.cache_dir={cache_dir}", f"model={path}", "stages=[dense_eval]"])
    assert rc == 2 and "no chat template" in capsys.readouterr().err
    assert not (tmp_path / "chat" / "chat_data" / "done.json").exists()
    _run(path, tmp_path / "run", cache_dir, stages, "data.chat_prompts=0")  # a base model: no chat template

"""``readme-jax run --config tiny_test model=PATH`` end to end on a tiny random Llama GGUF whose
tokenizer is SentencePiece (``tokenizer.ggml.model = "llama"``), as Llama 1/2 GGUFs are."""

import json

import pytest

from readme_jax import cli
from readme_jax.config import tiny_model_config

from conftest import TINY_STAGES
from test_checkpoints_gguf import gguf_tensors, llama_md
from test_tokenizer_gguf import sp_vocab, train_sentencepiece

pytest.importorskip("sentencepiece")


def sentencepiece_gguf(path, gguf_writer, llama_arrays):
    vocab = sp_vocab(train_sentencepiece())
    cfg = tiny_model_config(vocab_size=len(vocab["tokens"]), ffn_dim=64, tie_embeddings=True, max_seq_len=128)
    md = {k: v for k, v in llama_md(cfg).items() if k != "llama.vocab_size"}  # vocab from the token list
    return gguf_writer(path, metadata=md, tensors=gguf_tensors(cfg, llama_arrays(cfg, seed=3)), tokenizer=vocab)


def run(out, cache_dir, model, *extra) -> dict:
    rc = cli.main(["run", "--config", "tiny_test", "--no-progress", f"output_dir={out}", f"data.cache_dir={cache_dir}",
                   f"model={model}", *extra])
    assert rc == 0
    return json.loads((out / "report" / "metrics.json").read_text())


def test_dense_and_refactor_stages_on_a_sentencepiece_gguf(tmp_path, cache_dir, gguf_writer, llama_arrays):
    path = sentencepiece_gguf(tmp_path / "spm-llama.gguf", gguf_writer, llama_arrays)
    m = run(tmp_path / "run", cache_dir, path, "stages=[dense_eval,refactor,refactor_eval,report]")
    assert {"dense_eval", "refactor", "refactor_eval"} <= set(m)


@pytest.mark.slow
def test_every_stage_on_a_sentencepiece_gguf(tmp_path, cache_dir, gguf_writer, llama_arrays):
    path = sentencepiece_gguf(tmp_path / "spm-llama.gguf", gguf_writer, llama_arrays)
    m = run(tmp_path / "run", cache_dir, path)
    assert all(stage in m for stage in TINY_STAGES[:-1])
    assert (tmp_path / "run" / "report" / "report.md").is_file()

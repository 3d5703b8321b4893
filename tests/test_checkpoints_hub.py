"""``model=org/name``: a Hugging Face hub id. Offline -> a clear CheckpointError; online -> the snapshot
(``huggingface_hub.snapshot_download`` replaced here by a stand-in returning a tiny local HF directory)."""

from __future__ import annotations

import json

import huggingface_hub
import huggingface_hub.constants
import jax.numpy as jnp
import numpy as np
import pytest
from huggingface_hub import errors as hub_errors

from readme_jax import cli
from readme_jax.checkpoints import load_model
from readme_jax.checkpoints.hub import ALLOW_PATTERNS, is_hub_id
from readme_jax.config import tiny_model_config
from readme_jax.errors import CheckpointError
from readme_jax.model.llama import Llama
from readme_jax.workflow import stages

from conftest import tiny_run_config

REPO = "readme-jax-tests/no-such-model"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and an empty hub cache: huggingface_hub makes no request."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def fake_hub(monkeypatch, make_hf_dir, byte_tokenizer):
    """``snapshot_download`` replaced: returns a tiny HF directory (with tokenizer) and records its calls."""
    d, cfg, arrays = make_hf_dir(tiny_model_config(vocab_size=byte_tokenizer.vocab_size, tie_embeddings=True),
                                 seed=5, tokenizer=byte_tokenizer)
    calls = []

    def snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(d)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return d, cfg, arrays, calls


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_hub_id("org/name.v1_2-x")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "local").mkdir()
    assert not is_hub_id("org/local")  # an existing local path wins
    for s in ("/abs/path", "a/b/c", "org/model.gguf", "../x", "org/..", "name", "org/", "-org/name", "o--x/y"):
        assert not is_hub_id(s), s


def test_offline_hub_id_fails_clearly(offline_cache):
    with pytest.raises(CheckpointError) as e:
        load_model(REPO)
    msg = str(e.value)
    assert f"model {REPO!r} is not a local path, so it was read as a Hugging Face hub id" in msg
    assert "no network was available (HF_HUB_OFFLINE is set) and the hub cache holds no copy of it" in msg
    assert "pass a local directory instead: model=/path/to/dir holding config.json" in msg
    assert f"hf download {REPO} --local-dir DIR" in msg


def test_connection_error_fails_clearly(monkeypatch):
    def no_connection(repo_id, **kw):  # what snapshot_download raises when the hub is unreachable and nothing is cached
        raise hub_errors.LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_connection)
    with pytest.raises(CheckpointError, match=r"no network was available \(no connection to the hub "
                                              r"\(LocalEntryNotFoundError\)\).*pass a local directory instead"):
        load_model(REPO)


def test_online_hub_id_loads_the_snapshot(fake_hub):
    d, cfg, arrays, calls = fake_hub
    model, tok = load_model("org/tiny")
    (repo, kw), = calls
    assert repo == "org/tiny" and kw["local_files_only"] is False and kw["allow_patterns"] == ALLOW_PATTERNS
    assert {"config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json"} <= set(ALLOW_PATTERNS)
    assert model.cfg == cfg and tok.vocab_size == cfg.vocab_size
    ids = tok.encode("hello hub")
    assert tok.decode(ids) == "hello hub"
    x = jnp.asarray(ids)[None]
    np.testing.assert_allclose(np.asarray(model(x)[0]), np.asarray(Llama.from_arrays(cfg, arrays)(x)[0]),
                               rtol=1e-5, atol=1e-5)


def test_snapshot_without_config_fails_clearly(monkeypatch, tmp_path):
    (tmp_path / "snap").mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path / "snap"))
    with pytest.raises(CheckpointError, match="'org/gguf-only': the hub snapshot at .* has no config.json"):
        load_model("org/gguf-only")


def test_run_accepts_a_hub_id(fake_hub, tmp_path, cache_dir):
    cfg = tiny_run_config(tmp_path / "run", cache_dir, "model=org/tiny")
    assert stages.source_identity(cfg) == {"hub": "org/tiny"}
    rc = cli.main(["run", "--config", "tiny_test", "--no-progress", f"output_dir={tmp_path / 'run'}",
                   f"data.cache_dir={cache_dir}", "model=org/tiny", "stages=[dense_eval]",
                   "data.chat_prompts=0"])  # the hub id is the point here, not the chat domain
    assert rc == 0 and fake_hub[3][0][0] == "org/tiny"
    assert json.loads((tmp_path / "run" / "dense_eval" / "done.json").read_text())["settings"]["source"] == \
        {"hub": "org/tiny"}


def test_run_offline_hub_id_fails_clearly(offline_cache, tmp_path, cache_dir, capsys):
    rc = cli.main(["run", "--config", "tiny_test", "--no-progress", f"output_dir={tmp_path / 'run'}",
                   f"data.cache_dir={cache_dir}", f"model={REPO}", "stages=[dense_eval]"])
    err = capsys.readouterr().err
    assert rc != 0 and f"model {REPO!r} is not a local path" in err and "pass a local directory instead" in err

"""Self-distilled chat data: prompts reproducible from the domains, the chat domain written with its
provenance, reused from its cache, regenerated when what made it changes, empty and looping answers dropped."""

import random

import pytest

from readme_jax.data import CHAT_DOMAIN, Document, domain_meta, load_domain
from readme_jax.data.chat_prompts import build_prompts, prompts_sha256
from readme_jax.errors import DataError
from readme_jax.workflow import chat_data
from readme_jax.workflow.workspace import Workspace

from conftest import tiny_run_config


def _docs():
    rng = random.Random(0)
    code = [Document(f"m{i}.py", f"import os\n\ndef f{i}(x):\n    y = x + {i}\n    return y * 2\n", f"m{i}.py")
            for i in range(6)]
    prose = [Document(f"p{i}", "\n".join(f"Line {j} of a verse that is long enough {rng.random():.3f}"
                                        for j in range(8)), f"p{i}") for i in range(4)]
    words = [Document(f"{w}@{i}", f"{w} \\{w}\\, n. a thing.", f"{w}@{i}")
             for i, w in enumerate(["lantern", "harbor", "thunder", "meadow", "paris", "castle"])]
    shak = [Document("the_tempest", "\n".join(["lantern harbor thunder meadow castle paris"] * 5), "the_tempest")]
    return {"code": code, "milton": prose, "dictionary": words, "shakespeare": shak}


def test_prompts_are_deterministic_and_leave_out_the_evaluation_words():
    a = build_prompts(_docs(), 24, seed=3, exclude=["paris", "tempest"])
    b = build_prompts(_docs(), 24, seed=3, exclude=["paris", "tempest"])
    assert a == b and prompts_sha256(a) == prompts_sha256(b)
    assert a != build_prompts(_docs(), 24, seed=4, exclude=["paris", "tempest"])
    assert all("paris" not in p["prompt"].lower() and "tempest" not in p["prompt"].lower() for p in a)
    assert {p["source"] for p in a} >= {"code", "milton", "dictionary", "words"}
    assert len({p["id"] for p in a}) == len(a) > 10


@pytest.fixture()
def ws(tmp_path, cache_dir):
    cfg = tiny_run_config(tmp_path / "run", str(tmp_path / "cache"), "data.chat_prompts=10",
                          "data.chat_max_new_tokens=6")
    return Workspace(cfg, progress=False, log=lambda m: None)


def test_chat_domain_written_reused_and_regenerated(ws, monkeypatch):
    eos = ws.tokenizer.eos_id
    word = ws.tokenizer.encode(" hello")
    calls = []

    def fake_greedy(model, prompts, max_new, *, eos_id, n_slots=16, progress=None):
        calls.append(len(prompts))
        outs = []
        for i, _ in enumerate(prompts):
            if i == 0:
                outs.append([eos])  # empty answer: dropped
            elif i == 1:
                outs.append([word[0]] * max_new)  # one token 6 times: a looping answer, dropped
            elif i % 2:
                outs.append(word + [eos])  # closed by the model
            else:
                outs.append(word * 2)  # cut at max tokens: no end-of-turn token
        return outs

    monkeypatch.setattr(chat_data, "greedy_batch", fake_greedy)
    info = chat_data.run_chat_data(ws)
    assert calls and info["enabled"] and not info["reused"]
    assert info["dropped"] == {"empty": 1, "degenerate": 1} and info["kept"] == info["prompts"] - 2
    meta = domain_meta(CHAT_DOMAIN, ws.cfg.data.cache_dir)
    assert meta["provenance"]["key"] == info["key"] and meta["provenance"]["max_new_tokens"] == 6
    docs = load_domain(CHAT_DOMAIN, ws.cfg.data.cache_dir)
    end = ws.tokenizer.decode([eos])
    assert all(d.text.startswith("<|im_start|>") and " hello" in d.text for d in docs)
    assert sum(d.text.endswith(end + "\n") for d in docs) == info["closed"] - 1  # the empty one was closed too
    prompts = chat_data.chat_prompts_for(ws)
    assert [d.id for d in docs] == [p["id"] for i, p in enumerate(prompts) if i >= 2]

    calls.clear()
    again = chat_data.run_chat_data(ws)  # same key: the cache is reused, nothing generated
    assert again["reused"] and again["key"] == info["key"] and not calls

    other = Workspace(tiny_run_config(ws.out, ws.cfg.data.cache_dir, "data.chat_prompts=10",
                                      "data.chat_max_new_tokens=5"), progress=False, log=lambda m: None)
    changed = chat_data.run_chat_data(other)
    assert not changed["reused"] and changed["key"] != info["key"] and calls


def test_chat_domain_missing_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="chat_data stage"):
        load_domain(CHAT_DOMAIN, tmp_path / "empty_cache")

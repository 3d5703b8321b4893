"""Text in, text out (LLM) and the live loop (LiveEngine) on a tiny Read-ME model with the real tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from readme_jax.checkpoints import embedded_gguf_path, tokenizer_from_gguf
from readme_jax.config import EngineConfig, ModelConfig, RouterConfig, SamplingParams
from readme_jax.errors import RequestError
from readme_jax.model.moe import MoEBackbone
from readme_jax.model.readme_model import ReadMEModel
from readme_jax.model.router import make_router
from readme_jax.serve.engine import Engine, generate
from readme_jax.serve.api.live import LiveEngine, QueueFull
from readme_jax.serve.api.llm import LLM, TextStream

ECFG = EngineConfig(n_slots=2, max_len=48, token_budget=8, min_window=48)


@pytest.fixture(scope="module")
def tok():
    return tokenizer_from_gguf(embedded_gguf_path())


@pytest.fixture(scope="module")
def model(tok):
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      ffn_dim=64, max_seq_len=128)
    bb = MoEBackbone(cfg, rngs=nnx.Rngs(2), n_experts=3, expert_dim=16)
    router = make_router(RouterConfig(width=16, n_heads=2, ffn_dim=16, seed=3), 3, cfg.vocab_size, cfg.max_seq_len,
                         backbone_embed_VD=bb.embed[...])
    return ReadMEModel.from_modules(router, bb)


@pytest.fixture(scope="module")
def llm(model, tok):
    return LLM(model, tok, ECFG)


def test_generate_equals_the_engine_and_stream_equals_generate(llm, model, tok):
    prompts = ["Hello there", "The capital of France is", "1 2 3"]
    got = llm.generate(prompts, max_tokens=6)
    ids = [tok.encode(p) for p in prompts]
    want = generate(Engine(model, ECFG), ids, 6)
    assert [c.token_ids for c in got] == want
    assert [c.text for c in got] == [tok.decode(w, skip_special=True) for w in want]
    assert all(c.finish_reason == "length" for c in got)
    assert "".join(llm.stream(prompts[1], max_tokens=6)) == got[1].text


def test_a_prompt_four_times_the_budget_is_served_in_chunks(llm, model, tok):
    """LLM (the served path) accepts a prompt of 4x the step's token budget and answers what one
    request alone, its prompt in one step, gets."""
    ids = tok.encode("the quick brown fox jumps over the lazy dog " * 8)[:4 * ECFG.token_budget]
    assert len(ids) == 4 * ECFG.token_budget
    got = llm.generate([ids], max_tokens=6)[0]
    one = generate(Engine(model, EngineConfig(n_slots=1, max_len=48, token_budget=48, min_window=48)), [ids], 6)[0]
    assert got.token_ids == one and got.prompt_tokens == len(ids)


def test_chat_uses_the_chat_template(llm, tok):
    msgs = [{"role": "user", "content": "Hi"}]
    ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True), add_bos=False)
    c = llm.chat(msgs, max_tokens=4)
    assert c.prompt_tokens == len(ids) and c.token_ids == llm.generate([ids], max_tokens=4)[0].token_ids
    with pytest.raises(RequestError, match="messages"):
        llm.chat([{"role": "user"}])


def test_stop_strings_cut_the_text_and_free_the_slot(llm):
    full = llm.generate("Hello there", max_tokens=8)[0].text
    assert len(full) >= 3
    stop = full[1:3]
    c = llm.generate("Hello there", max_tokens=8, stop=stop)[0]
    assert c.text == full[:full.find(stop)] and c.finish_reason == "stop"
    assert "".join(llm.stream("Hello there", max_tokens=8, stop=[stop])) == c.text
    assert llm.live.n_running == 0 and llm.live.scheduler.n_waiting == 0


def test_text_stream_holds_back_a_possible_stop_prefix(tok):
    ts = TextStream(tok, ["END"])
    ids = tok.encode("abc EN")
    out = ts.push(ids, final=False)
    assert not out.endswith("EN") and "abc" in out
    assert out + ts.push(tok.encode("abc ENx"), final=True) == "abc ENx"


def test_bad_options_and_values_are_request_errors(llm):
    with pytest.raises(RequestError, match="unknown sampling option"):
        llm.generate("x", max_tokenz=3)
    with pytest.raises(RequestError, match="top_k must be an integer >= 0"):
        llm.generate("x", max_tokens=3, top_k=-1)
    with pytest.raises(RequestError, match="temperature"):
        llm.generate("x", max_tokens=3, temperature=-0.5)
    with pytest.raises(RequestError, match="max_len"):
        llm.generate("word " * 60, max_tokens=4)


def test_sampled_outputs_depend_on_the_seed_only(llm):
    a = llm.generate(["Once", "Twice"], max_tokens=6, temperature=1.0, top_k=20, seed=5)
    b = llm.generate(["Twice", "Once"], max_tokens=6, temperature=1.0, top_k=20, seed=5)
    assert a[0].token_ids == b[1].token_ids and a[1].token_ids == b[0].token_ids


def test_live_cancel_frees_the_slot_and_queue_full_is_refused(model):
    live = LiveEngine(Engine(model, ECFG), max_queue=1)
    sp = SamplingParams()
    h1 = live.submit([1, 2, 3], 20, sp)
    h2 = live.submit([4, 5, 6], 20, sp)
    live.step()  # admits 1 and 2 into the 2 slots and prefills them
    h3 = live.submit([7, 8], 3, sp)  # waits (queue of 1)
    with pytest.raises(QueueFull, match="queue full"):
        live.submit([9], 3, sp)
    live.cancel(h1.rid)
    live.run_until([h2, h3])
    assert h1.finish_reason == "cancelled" and h2.finish_reason == "length" and len(h2.tokens) == 20
    assert h3.finish_reason == "length" and len(h3.tokens) == 3
    assert live.scheduler.n_running == 0 and [r.rid for r in live.scheduler.cancelled] == [h1.rid]
    kinds = []
    while not h1.events.empty():
        kinds.append(h1.events.get()[0])
    assert kinds[-1] == "done" and set(kinds[:-1]) <= {"token"}
    # the engine forgot every request: nothing is kept per request after it ends
    assert live.engine.outputs() == {}


def test_live_results_equal_one_at_a_time(model):
    """Requests arriving while others run (submitted between steps) get what they would get alone."""
    eng = Engine(model, ECFG)
    live = LiveEngine(eng)
    prompts = [list(np.random.default_rng(i).integers(1, 1000, 5 + i)) for i in range(4)]
    hs = [live.submit(prompts[0], 7)]
    for p in prompts[1:]:
        live.step()
        hs.append(live.submit(p, 7))
    live.run_until(hs)
    solo = [generate(Engine(model, ECFG), [p], 7)[0] for p in prompts]
    assert [h.tokens for h in hs] == solo


def test_missing_model_path_is_one_clear_error(tmp_path):
    from readme_jax.errors import CheckpointError
    from readme_jax.serve.api.llm import open_model

    with pytest.raises(CheckpointError, match="the path does not exist"):
        open_model(tmp_path / "nope")

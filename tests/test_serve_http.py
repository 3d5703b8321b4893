"""`readme-jax serve` driven by the official openai client: a tiny Read-ME export with the real SmolLM2
tokenizer, a server subprocess on 127.0.0.1, every test bounded in time."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from flax import nnx

from readme_jax.checkpoints import embedded_gguf_path, tokenizer_from_gguf
from readme_jax.checkpoints.readme_io import save_export
from readme_jax.config import ModelConfig, RouterConfig
from readme_jax.model.moe import MoEBackbone
from readme_jax.model.readme_model import ReadMEModel
from readme_jax.model.router import make_router
from readme_jax.serve.api.http import wait_healthy
from readme_jax.serve.api.llm import LLM

SLOTS, QUEUE, MAX_LEN = 2, 2, 64
NAME = "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    tok = tokenizer_from_gguf(embedded_gguf_path())
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      ffn_dim=64, max_seq_len=256)
    bb = MoEBackbone(cfg, rngs=nnx.Rngs(0), n_experts=3, expert_dim=16, shared_dim=8)
    router = make_router(RouterConfig(width=16, n_heads=2, ffn_dim=16, seed=1), 3, cfg.vocab_size, cfg.max_seq_len,
                         backbone_embed_VD=bb.embed[...])
    d = tmp_path_factory.mktemp("export") / NAME
    save_export(d, ReadMEModel.from_modules(router, bb), tokenizer=tok)
    return d


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "readme_jax.cli", "serve", str(export_dir), "--port", str(port),
                                 "--slots", str(SLOTS), "--max-queue", str(QUEUE), "--max-len", str(MAX_LEN),
                                 "--no-warm"],  # shapes compile on first use (warming: test_serve_engine.py)
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(proc, base, log, 180)
    yield base, proc, log
    if proc.poll() is None:
        proc.terminate()
        proc.wait(60)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def offline(export_dir):
    return LLM.open(export_dir, n_slots=SLOTS, max_len=MAX_LEN)


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"
    text = httpx.get(server[0] + "/metrics").text
    for name in ("readme_queue_depth", "readme_running_requests", "readme_time_to_first_token_seconds",
                 "readme_request_latency_seconds", "readme_unique_experts_per_step", "readme_tokens_per_second"):
        assert name in text


def test_completion_and_chat_equal_offline_greedy(client, offline):
    prompt = "The capital of France is"
    got = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0)
    want = offline.generate(prompt, max_tokens=8)[0]
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason
    assert got.usage.completion_tokens == len(want.token_ids) and got.usage.prompt_tokens == want.prompt_tokens
    msgs = [{"role": "user", "content": "Say hi"}]
    chat = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == offline.chat(msgs, max_tokens=6).text
    stream = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=6, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    s2 = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in s2) == want.text


def test_sampling_with_seed_is_reproducible_and_stop_cuts(client):
    a = client.completions.create(model=NAME, prompt="Once", max_tokens=8, temperature=0.9, top_p=0.9, seed=7,
                                  extra_body={"top_k": 20})
    b = client.completions.create(model=NAME, prompt="Once", max_tokens=8, temperature=0.9, top_p=0.9, seed=7,
                                  extra_body={"top_k": 20})
    assert a.choices[0].text == b.choices[0].text
    full = a.choices[0].text
    if len(full) >= 3:
        stop = full[1:3]
        cut = client.completions.create(model=NAME, prompt="Once", max_tokens=8, temperature=0.9, top_p=0.9, seed=7,
                                        stop=[stop], extra_body={"top_k": 20})
        assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body,param", [
    ({"model": "nope", "prompt": "x"}, "model"),
    ({"model": NAME, "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": NAME, "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": NAME, "prompt": "x", "top_p": 2}, "top_p"),
    ({"model": NAME, "prompt": "word " * 200, "max_tokens": 4}, None),  # over the context
    ({"model": NAME}, "prompt"),
])
def test_bad_requests_get_400_naming_the_field(server, body, param):
    r = httpx.post(server[0] + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    if param is not None:
        assert err["param"] == param and param in err["message"]
    else:
        assert "max_len" in err["message"]


def test_malformed_json_is_400_and_the_server_keeps_serving(server, client):
    r = httpx.post(server[0] + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert client.completions.create(model=NAME, prompt="ok", max_tokens=2, temperature=0).choices[0].text is not None


def test_overload_every_request_completes_or_gets_429(server, offline):
    """8 concurrent streams against 2 slots + 2 queue places: each completes (text = a solo run) or gets 429."""
    prompts = [f"Request number {i} says" for i in range(8)]

    def one(p):
        c = openai.OpenAI(base_url=server[0] + "/v1", api_key="none", timeout=120, max_retries=0)
        try:
            s = c.completions.create(model=NAME, prompt=p, max_tokens=12, temperature=0, stream=True)
            return "".join(ch.choices[0].text for ch in s)
        except openai.RateLimitError:
            return 429

    with cf.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, prompts))
    done = [(p, r) for p, r in zip(prompts, results) if r != 429]
    assert len(done) >= SLOTS and all(r == 429 or isinstance(r, str) for r in results)
    for p, r in done:
        assert r == offline.generate(p, max_tokens=12)[0].text


def _metric(base: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_disconnect_cancels_and_frees_the_slot(server, client, offline):
    base = server[0]
    before = _metric(base, 'readme_requests_finished_total{reason="cancelled"}')
    with httpx.stream("POST", base + "/v1/completions", timeout=60,
                      json={"model": NAME, "prompt": "Tell a long story", "max_tokens": 40, "temperature": 0,
                            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up
    other = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert other.choices[0].text == offline.generate("The capital of France is", max_tokens=8)[0].text
    deadline = time.time() + 30
    while time.time() < deadline and _metric(base, 'readme_requests_finished_total{reason="cancelled"}') <= before:
        time.sleep(0.2)
    assert _metric(base, 'readme_requests_finished_total{reason="cancelled"}') == before + 1
    assert _metric(base, "readme_running_requests") == 0


def test_sigterm_drains_and_exits(server):
    """SIGTERM while a stream runs: the stream still ends normally, then the server exits cleanly."""
    base, proc, log = server
    got = {}

    def stream():
        with httpx.stream("POST", base + "/v1/completions", timeout=120,
                          json={"model": NAME, "prompt": "bye", "max_tokens": 30, "temperature": 0,
                                "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        got["lines"] = lines

    with cf.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(stream)
        deadline = time.time() + 30
        while time.time() < deadline and _metric(base, "readme_running_requests") < 1:
            time.sleep(0.05)
        proc.terminate()
        fut.result(120)
    assert got["lines"][-1] == "data: [DONE]"
    last = json.loads(got["lines"][-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] in ("length", "stop")
    rc = proc.wait(90)
    assert rc in (0, -15), log.read_text()[-2000:]  # uvicorn re-raises SIGTERM after a graceful shutdown
    assert "Application shutdown complete" in log.read_text()

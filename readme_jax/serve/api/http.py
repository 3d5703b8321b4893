"""`readme-jax serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one :class:`LLM`.

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream: true`` answers with
server-sent events as OpenAI clients expect), ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus text format). The engine steps in a background thread and the scheduler is fed live
(expert-aware batching by default). Errors: 400 with the bad field named (bad JSON, unknown model,
negative max_tokens, temperature < 0, top_p outside (0, 1], a prompt over the context), 429 when the
wait queue is full, 503 while shutting down. A streaming client that disconnects cancels its request
and frees its slot. SIGTERM (uvicorn's graceful shutdown) stops taking requests, lets the running
ones finish, then stops the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from readme_jax.errors import ReadmeError, RequestError
from readme_jax.serve.scheduling.cache_policy import ExpertCache
from readme_jax.serve.api.live import LiveMetrics, QueueFull, ShuttingDown
from readme_jax.serve.api.llm import LLM, Sampling, TextStream

# ----------------------------------------------------------------------------- metrics


class PrometheusMetrics(LiveMetrics):
    """The loop's measurements as Prometheus metrics (one registry per server)."""

    def __init__(self, cache_capacity: int = 3):
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("readme_queue_depth", "requests waiting for a KV slot", registry=r)
        self.running = Gauge("readme_running_requests", "requests holding a KV slot", registry=r)
        self.tokens = Counter("readme_generated_tokens", "tokens sampled", registry=r)
        self.tokens_per_s = Gauge("readme_tokens_per_second", "tokens sampled per second over the last 10 s",
                                  registry=r)
        self.steps = Counter("readme_engine_steps", "engine steps run", registry=r)
        self.step_tokens = Counter("readme_processed_tokens", "tokens run through the model (prompts too)", registry=r)
        self.unique_experts = Histogram("readme_unique_experts_per_step", "distinct experts in one engine step",
                                        buckets=(1, 2, 3, 4, 5, 6, 7, 8, 12, 16), registry=r)
        self.compile_seconds = Gauge("readme_engine_compile_seconds",
                                     "time spent on first uses of new compiled shapes (not in step times)", registry=r)
        self.step_seconds = Histogram("readme_step_seconds", "measured engine step time", registry=r)
        self.ttft = Histogram("readme_time_to_first_token_seconds", "arrival to first token", registry=r)
        self.latency = Histogram("readme_request_latency_seconds", "arrival to last token", registry=r)
        self.finished_total = Counter("readme_requests_finished", "requests ended", ["reason"], registry=r)
        self.rejected_total = Counter("readme_requests_rejected", "requests refused", ["reason"], registry=r)
        self.cache_hit_ratio = Gauge(
            "readme_expert_cache_hit_ratio", "hit ratio of an LRU expert cache fed the served steps' experts "
            "(simulated: every expert is resident on the device in this engine)", ["policy", "capacity"], registry=r)
        self._cache = ExpertCache(cache_capacity, "lru")
        self._capacity = cache_capacity
        self._recent: list[tuple[float, int]] = []

    def step(self, n_sampled: int, n_tokens: int, experts: frozenset, seconds: float) -> None:
        now = time.monotonic()
        self.steps.inc()
        self.tokens.inc(n_sampled)
        self.step_tokens.inc(n_tokens)
        self.step_seconds.observe(seconds)
        self.unique_experts.observe(len(experts))
        self._recent = [(t, n) for t, n in self._recent if now - t < 10.0] + [(now, n_sampled)]
        self.tokens_per_s.set(sum(n for _, n in self._recent) / 10.0)
        self._cache.access_step(experts)
        self.cache_hit_ratio.labels("lru", str(self._capacity)).set(self._cache.stats.hit_ratio)

    def finished(self, reason: str, ttft_s: float | None, latency_s: float, n_tokens: int) -> None:
        self.finished_total.labels(reason).inc()
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        self.latency.observe(latency_s)

    def rejected(self, reason: str) -> None:
        self.rejected_total.labels(reason).inc()


# ----------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (n=1, user, ...)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    stop: str | list[str] | None = None
    stream: bool = False


class CompletionBody(_Body):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def wait_healthy(proc: subprocess.Popen, base: str, log: Path, timeout_s: float) -> None:
    """Poll ``base/health`` of a ``readme-jax serve`` subprocess until it answers 200; if the process exits
    first, or ``timeout_s`` passes (then the process is killed), RuntimeError with the end of its ``log``."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not start within {timeout_s:.0f} s: {log.read_text()[-3000:]}")


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


# ----------------------------------------------------------------------------- the app


def create_app(llm: LLM, metrics: PrometheusMetrics | None = None, *, model_name: str | None = None) -> FastAPI:
    name = model_name or llm.name
    metrics = metrics or PrometheusMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        llm.start()
        yield
        await run_in_threadpool(llm.shutdown, True, 60.0)  # drain: running requests finish first

    app = FastAPI(title="readme-jax", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        e = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = ".".join(loc) or None
        msg = "request body is not valid JSON" if e.get("type") == "json_invalid" else e.get("msg", "bad request")
        return _error(400, f"{field}: {msg}" if field else msg, field)

    @app.get("/health")
    async def health():
        if llm.live.error is not None:
            return _error(503, f"engine failed: {llm.live.error}", kind="server_error")
        return {"status": "ok", "model": name, "waiting": llm.live.n_waiting, "running": llm.live.n_running}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "readme-jax"}]}

    @app.get("/metrics")
    async def prometheus():
        metrics.queue_depth.set(llm.live.n_waiting)
        metrics.running.set(llm.live.n_running)
        metrics.compile_seconds.set(llm.engine.compile_s)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def run(request: Request, body: _Body, prompt_ids: list[int], chat: bool):
        if body.model != name:
            return _error(400, f"model: unknown model {body.model!r}; this server serves {name!r}", "model")
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or 16
        s = Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                     seed=body.seed, stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:  # the engine's thread hands each event to this loop: no thread hop, no polling per token
            h = llm.submit(prompt_ids, s, listener=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except QueueFull as e:
            return _error(429, str(e), kind="rate_limit_error")
        except ShuttingDown as e:
            return _error(503, str(e), kind="server_error")
        except RequestError as e:
            return _error(400, str(e), _param_of(str(e)))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if body.stream:
            return StreamingResponse(_sse(llm, h, events, s, rid, created, name, chat), media_type="text/event-stream")
        text = TextStream(llm.tokenizer, s.stop)
        reason = None
        try:
            while reason is None:
                kind, value = await events.get()
                if kind == "error":
                    return _error(500, f"request {h.rid}: {value}", kind="server_error")
                text.push(list(h.tokens), kind == "done")
                if text.stopped:
                    llm.live.cancel(h.rid)
                    reason = "stop"
                elif kind == "done":
                    reason = str(value)
        except asyncio.CancelledError:
            llm.live.cancel(h.rid)
            raise
        ids = list(h.tokens)
        usage = {"prompt_tokens": h.prompt_len, "completion_tokens": len(ids), "total_tokens": h.prompt_len + len(ids)}
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text.text}
        else:
            choice["text"] = text.text
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": name, "choices": [choice], "usage": usage}

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody):
        try:
            ids = llm.encode(body.prompt)
        except ReadmeError as e:
            return _error(400, f"prompt: {e}", "prompt")
        return await run(request, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatBody):
        try:
            ids = llm.encode_chat([m.model_dump() for m in body.messages])
        except ReadmeError as e:
            return _error(400, f"messages: {e}", "messages")
        return await run(request, body, ids, chat=True)

    return app


async def _sse(llm: LLM, h, events: asyncio.Queue, s: Sampling, rid: str, created: int, name: str, chat: bool):
    """Server-sent events of one request; a disconnect (the task cancelled) cancels the request."""
    text = TextStream(llm.tokenizer, s.stop)
    kind_name = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            d = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return "data: " + json.dumps({"id": rid, "object": kind_name, "created": created, "model": name,
                                      "choices": [choice]}) + "\n\n"

    done = False
    try:
        if chat:
            yield chunk("", None, first=True)
        while True:
            kind, value = await events.get()
            if kind == "error":
                yield "data: " + json.dumps({"error": {"message": str(value), "type": "server_error"}}) + "\n\n"
                done = True
                break
            delta = text.push(list(h.tokens), kind == "done")
            if delta:
                yield chunk(delta, None)
            if text.stopped or kind == "done":
                if text.stopped and kind != "done":
                    llm.live.cancel(h.rid)
                yield chunk(None, "stop" if text.stopped else str(value))
                done = True
                break
        yield "data: [DONE]\n\n"
    finally:
        if not done:  # the client went away (or the server stops): free the slot
            llm.live.cancel(h.rid)


def _param_of(message: str) -> str | None:
    for p in ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "prompt"):
        if p in message:
            return {"max_new_tokens": "max_tokens"}.get(p, p)
    return None


def serve(path, *, host: str = "127.0.0.1", port: int = 8000, dense: bool = False, policy: str = "expert_aware",
          n_slots: int = 8, max_len: int = 512, max_queue: int = 64, name: str | None = None,
          log_level: str = "info", mesh=None, warm: bool = True) -> None:
    """Load the model at ``path`` and serve it until SIGINT/SIGTERM (``mesh``: experts sharded over
    devices, ``EngineConfig.mesh``). ``warm``: compile the engine's common programs before listening,
    a progress line each (the others compile on first use; their time is ``readme_engine_compile_seconds``)."""
    metrics = PrometheusMetrics()
    llm = LLM.open(path, dense=dense, n_slots=n_slots, max_len=max_len, policy=policy, max_queue=max_queue,
                   metrics=metrics, mesh=mesh, **({"name": name} if name else {}))
    if warm:
        print(f"[readme-jax serve] compiling the engine's step programs ahead ({len(llm.engine.serving_shapes())})",
              file=sys.stderr, flush=True)
        seconds = llm.warm(progress=lambda line: print(f"[readme-jax serve] {line}", file=sys.stderr, flush=True))
        print(f"[readme-jax serve] compiled in {seconds:.0f} s", file=sys.stderr, flush=True)
    uvicorn.run(create_app(llm, metrics), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=60)

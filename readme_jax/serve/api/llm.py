"""Text in, text out: a Read-ME (or dense) model, its tokenizer and the serving engine behind one object.

    llm = LLM.open("runs/smollm2_135m_quick")          # the trained Read-ME model of a run (or an export)
    llm.generate(["The capital of France is"], max_tokens=16)[0].text
    for delta in llm.stream("Once upon a time", max_tokens=32, temperature=0.7, top_k=50):
        print(delta, end="")
    llm.chat([{"role": "user", "content": "Hi!"}]).text   # through the model's own chat template

Requests run through :class:`LiveEngine` (expert-aware batching by default): ``generate`` batches
all its prompts; with the loop in a background thread (``llm.start()``, the HTTP server) any number
of callers share the engine. Stop strings end a request as soon as they appear in its text (the
text is cut before them; the request's slot is freed at once). EOS ends it with ``finish_reason``
``stop``; ``max_tokens`` with ``length``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

from readme_jax.checkpoints import load_model
from readme_jax.checkpoints.readme_io import dense_source, load_readme, load_tokenizer_for
from readme_jax.checkpoints.tokenizer import Tokenizer
from readme_jax.config import EngineConfig, SamplingParams
from readme_jax.errors import CheckpointError, ReadmeError, RequestError
from readme_jax.model.readme_model import DenseModel
from readme_jax.serve.engine import Engine, ServedModel
from readme_jax.serve.api.live import Handle, LiveEngine, LiveMetrics


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # stop (EOS or a stop string) | length | cancelled
    prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What a caller may ask for (validated by the engine when submitted)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def engine_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed, top_k=self.top_k)


class TextStream:
    """Incremental detokenization with stop strings: emits only text that can no longer change."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]):
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.sent = 0
        self.text = ""
        self.stopped = False

    def push(self, token_ids: list[int], final: bool) -> str:
        text = self.tok.decode(token_ids, skip_special=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped, final = text[:cut], True, True
        hold = 0
        if not final:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                hold = 1
            for s in self.stop:  # a tail that may grow into a stop string is held back
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
        self.text = text
        upto = len(text) - hold
        delta = text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return delta


SERVING_TOKEN_BUDGET = 64  # tokens per step of the served engine: decodes + prompt chunks


def serving_engine_config(n_slots: int, max_len: int, eos_id, mesh=None,
                          token_budget: int = SERVING_TOKEN_BUDGET) -> EngineConfig:
    """The served engine: ``n_slots`` KV slots of ``max_len`` tokens, steps of at most ``token_budget``
    tokens (longer prompts run in chunks); ``mesh``: experts sharded."""
    return EngineConfig(n_slots=n_slots, max_len=max_len, eos_id=eos_id, token_budget=token_budget, mesh=mesh)


class LLM:
    def __init__(self, model: ServedModel, tokenizer: Tokenizer, engine_config: EngineConfig | None = None, *,
                 policy: str = "expert_aware", max_queue: int = 64, token_budget: int | None = None,
                 metrics: LiveMetrics | None = None, name: str = "readme"):
        cfg = engine_config or serving_engine_config(8, min(512, _max_len(model)), tokenizer.eos_id)
        if cfg.eos_id is None:
            cfg = dataclasses.replace(cfg, eos_id=tokenizer.eos_id)
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.engine = Engine(model, cfg)
        self.live = LiveEngine(self.engine, policy=policy, max_queue=max_queue, token_budget=token_budget,
                               metrics=metrics)
        self._threaded = False

    @classmethod
    def open(cls, path, *, dense: bool = False, n_slots: int = 8, max_len: int = 512, mesh=None, **kw) -> "LLM":
        """The Read-ME model of a run folder, its ``train/final`` or an export; ``dense=True``: the run's
        dense source model (the A/B twin), or a dense checkpoint path (GGUF, HF directory). The engine
        gets ``n_slots`` KV slots of ``max_len`` tokens (capped at the model's context) and, with
        ``mesh`` (a MeshConfig or jax Mesh), its experts sharded over devices (serve/engine/placement.py)."""
        model, tok, name = open_model(path, dense=dense)
        cfg = serving_engine_config(n_slots, min(max_len, _max_len(model)), tok.eos_id, mesh=mesh)
        return cls(model, tok, cfg, name=kw.pop("name", name), **kw)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "LLM":
        """Step the engine in a background thread (several callers at once, e.g. the HTTP server)."""
        self.live.start()
        self._threaded = True
        return self

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        self.live.shutdown(drain=drain, timeout=timeout)

    # ------------------------------------------------------------------ prompts

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` through the model's chat template, ready for the assistant's turn."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RequestError(f"messages[{i}] must be an object with string 'role' and 'content'")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_bos=False)

    # ------------------------------------------------------------------ generation

    def submit(self, prompt_ids: Sequence[int], sampling: Sampling, listener=None) -> Handle:
        """Queue one request (RequestError / QueueFull / ShuttingDown at once); events arrive on its handle
        (or go to ``listener``, called from the loop's thread: the HTTP server's asyncio queues)."""
        return self.live.submit(prompt_ids, sampling.max_tokens, sampling.engine_params(), listener)

    def warm(self, shapes=None, progress=None) -> float:
        """Compile the engine's programs ahead (``Engine.warm``; default: decode steps of every batch
        size and window, and a new prompt's first chunk of every size); ``progress`` gets a line each."""
        return self.engine.warm(shapes, progress)

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]], **sampling) -> list[Completion]:
        """Completions of every prompt (text or token ids), batched through the engine."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        s = _sampling(sampling)
        handles = [self.submit(self.encode(p), s) for p in prompts]
        return [self.collect(h, s) for h in handles]

    def stream(self, prompt: str | Sequence[int], **sampling) -> Iterator[str]:
        """Text deltas of one completion as they are generated (``.finish_reason`` on the iterator's end)."""
        s = _sampling(sampling)
        return self.stream_handle(self.submit(self.encode(prompt), s), s)

    def chat(self, messages: list[dict], **sampling) -> Completion:
        s = _sampling(sampling)
        return self.collect(self.submit(self.encode_chat(messages), s), s)

    def chat_stream(self, messages: list[dict], **sampling) -> Iterator[str]:
        s = _sampling(sampling)
        return self.stream_handle(self.submit(self.encode_chat(messages), s), s)

    def stream_handle(self, h: Handle, s: Sampling) -> Iterator[str]:
        """Deltas of a submitted request; closing the iterator early cancels the request."""
        text = TextStream(self.tokenizer, s.stop)
        finished = False
        try:
            for kind, value in self._events(h):
                if kind == "error":
                    raise RequestError(f"request {h.rid}: {value}")
                final = kind == "done"
                delta = text.push(list(h.tokens), final)
                if delta:
                    yield delta
                if text.stopped and not final:
                    self.live.cancel(h.rid)
                if final or text.stopped:
                    finished = True
                    return
        finally:
            if not finished:
                self.live.cancel(h.rid)

    def collect(self, h: Handle, s: Sampling) -> Completion:
        """Wait for a submitted request and return its completion (stop strings applied)."""
        text = TextStream(self.tokenizer, s.stop)
        reason = None
        for kind, value in self._events(h):
            if kind == "error":
                raise RequestError(f"request {h.rid}: {value}")
            text.push(list(h.tokens), kind == "done")
            if text.stopped:
                self.live.cancel(h.rid)
                reason = "stop"
                break
            if kind == "done":
                reason = value
        ids = list(h.tokens)
        return Completion(text.text, ids, reason or h.finish_reason or "stop", h.prompt_len)

    def _events(self, h: Handle) -> Iterator[tuple[str, object]]:
        """The handle's events; without the background thread this thread steps the engine."""
        while True:
            if not self._threaded:
                while h.events.empty():
                    if not self.live.step() and h.events.empty():
                        raise ReadmeError(f"request {h.rid}: the engine has no work left but the request is open")
            kind, value = h.events.get()
            yield kind, value
            if kind in ("done", "error"):
                return


def _sampling(options: dict) -> Sampling:
    """Sampling from keyword options (``stop`` may be a string or a list); unknown options are errors."""
    stop = options.pop("stop", None)
    stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(x, str) for x in stop):
        raise RequestError(f"stop must be a string or a list of strings, got {stop!r}")
    fields = {f.name for f in dataclasses.fields(Sampling)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise RequestError(f"unknown sampling option(s) {unknown}; valid: {sorted(fields)}")
    return Sampling(**options, stop=stop)


def open_model(path, *, dense: bool = False) -> tuple[ServedModel, Tokenizer, str]:
    """``(model, tokenizer, name)`` at ``path`` (see :meth:`LLM.open`)."""
    if not Path(path).exists():
        raise CheckpointError(f"no model at {path}: the path does not exist (expected a run folder, its "
                              "train/final, or an export)")
    tok = load_tokenizer_for(path)
    if dense:
        llama, _ = load_model(dense_source(path))
        return DenseModel.from_module(llama), tok, "dense"
    return load_readme(path), tok, Path(path).absolute().name or "readme"


def _max_len(model: ServedModel) -> int:
    return (model.backbone_cfg if model.is_moe else model.cfg).max_seq_len

"""The engine kept stepping while requests arrive: submit from any thread, tokens come back as events.

:class:`LiveEngine` owns one :class:`Engine` and one :class:`Scheduler` (expert-aware batching by
default). ``submit`` validates a request at once (RequestError: bad request; QueueFull: the wait
queue is full) and returns a :class:`Handle` whose ``events`` queue receives ``("token", id)`` per
sampled token and finally ``("done", finish_reason)`` (``stop``: EOS; ``length``: max tokens;
``cancelled``) or ``("error", message)`` (or hands them to the handle's ``listener``). ``cancel``
frees the request's slot before the next step. Prompts of any length up to the engine's
``max_len`` are accepted: the scheduler runs them in chunks of its token budget.

Only the loop touches the engine and the scheduler: either a background thread (``start`` /
``shutdown``, what the HTTP server uses) or the caller, one ``step()`` at a time (what
``LLM.generate`` does when no thread runs). The thread never polls: with no work it blocks until a
submit, a cancel or ``shutdown`` wakes it. ``shutdown(drain=True)`` refuses new requests and
finishes the running ones first.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from typing import Callable, Sequence

from readme_jax.config import SamplingParams
from readme_jax.errors import ReadmeError, RequestError
from readme_jax.serve.engine import Engine
from readme_jax.serve.scheduling.scheduler import Scheduler, SchedulerConfig


class QueueFull(ReadmeError):
    """The scheduler's wait queue is full (HTTP 429)."""


class ShuttingDown(ReadmeError):
    """The loop is draining or stopped and takes no new requests (HTTP 503)."""


class LiveMetrics:
    """What the loop reports; the HTTP server's Prometheus metrics subclass it. No-ops here."""

    def step(self, n_sampled: int, n_tokens: int, experts: frozenset, seconds: float) -> None:
        """One engine step: tokens sampled (one per item), tokens run (prompt tokens too), its experts."""

    def finished(self, reason: str, ttft_s: float | None, latency_s: float, n_tokens: int) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass


@dataclasses.dataclass(eq=False)
class Handle:
    """One submitted request: its tokens so far and an event queue (thread-safe)."""

    rid: int
    prompt_len: int
    max_tokens: int
    arrival_s: float
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    # called from the loop's thread with each event instead of queueing it (e.g. into an asyncio
    # queue with ``loop.call_soon_threadsafe``: the HTTP server); None: events go to ``events``
    listener: Callable[[tuple], None] | None = None
    tokens: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def emit(self, event: tuple) -> None:
        if self.listener is not None:
            self.listener(event)
        else:
            self.events.put(event)


class LiveEngine:
    def __init__(self, engine: Engine, *, policy: str = "expert_aware", token_budget: int | None = None,
                 max_queue: int = 64, max_wait_steps: int | None = 16, metrics: LiveMetrics | None = None):
        self.engine = engine
        budget = token_budget or engine.cfg.token_budget  # prompts longer than it run in chunks
        self.max_queue = int(max_queue)
        if self.max_queue < 0:
            raise RequestError(f"max_queue must be >= 0, got {max_queue}")
        # submit() is the one admission gate (it answers QueueFull at once); the scheduler, which sees
        # requests only later, must not refuse what submit accepted, so its own queue limit is open
        self.scheduler = Scheduler(SchedulerConfig(policy=policy, token_budget=budget, n_slots=engine.cfg.n_slots,
                                                   max_queue=2**31 - 1, max_wait_steps=max_wait_steps,
                                                   chunked_prefill=True,
                                                   n_experts=engine.model.n_experts))
        self.metrics = metrics or LiveMetrics()
        self._rids = itertools.count()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._cancels: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[int, tuple[Handle, SamplingParams, Sequence[int]]] = {}
        self._n_inbox = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._accepting = True
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ any thread

    @property
    def n_waiting(self) -> int:
        """Requests that wait for a KV slot (queued ones that the free slots will take do not count)."""
        free = self.engine.cfg.n_slots - self.scheduler.n_running
        return max(0, self.scheduler.n_waiting + self._n_inbox - free)

    @property
    def n_running(self) -> int:
        return self.scheduler.n_running

    def submit(self, prompt_ids: Sequence[int], max_tokens: int, sampling: SamplingParams | None = None,
               listener: Callable[[tuple], None] | None = None) -> Handle:
        """Queue a request (validated now: RequestError, QueueFull, ShuttingDown); ``listener``: see
        :class:`Handle`."""
        sampling = sampling or SamplingParams()
        if not self._accepting:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        with self._lock:
            rid = next(self._rids)
            ids = self.engine.check_request(rid, prompt_ids, max_tokens, sampling)
            if self.n_waiting >= self.max_queue:
                self.metrics.rejected("queue_full")
                raise QueueFull(f"queue full: {self.n_waiting} requests waiting for a slot (max_queue="
                                f"{self.max_queue}); retry later")
            h = Handle(rid, int(ids.size), int(max_tokens), time.perf_counter(), listener=listener)
            self._handles[rid] = (h, sampling, ids)
            self._n_inbox += 1
            self._inbox.put(rid)
        self._wake.set()
        return h

    def cancel(self, rid: int) -> None:
        """Abort a request (its slot is freed before the next step); harmless when it already ended."""
        self._cancels.put(int(rid))
        if self._thread is None:  # no loop thread: the caller owns the loop, apply it now
            self._apply_cancels()
        self._wake.set()

    def start(self) -> "LiveEngine":
        """Run the loop in a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="readme-jax-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with ``drain`` finish the running and queued ones first."""
        self._accepting = False
        if not drain:
            for rid in list(self._handles):
                self.cancel(rid)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            while True:
                self._wake.clear()  # before looking for work: a submit or cancel after this sets it again
                if self.step():
                    continue
                if self._stop.is_set() and not self._handles:
                    return
                self._wake.wait()  # idle: sleep until a submit, a cancel or shutdown (no polling)
        except BaseException as e:  # noqa: BLE001 - the loop must not die silently: fail every request
            self.error = e
            for rid in list(self._handles):
                self._end(rid, None, error=f"engine failed: {e}")

    def step(self) -> bool:
        """Apply cancels, admit new requests, run one batch; False when there was nothing to run."""
        self._apply_cancels()
        self._admit()
        if not self.scheduler.has_work():
            return False
        now = time.perf_counter()
        batch = self.scheduler.next_batch(now_s=now)
        if not batch.items:
            return False
        t0 = time.perf_counter()
        out = self.engine.step(batch)
        t1 = time.perf_counter()
        self.metrics.step(len(batch.items), batch.n_tokens, batch.experts, t1 - t0)
        self.scheduler.on_step_done(batch, out.next_routes, t1)
        for rid, tok in out.tokens.items():
            h = self._handles[rid][0]
            if h.first_token_s is None:
                h.first_token_s = t1
            h.tokens.append(int(tok))
            h.emit(("token", int(tok)))
            if out.next_routes.get(rid) is None:
                eos = self.engine.cfg.eos_id
                self._end(rid, "stop" if eos is not None and tok == eos else "length")
        return True

    def run_until(self, handles: Sequence[Handle]) -> None:
        """Drive the loop in this thread until ``handles`` are done (no background thread may run)."""
        if self._thread is not None:
            raise ReadmeError("run_until: the loop runs in its own thread; wait on the handles' events instead")
        while not all(h.done for h in handles):
            if not self.step() and not all(h.done for h in handles):
                raise ReadmeError("run_until: no work left but requests are unfinished")

    @staticmethod
    def _drain(q: queue.SimpleQueue):
        """Every item queued so far, without blocking."""
        while True:
            try:
                yield q.get_nowait()
            except queue.Empty:
                return

    def _admit(self) -> None:
        for rid in self._drain(self._inbox):
            with self._lock:
                self._n_inbox -= 1
            if rid not in self._handles:  # cancelled before admission
                continue
            h, sp, ids = self._handles[rid]
            try:
                req = self.engine.new_request(rid, ids, h.max_tokens, arrival_s=h.arrival_s, sampling_params=sp)
            except ReadmeError as e:
                self._end(rid, None, error=str(e))
                continue
            if not self.scheduler.add(req):
                self.metrics.rejected("scheduler")
                self._end(rid, None, error=req.reject_reason)

    def _apply_cancels(self) -> None:
        for rid in self._drain(self._cancels):
            if rid in self._handles:
                self.scheduler.abort(rid)
                self._end(rid, "cancelled")

    def _end(self, rid: int, reason: str | None, error: str | None = None) -> None:
        entry = self._handles.pop(rid, None)
        self.engine.release(rid)
        if entry is None:
            return
        h = entry[0]
        h.finish_s = time.perf_counter()
        if error is not None:
            h.finish_reason = "error"
            h.emit(("error", error))
            return
        h.finish_reason = reason
        ttft = None if h.first_token_s is None else h.first_token_s - h.arrival_s
        self.metrics.finished(reason, ttft, h.finish_s - h.arrival_s, len(h.tokens))
        h.emit(("done", reason))


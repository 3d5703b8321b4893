"""Drivers of the engine: whole prompt lists to the end (``generate``, ``greedy_batch``, ``complete``)
and the engine behind the model-free simulator (``EngineRunner``)."""

from __future__ import annotations

from typing import Callable, Sequence

from readme_jax.config import EngineConfig, SamplingParams
from readme_jax.errors import RequestError
from readme_jax.serve.engine.engine import Engine
from readme_jax.serve.engine.step import ServedModel
from readme_jax.serve.scheduling.requests import Batch, Request
from readme_jax.serve.scheduling.scheduler import Scheduler, SchedulerConfig


class EngineRunner:
    """Puts an :class:`Engine` behind ``serve.sim.simulate`` (its ``runner``): real tokens and routes.

    A step's time is the engine's measured time (its calls) plus the prompt routing done at
    arrivals since the previous step; with ``cost_model`` it is ``cost_model(batch)`` instead (a
    virtual, deterministic clock for tests). ``steps`` keeps the measured parts.
    """

    def __init__(self, engine: Engine, sampling_params: SamplingParams | None = None, *,
                 cost_model: Callable[[Batch], float] | None = None, reset: bool = True):
        self.engine = engine
        self.sampling_params = sampling_params
        self.cost_model = cost_model
        if reset:
            engine.reset()
        self._router_s = 0.0
        self.steps: list[dict] = []

    def admit(self, spec) -> Request:
        r0 = self.engine.router_s
        try:
            return self.engine.new_request(spec.rid, spec.prompt_ids, spec.output_len, arrival_s=spec.arrival_s,
                                           sampling_params=self.sampling_params)
        finally:
            self._router_s += self.engine.router_s - r0

    def run(self, batch: Batch) -> tuple[float, dict]:
        out = self.engine.step(batch)
        rec = {"compute_s": out.compute_s, "stall_s": out.stall_s, "router_arrival_s": self._router_s,
               "n_prefill": len(batch.prefills), "n_decode": len(batch.decodes), "n_experts": len(batch.experts)}
        self.steps.append(rec)
        self._router_s = 0.0
        measured = rec["compute_s"] + rec["stall_s"] + rec["router_arrival_s"]
        return (measured if self.cost_model is None else float(self.cost_model(batch))), out.next_routes


def generate(engine: Engine, prompts: Sequence, max_new_tokens: int | Sequence[int],
             sampling_params: SamplingParams | None = None, *, policy: str = "fcfs",
             token_budget: int | None = None) -> list[list[int]]:
    """Generate for several prompts through a scheduler (all arriving at time 0; prompts longer than
    the budget run in chunks); returns the outputs."""
    engine.reset()
    n = len(prompts)
    mx = list(max_new_tokens) if isinstance(max_new_tokens, Sequence) else [int(max_new_tokens)] * n
    sched = Scheduler(SchedulerConfig(policy=policy, token_budget=token_budget or engine.cfg.token_budget,
                                      n_slots=engine.cfg.n_slots, max_queue=max(n, 1),
                                      n_experts=engine.model.n_experts, chunked_prefill=True))
    for i, p in enumerate(prompts):
        if not sched.add(engine.new_request(i, p, mx[i], sampling_params=sampling_params)):
            raise RequestError(f"request {i}: rejected by the scheduler")
    while sched.has_work():
        batch = sched.next_batch()
        out = engine.step(batch)
        sched.on_step_done(batch, out.next_routes, 0.0)
    return [engine.output(i) for i in range(n)]


def greedy_batch(model: ServedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 eos_id: int | None, n_slots: int = 16, progress: Callable[[int], None] | None = None
                 ) -> list[list[int]]:
    """Greedy continuations of many prompts (each ends with ``eos_id`` when the model closed it),
    ``n_slots`` at a time on ONE engine sized to the longest (one set of compiled shapes), prompts in
    chunks of 64 tokens: the main job's chat answers (chat_data, chat_eval). ``progress(n)`` is called
    with the number of prompts finished after each group of ``4 * n_slots``."""
    if not prompts:
        return []
    longest = max(len(p) for p in prompts)
    cfg = EngineConfig(n_slots=n_slots, max_len=longest + max_new_tokens, eos_id=eos_id, token_budget=64)
    engine = Engine(model, cfg)
    out: list[list[int]] = []
    group = 4 * n_slots
    for s in range(0, len(prompts), group):
        out += generate(engine, [list(p) for p in prompts[s:s + group]], max_new_tokens)
        if progress is not None:
            progress(len(out))
    return out


def complete(model: ServedModel, prompt_ids: Sequence[int], max_new_tokens: int, *, eos_id: int | None = None,
             sampling_params: SamplingParams | None = None) -> list[int]:
    """One prompt's continuation (greedy by default) on a one-slot engine sized to it; the new token ids."""
    n = len(prompt_ids)
    if n < 1 or max_new_tokens < 1:
        raise RequestError(f"complete: needs a non-empty prompt and max_new_tokens >= 1, got {n} and {max_new_tokens}")
    cfg = EngineConfig(n_slots=1, max_len=n + max_new_tokens, eos_id=eos_id, token_budget=max(1, min(n, 256)))
    return generate(Engine(model, cfg), [list(prompt_ids)], max_new_tokens, sampling_params)[0]

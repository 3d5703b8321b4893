"""Model-free serving simulation: a workload through a scheduler under a cost model.

Time per step = ``a_s + b_s_per_token * tokens + c_s_per_expert * unique_experts`` (all
MODELLED, not measured), plus simulated expert-transfer stalls when a store is given. The
generated tokens' routes come from the workload's synthetic routes, revealed to the
scheduler one token at a time, as a real engine would after sampling and routing.

Use it to compare policies without a model. With ``runner`` (e.g. ``serve.engine.EngineRunner``)
a real engine admits the requests, runs every batch and routes the sampled tokens; its step times
replace the cost model.

One bad request never stops the run: a request the engine refuses (RequestError: empty or too long
prompt, bad sampling parameters, ...) or whose spec is invalid is recorded in ``SimResult.invalid``
with its reason, one the scheduler cannot serve is REJECTED with ``reject_reason``, and
:meth:`SimResult.outcomes` gives every request's status and reason in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol, Sequence

from tqdm import tqdm

from readme_jax.config import SCHEDULER_POLICIES
from readme_jax.errors import ConfigError, DataError, ReadmeError, RequestError
from readme_jax.serve.scheduling.cache_policy import ExpertCache
from readme_jax.serve.scheduling.requests import Batch, Request, Status
from readme_jax.serve.scheduling.scheduler import Scheduler, SchedulerConfig
from readme_jax.serve.sim.transfer import ExpertStoreSim, StoreConfig
from readme_jax.serve.sim.workload import RequestSpec


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Modelled step time; the defaults are illustrative, not measured."""

    a_s: float = 0.02
    b_s_per_token: float = 0.001
    c_s_per_expert: float = 0.004

    def __call__(self, batch: Batch) -> float:
        return self.a_s + self.b_s_per_token * batch.n_tokens + self.c_s_per_expert * len(batch.experts)


class StepRunner(Protocol):
    """A real engine behind :func:`simulate` (see ``serve.engine.EngineRunner``)."""

    def admit(self, spec: RequestSpec) -> Request:
        """A new Request for ``spec`` (prompt routed); raise RequestError if it is invalid."""

    def run(self, batch: Batch) -> tuple[float, Mapping[int, int | None]]:
        """Run one batch: ``(step seconds, rid -> route of its new token or None when finished)``."""


@dataclasses.dataclass(frozen=True)
class StepRecord:
    step: int
    start_s: float  # batch formed
    end_s: float
    n_tokens: int
    n_prefill: int
    n_decode: int
    experts: frozenset
    compute_s: float  # modelled (cost model), or the runner's step time (measured, or its own cost model)
    stall_s: float  # simulated transfer stall (0 without a store)
    max_wait_steps: int  # longest wait of an item in this batch
    future: tuple = ()  # flattened lookahead accesses known at this step (if recorded)


@dataclasses.dataclass
class SimResult:
    requests: list[Request]  # every request, finished or rejected
    steps: list[StepRecord]
    batches: list[Batch]  # kept only with keep_batches=True
    probe_stats: dict  # (policy, capacity) -> CacheStats of the probe caches
    makespan_s: float
    invalid: dict = dataclasses.field(default_factory=dict)  # rid -> reason (RequestError at admission)

    def outcomes(self) -> dict[int, dict]:
        """``rid -> {"status", "reason"}`` for every request of the workload, by rid: ``finished``,
        ``rejected`` (the scheduler's reason, or the RequestError of an invalid request) or, for a
        request still open when the run stopped, its last status."""
        out = {r.rid: {"status": r.status.value, "reason": r.reject_reason} for r in self.requests}
        out.update({rid: {"status": Status.REJECTED.value, "reason": why} for rid, why in self.invalid.items()})
        return dict(sorted(out.items()))


def simulate(workload: Sequence[RequestSpec], scheduler: Scheduler, cost_model: CostModel = CostModel(), *,
             store: StoreConfig | None = None, cache_probes: Sequence[tuple[str, int]] = (),
             lookahead_steps: int = 8, record_future: bool = False, keep_batches: bool = False,
             max_steps: int = 10_000_000, progress: bool = False, seed: int = 0,
             runner: StepRunner | None = None) -> SimResult:
    """Run every request of ``workload`` to completion (or rejection).

    ``store``: an expert store whose simulated transfers add stalls to step times.
    ``cache_probes``: extra (policy, capacity) caches fed the same accesses, for hit ratios;
    Belady caches (store or probes) see the scheduler's ``lookahead_steps`` known future.
    ``runner``: a real engine; step times and routes come from it instead of ``cost_model`` and
    the specs' synthetic routes, and ``compute_s`` records its step times.
    """
    specs = sorted(workload, key=lambda s: (s.arrival_s, s.rid))
    for s in specs:
        if runner is None and (s.prompt_routes is None or s.output_routes is None
                               or len(s.output_routes) != s.output_len):
            raise DataError(f"simulate: request {s.rid} needs prompt_routes and output_routes of length "
                            f"{s.output_len} (generate_workload(..., with_routes=True))")
    if lookahead_steps < 0:
        raise ConfigError(f"lookahead_steps must be >= 0, got {lookahead_steps}")
    reqs: list[Request | None] = [None] * len(specs)  # made at arrival; None stays for an invalid one
    invalid: dict = {}
    out_routes = {s.rid: s.output_routes for s in specs}
    store_sim = ExpertStoreSim(store) if store is not None else None
    probes = {(p, c): ExpertCache(c, p, seed=seed) for p, c in cache_probes}
    need_future = record_future or any(p == "belady" for p, _ in probes) or (store is not None and store.policy == "belady")
    steps: list[StepRecord] = []
    batches: list[Batch] = []
    now = 0.0
    i = 0
    bar = tqdm(total=len(reqs), desc=f"simulate {scheduler.cfg.policy}", disable=not progress)
    while i < len(reqs) or scheduler.has_work():
        while i < len(reqs) and specs[i].arrival_s <= now:
            try:
                req = specs[i].to_request() if runner is None else runner.admit(specs[i])
                if not scheduler.add(req):  # REJECTED, with its reason
                    bar.update(1)
                reqs[i] = req
            except RequestError as e:  # invalid: recorded, and the run goes on
                invalid[specs[i].rid] = str(e)
                bar.update(1)
            i += 1
        batch = scheduler.next_batch(now_s=now)
        if not batch.items:
            if i < len(reqs):  # idle until the next arrival
                now = max(now, specs[i].arrival_s)
                continue
            if not scheduler.has_work():  # the last arrivals were invalid or rejected: done
                break
            raise ReadmeError("simulate: scheduler has work but formed an empty batch")
        if len(steps) >= max_steps:
            raise ReadmeError(f"simulate: exceeded max_steps={max_steps}")
        future = ()
        if need_future:
            future = tuple(e for s in scheduler.lookahead(lookahead_steps) for e in sorted(s))
        experts = batch.experts
        if runner is None:
            compute = float(cost_model(batch))
        else:
            compute, next_routes = runner.run(batch)
            compute = float(compute)
        if store_sim is not None:
            timing = store_sim.step(experts, future, now, compute)
            end, stall = timing.end_s, timing.stall_s
        else:
            end, stall = now + compute, 0.0
        for cache in probes.values():
            cache.access_step(experts, future if cache.policy == "belady" else ())
        if runner is None:
            next_routes = {}
            for it in batch.items:
                g = it.request.n_generated + 1  # tokens generated after this step
                routes = out_routes[it.rid]
                next_routes[it.rid] = int(routes[g - 1]) if g < len(routes) else None
        done = scheduler.on_step_done(batch, next_routes, end)
        bar.update(len(done))
        steps.append(StepRecord(batch.step, now, end, batch.n_tokens, len(batch.prefills), len(batch.decodes),
                                experts, compute, stall, max(it.wait_steps for it in batch.items),
                                future if record_future else ()))
        if keep_batches:
            batches.append(batch)
        now = end
    bar.close()
    reqs = [r for r in reqs if r is not None]  # invalid requests have no Request (see ``invalid``)
    return SimResult(reqs, steps, batches, {k: c.stats for k, c in probes.items()}, now, invalid)


def run_policies(workload: Sequence[RequestSpec], cfg: SchedulerConfig,
                 policies: Sequence[str] = SCHEDULER_POLICIES, cost_model: CostModel = CostModel(),
                 **kw) -> dict[str, SimResult]:
    """The same workload under each policy (same budget, slots, queue and age bound)."""
    return {p: simulate(workload, Scheduler(dataclasses.replace(cfg, policy=p)), cost_model, **kw)
            for p in policies}

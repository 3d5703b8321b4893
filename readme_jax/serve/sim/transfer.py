"""Simulated host-to-accelerator expert transfers: on-demand loading vs prefetching.

On this CPU there is no separate device memory, so expert loads are SIMULATED: a load takes
``latency_s + expert_bytes / bandwidth_bytes_per_s`` on one link (loads are serial). Compute
times are whatever the caller measured (real engine) or modelled (cost model); every time
this module returns that includes loads is simulated and must be labelled so.

Timeline of step t (one compute stream, one copy stream):

* on demand: the step's missing experts load after step t-1 finishes computing, then t computes;
* prefetch: loads for step t start when step t-1 STARTS computing, overlapping it. This is an
  idealisation: it assumes step t's experts are known when t-1 starts. In Read-ME the routes of
  all queued work are known then, but the tokens sampled by step t-1 are routed only at its end.
  A load whose victim is an expert of step t-1 or t (``n_blocked``) cannot evict it while in
  use, so it waits for step t-1 to finish, as on demand.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from readme_jax.errors import ConfigError
from readme_jax.serve.scheduling.cache_policy import ExpertCache


@dataclasses.dataclass(frozen=True)
class LinkModel:
    """A simulated host->device link."""

    bandwidth_bytes_per_s: float
    expert_bytes: int
    latency_s: float = 0.0

    def __post_init__(self):
        if not (self.bandwidth_bytes_per_s > 0):
            raise ConfigError(f"link bandwidth_bytes_per_s must be > 0, got {self.bandwidth_bytes_per_s!r}")
        if self.expert_bytes < 0 or self.latency_s < 0:
            raise ConfigError(
                f"link expert_bytes and latency_s must be >= 0, got {self.expert_bytes!r}, {self.latency_s!r}"
            )

    @property
    def load_s(self) -> float:
        """Simulated seconds to move one expert."""
        return self.latency_s + self.expert_bytes / self.bandwidth_bytes_per_s


class StepTiming(NamedTuple):
    start_s: float  # when the step could begin (batch known and previous compute done)
    compute_start_s: float
    end_s: float
    stall_s: float  # compute_start_s - start_s: time waiting for loads (simulated)
    n_loads: int


class TransferTimeline:
    """Advance one step at a time; keeps the link and compute streams' clocks."""

    def __init__(self, link: LinkModel, prefetch: bool):
        self.link = link
        self.prefetch = bool(prefetch)
        self._prev_compute_start = 0.0
        self._prev_compute_end = 0.0
        self._link_free = 0.0

    def step(self, ready_s: float, n_loads: int, n_blocked: int, compute_s: float) -> StepTiming:
        """Schedule a step whose batch is known at ``ready_s``.

        ``n_loads`` experts must be loaded before it computes; ``n_blocked`` of them evict an
        expert in use by this or the previous step. ``compute_s`` is the step's compute time.
        """
        if not 0 <= n_blocked <= n_loads:
            raise ConfigError(f"need 0 <= n_blocked <= n_loads, got n_blocked={n_blocked}, n_loads={n_loads}")
        if compute_s < 0:
            raise ConfigError(f"compute_s must be >= 0, got {compute_s}")
        start = max(ready_s, self._prev_compute_end)
        idle = ready_s > self._prev_compute_end  # nothing was known while the previous step ran
        t = self._link_free
        if self.prefetch and not idle:
            t = max(t, self._prev_compute_start) + (n_loads - n_blocked) * self.link.load_s
            if n_blocked:
                t = max(t, start) + n_blocked * self.link.load_s
        else:
            t = max(t, start) + n_loads * self.link.load_s
        if n_loads:
            self._link_free = t
        compute_start = max(start, t) if n_loads else start
        end = compute_start + compute_s
        self._prev_compute_start, self._prev_compute_end = compute_start, end
        return StepTiming(start, compute_start, end, compute_start - start, n_loads)


class PrefetchReport(NamedTuple):
    on_demand_step_s: np.ndarray  # per step: end_t - end_{t-1} (simulated)
    prefetch_step_s: np.ndarray
    on_demand_total_s: float
    prefetch_total_s: float


def compare_prefetch(n_loads: Sequence[int], compute_s: Sequence[float], link: LinkModel,
                     n_blocked: Sequence[int] | None = None) -> PrefetchReport:
    """Back-to-back steps (each batch ready when the previous step ends) timed both ways."""
    if len(n_loads) != len(compute_s):
        raise ConfigError(f"compare_prefetch: {len(n_loads)} load counts but {len(compute_s)} compute times")
    blocked = [0] * len(n_loads) if n_blocked is None else list(n_blocked)
    if len(blocked) != len(n_loads):
        raise ConfigError(f"compare_prefetch: {len(blocked)} blocked counts for {len(n_loads)} steps")
    out = []
    for prefetch in (False, True):
        tl = TransferTimeline(link, prefetch)
        ends = [0.0]
        for n, b, c in zip(n_loads, blocked, compute_s):
            ends.append(tl.step(ends[-1], int(n), int(b), float(c)).end_s)
        out.append(np.diff(np.asarray(ends)))
    return PrefetchReport(out[0], out[1], float(out[0].sum()), float(out[1].sum()))


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """An expert store: ``capacity`` whole experts on the device, the rest in host memory."""

    capacity: int = 4
    policy: str = "belady"
    bandwidth_bytes_per_s: float = 16e9  # simulated link (about PCIe 4.0 x16 order); our choice
    expert_bytes: int = 0  # 0: transfers cost only latency_s
    latency_s: float = 0.0
    prefetch: bool = True
    seed: int = 0


class ExpertStoreSim:
    """A cache plus a simulated link: ``step`` returns the simulated timing of one batch."""

    def __init__(self, cfg: StoreConfig):
        self.cfg = cfg
        self.cache = ExpertCache(cfg.capacity, cfg.policy, seed=cfg.seed)
        self.timeline = TransferTimeline(LinkModel(cfg.bandwidth_bytes_per_s, cfg.expert_bytes, cfg.latency_s),
                                         cfg.prefetch)
        self._prev_experts: frozenset = frozenset()

    def step(self, experts: Iterable[int], future: Sequence[int], ready_s: float, compute_s: float) -> StepTiming:
        experts = frozenset(int(e) for e in experts)
        accesses = self.cache.access_step(experts, future)
        misses = [a for a in accesses if not a.hit]
        busy = experts | self._prev_experts
        blocked = sum(1 for a in misses if a.evicted is not None and a.evicted in busy)
        self._prev_experts = experts
        return self.timeline.step(ready_s, len(misses), blocked, compute_s)

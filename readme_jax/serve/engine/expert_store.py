"""A real expert store: experts in host memory, a device pool of ``capacity`` experts, real copies.

Each expert's own weights (``wg, wu: [L, D, Fe]``, ``wd: [L, Fe, D]``; the shared part and
attention stay on the device) live in host memory: memory kind ``pinned_host`` where the
device has it (CPU and GPU backends do), plain numpy elsewhere. At most ``capacity`` experts
are on the device, each in its own buffers (one ``jax.device_put`` per load, so loading one
expert never rewrites another's memory). The engine hands a call's experts to the FFN as its
expert slots, a tuple of buffers, and the tokens' expert ids as indices into it
(serve/engine/experts.py).

* ``acquire(experts, future)``: make a call's experts resident (the engine cuts steps into
  calls of at most ``capacity`` experts, serve/engine/calls.py), loading misses on demand and
  evicting by the policy (never an expert of the call), then WAIT for every copy the call
  needs. That wait is the measured stall. A call over ``capacity`` experts (not made by the
  engine, whose calls fit) would get its extra experts copied for that call alone
  (``stats.transient_loads``, misses).
* ``prefetch(future, busy)``: with ``prefetch=True``, start the copies of the experts the
  nearest future call needs, while the current call computes (``jax.device_put`` returns
  before the copy ends). It evicts only experts outside ``busy`` (the call in flight) and
  outside that future call. So that there is always such a slot, the engine plans calls of
  at most ``capacity - 1`` experts when prefetching (``max_call_experts``).

Hits and misses are counted by :class:`readme_jax.serve.scheduling.cache_policy.ExpertCache` (a
prefetched expert's use is a hit; ``stats.prefetches`` counts the loads started ahead).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Sequence

import jax
import numpy as np

from readme_jax.errors import ConfigError
from readme_jax.model.readme_model import ReadMEModel
from readme_jax.serve.engine.experts import EXPERT_KEYS
from readme_jax.serve.scheduling.cache_policy import ExpertCache, Use



@dataclasses.dataclass
class StoreStats:
    calls: int = 0
    demand_loads: int = 0  # copies started because a call needed an absent expert
    prefetch_loads: int = 0  # copies started ahead of use
    transient_loads: int = 0  # copies for one call only: a call needing more experts than the pool holds
    stall_s: float = 0.0  # measured: waiting for expert copies before calls
    bytes_copied: int = 0


class ExpertStore:
    """Host-resident experts and a device pool of ``capacity`` of them (see the module doc)."""

    def __init__(self, model: ReadMEModel, capacity: int, policy: str = "belady", *, prefetch: bool = False,
                 seed: int = 0, device=None):
        if not getattr(model, "is_moe", False):
            raise ConfigError("expert store: needs a Read-ME model (a dense model has no experts to offload)")
        E = model.n_experts
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or not 1 <= capacity <= E:
            raise ConfigError(f"expert store capacity must be an integer in [1, n_experts={E}], got {capacity!r}")
        self.cache = ExpertCache(int(capacity), policy, seed=seed)  # checks the policy, before any copy
        self.capacity, self.policy, self.prefetch_enabled = int(capacity), policy, bool(prefetch)
        self.n_experts = E
        self.device = device or jax.devices()[0]
        kinds = {m.kind for m in self.device.addressable_memories()}
        self.host_kind = "pinned_host" if "pinned_host" in kinds else None
        params = model.backbone_params
        layers = params["layers"]
        base = {k: v for k, v in params.items() if k != "layers"}
        base["layers"] = {k: v for k, v in layers.items() if k not in EXPERT_KEYS}
        self.base_params = jax.device_put(base, self.device)  # attention, norms, shared part: always resident
        host = (jax.sharding.SingleDeviceSharding(self.device, memory_kind=self.host_kind)
                if self.host_kind else None)
        self._dev = jax.sharding.SingleDeviceSharding(self.device)
        stacks = {n: np.asarray(layers[n]) for n in EXPERT_KEYS}  # [L, E, ...] each, read once
        self._host = []
        for e in range(E):
            arrays = {n: np.ascontiguousarray(a[:, e]) for n, a in stacks.items()}
            self._host.append({n: jax.device_put(a, host) for n, a in arrays.items()} if host else arrays)
        self.expert_bytes = int(sum(a[:, 0].nbytes for a in stacks.values()))
        self._buf: dict[int, dict] = {}  # resident expert -> its device buffers (maybe still copying)
        self.stats = StoreStats()
        self.calls_log: list[frozenset] = []  # each call's pooled experts (the cache's uses), in order

    @property
    def max_call_experts(self) -> int:
        """Experts per call the engine plans for: with prefetch, one pool slot is kept for the
        incoming copy (a call using every slot leaves nothing a prefetch may evict)."""
        return self.capacity - 1 if (self.prefetch_enabled and self.capacity > 1) else self.capacity

    @property
    def uses_future(self) -> bool:
        """Whether the known future changes anything (prefetch, or Belady's eviction)."""
        return self.prefetch_enabled or self.policy == "belady"

    @property
    def resident(self) -> frozenset:
        return self.cache.resident

    def scratch_pool(self) -> tuple[dict, ...]:
        """``capacity`` references to one device copy of expert 0, outside the cache (no stats):
        the pool shape the step compiles for, for compiling ahead and timing."""
        buf = jax.device_put(self._host[0], self._dev)
        return (buf,) * self.capacity

    def _load(self, e: int) -> None:
        self._buf[e] = jax.device_put(self._host[e], self._dev)  # asynchronous: returns before the copy ends
        self.stats.bytes_copied += self.expert_bytes

    def _evict(self, victim: int | None) -> None:
        if victim is not None:
            self._buf.pop(victim, None)  # a call in flight keeps its own reference until it ends

    def acquire(self, experts: Iterable[int], future: Sequence[Use] = ()) -> tuple[dict, ...]:
        """The call's experts' device buffers in ascending id order, every copy finished (timed)."""
        want = sorted({int(e) for e in experts})
        t0 = time.perf_counter()
        self.stats.calls += 1
        order = [e for e in want if e in self.resident] + [e for e in want if e not in self.resident]
        pooled, extra = order[:self.capacity], order[self.capacity:]
        fut = future if self.policy == "belady" else ()
        self.calls_log.append(frozenset(pooled))
        for e in pooled:
            acc = self.cache.access(e, fut, protected=pooled)
            self._evict(acc.evicted)
            if not acc.hit:
                self._load(e)
                self.stats.demand_loads += 1
        transient = {}
        for e in extra:  # over capacity (one prompt spanning more experts than the pool): this call only
            transient[e] = jax.device_put(self._host[e], self._dev)
            self.stats.transient_loads += 1
            self.stats.bytes_copied += self.expert_bytes
            self.cache.stats.misses += 1
        bufs = tuple(transient[e] if e in transient else self._buf[e] for e in want)
        jax.block_until_ready(bufs)
        self.stats.stall_s += time.perf_counter() - t0
        return bufs

    def prefetch(self, future: Sequence[Use], busy: Iterable[int] = ()) -> int:
        """Start copies of the nearest future call's absent experts; returns how many started."""
        if not self.prefetch_enabled or not future:
            return 0
        nxt = future[0]
        nxt = set(nxt) if isinstance(nxt, (set, frozenset)) else {int(nxt)}
        keep = set(int(e) for e in busy) | nxt
        fut = future if self.policy == "belady" else ()
        started = 0
        for e in sorted(nxt - self.resident)[:self.capacity]:
            acc = self.cache.prefetch(e, fut, protected=keep)
            if acc is None:
                break
            self._evict(acc.evicted)
            self._load(e)
            self.stats.prefetch_loads += 1
            started += 1
        return started

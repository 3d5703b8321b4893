"""Which experts stay on the accelerator: replacement policies for an expert cache.

The cache unit is a WHOLE expert (its slices in every layer): Read-ME routes a token to one
expert for all layers, so a step needs the same expert ids in every layer. The permanent
(always-on) expert is not cached here; it is always resident.

A step accesses the SET of unique experts of its batch, in ascending id order; each expert
access is one hit or one miss (hit ratio = hits / expert accesses). The cache starts empty,
so first uses are misses for every policy.

Policies: ``belady`` evicts the resident expert whose next use in the known ``future`` is
farthest (never used: infinitely far); ties go to the least recently used, then the smallest
id. With the whole future known this is Belady's MIN, the offline optimum for uniform-cost
demand paging; :func:`optimal_misses_bruteforce` checks that independently on small cases.
``lru``, ``fifo`` and ``random`` (seeded, uniform over the residents sorted by id) ignore
``future``.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from readme_jax.config import CACHE_POLICIES
from readme_jax.errors import ConfigError, ReadmeError



class Access(NamedTuple):
    expert: int
    hit: bool
    evicted: int | None  # the expert removed to make room, if any


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.accesses if self.accesses else float("nan")


class ExpertCache:
    """At most ``capacity`` experts resident; ``access`` loads on a miss and evicts by ``policy``."""

    def __init__(self, capacity: int, policy: str = "belady", *, seed: int = 0):
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ConfigError(f"expert cache capacity must be an integer >= 1, got {capacity!r}")
        if policy not in CACHE_POLICIES:
            raise ConfigError(f"unknown expert cache policy {policy!r}; expected one of {', '.join(CACHE_POLICIES)}")
        self.capacity = int(capacity)
        self.policy = policy
        self._rng = np.random.default_rng(seed)
        self._last_use: dict[int, int] = {}  # resident expert -> time of last access
        self._loaded_at: dict[int, int] = {}  # resident expert -> time it was loaded
        self._time = 0
        self.stats = CacheStats()

    @property
    def resident(self) -> frozenset:
        return frozenset(self._last_use)

    def access(self, expert: int, future: Sequence[int] = ()) -> Access:
        """Use ``expert`` now. ``future``: the known upcoming accesses, nearest first (belady only)."""
        expert = int(expert)
        if expert < 0:
            raise ReadmeError(f"expert id must be >= 0, got {expert}")
        self._time += 1
        if expert in self._last_use:
            self._last_use[expert] = self._time
            self.stats.hits += 1
            return Access(expert, True, None)
        self.stats.misses += 1
        victim = None
        if len(self._last_use) >= self.capacity:
            victim = self._victim(future)
            del self._last_use[victim]
            del self._loaded_at[victim]
            self.stats.evictions += 1
        self._last_use[expert] = self._time
        self._loaded_at[expert] = self._time
        return Access(expert, False, victim)

    def access_step(self, experts: Iterable[int], future: Sequence[int] = ()) -> list[Access]:
        """Access a step's unique experts in ascending order; later ones in the step count as future."""
        order = sorted({int(e) for e in experts})
        out = []
        for i, e in enumerate(order):
            fut = order[i + 1:] + list(future) if self.policy == "belady" else ()
            out.append(self.access(e, fut))
        return out

    def _victim(self, future: Sequence[int]) -> int:
        residents = sorted(self._last_use)
        if self.policy == "lru":
            return min(residents, key=lambda e: (self._last_use[e], e))
        if self.policy == "fifo":
            return min(residents, key=lambda e: (self._loaded_at[e], e))
        if self.policy == "random":
            return residents[int(self._rng.integers(len(residents)))]
        # belady: farthest next use; never used again = infinitely far
        next_use = {}
        for i, e in enumerate(future):
            e = int(e)
            if e in self._last_use and e not in next_use:
                next_use[e] = i
                if len(next_use) == len(residents):
                    break
        inf = len(future) + 1
        return max(residents, key=lambda e: (next_use.get(e, inf), -self._last_use[e], -e))


def step_access_sequence(step_sets: Sequence[Iterable[int]]) -> list[int]:
    """Flatten per-step expert sets into the access order used by :meth:`ExpertCache.access_step`."""
    return [e for s in step_sets for e in sorted({int(x) for x in s})]


def simulate_cache(step_sets: Sequence[Iterable[int]], capacity: int, policy: str, *, seed: int = 0,
                   futures: Sequence[Sequence[int]] | None = None) -> CacheStats:
    """Run a cache over per-step expert sets.

    For ``belady``, ``futures[t]`` is what is known at step t about later accesses (the
    scheduler's lookahead); ``None`` means the whole remaining sequence (offline optimum).
    """
    cache = ExpertCache(capacity, policy, seed=seed)
    sets = [sorted({int(x) for x in s}) for s in step_sets]
    if futures is not None and len(futures) != len(sets):
        raise ReadmeError(f"simulate_cache: {len(futures)} futures given for {len(sets)} steps")
    if policy == "belady" and futures is None:
        return _belady_offline(step_access_sequence(sets), cache.capacity)
    for t, s in enumerate(sets):
        cache.access_step(s, futures[t] if (futures is not None and policy == "belady") else ())
    return cache.stats


def _belady_offline(flat: Sequence[int], capacity: int) -> CacheStats:
    """Belady with the whole future, in O(n log n) via precomputed next-use indices.

    Same rule and tie-break as :class:`ExpertCache` given the whole remaining sequence.
    """
    n = len(flat)
    nxt = [n + 1] * n  # n + 1 = never used again
    last_pos: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        nxt[i] = last_pos.get(flat[i], n + 1)
        last_pos[flat[i]] = i
    stats = CacheStats()
    resident: dict[int, tuple[int, int]] = {}  # expert -> (next use, last use)
    heap: list[tuple[int, int, int]] = []  # (-next use, last use, expert); stale entries skipped
    for i, e in enumerate(flat):
        if e in resident:
            stats.hits += 1
        else:
            stats.misses += 1
            if len(resident) >= capacity:
                while True:
                    negnext, last, v = heapq.heappop(heap)
                    if resident.get(v) == (-negnext, last):
                        break
                del resident[v]
                stats.evictions += 1
        resident[e] = (nxt[i], i)
        heapq.heappush(heap, (-nxt[i], i, e))
    return stats


def offline_optimum_misses(seq: Sequence[int], capacity: int) -> int:
    """Fewest misses any replacement policy can achieve on ``seq`` (Belady's MIN, whole future known)."""
    stats = simulate_cache([[e] for e in seq], capacity, "belady")
    return stats.misses


def optimal_misses_bruteforce(seq: Sequence[int], capacity: int, *, max_states: int = 200_000) -> int:
    """Minimum misses over every eviction choice, by dynamic programming over resident sets.

    Independent of Belady's rule (used to test it). Demand paging: load only on a miss,
    evict only when full. Exponential in the number of experts: small cases only.
    """
    if capacity < 1:
        raise ConfigError(f"capacity must be >= 1, got {capacity}")
    states: dict[frozenset, int] = {frozenset(): 0}
    for x in seq:
        x = int(x)
        nxt: dict[frozenset, int] = {}
        for s, cost in states.items():
            if x in s:
                cands = [(s, cost)]
            elif len(s) < capacity:
                cands = [(s | {x}, cost + 1)]
            else:
                cands = [((s - {v}) | {x}, cost + 1) for v in s]
            for ns, c in cands:
                if c < nxt.get(ns, c + 1):
                    nxt[ns] = c
        states = nxt
        if len(states) > max_states:
            raise ReadmeError(
                f"optimal_misses_bruteforce: {len(states)} cache states exceed max_states={max_states}; "
                f"use a shorter sequence or fewer experts"
            )
    return min(states.values())

"""Which experts stay on the accelerator: replacement policies for an expert cache.

The cache unit is a WHOLE expert (its slices in every layer): Read-ME routes a token to one
expert for all layers, so a step needs the same expert ids in every layer. The permanent
(always-on) expert is not cached here; it is always resident.

A step uses the SET of unique experts of its batch. A call can only run with all its experts
resident at once, so a step is cut into calls of at most ``capacity`` experts, resident experts
first (then ascending ids): :func:`split_calls`. Within a call its experts are protected (none
evicts another), so a call's hits are exactly its experts already resident, whatever the
order. Each expert use is one hit or one miss (hit ratio = hits / uses). The cache starts
empty, so first uses are misses for every policy. (Before, a step's experts were accessed one
by one in ascending order and LRU/FIFO/random could evict an expert the same step still
needed; :func:`step_hits_bruteforce` is the independent reference for the new accounting.)

Policies: ``belady`` evicts the resident expert whose next use in the known ``future`` is
farthest (never used: infinitely far); ties go to the least recently used, then the smallest
id. ``future`` lists upcoming uses nearest first, each an expert id or a set of them (one
call). With the whole future known this is Belady's MIN, the offline optimum for
uniform-cost demand paging; :func:`optimal_misses_bruteforce` checks that independently on
small cases, per access and per call.
``lru``, ``fifo`` and ``random`` (seeded, uniform over the residents sorted by id) ignore
``future``.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from typing import Iterable, NamedTuple, Sequence, Union

import numpy as np

from readme_jax.config import CACHE_POLICIES
from readme_jax.errors import ConfigError, ReadmeError



Use = Union[int, frozenset, set]  # one upcoming use: an expert id, or the set of one call's experts


def _uses(f: Use, e: int) -> bool:
    return e in f if isinstance(f, (set, frozenset)) else int(f) == e


class Access(NamedTuple):
    expert: int
    hit: bool
    evicted: int | None  # the expert removed to make room, if any


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetches: int = 0  # loads started ahead of use (not accesses: a prefetched expert's use is a hit)

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

    def access(self, expert: int, future: Sequence[Use] = (), protected: Iterable[int] = ()) -> Access:
        """Use ``expert`` now. ``future``: the known upcoming uses, nearest first (belady only);
        ``protected``: residents that must not be evicted (the rest of the current call)."""
        expert = int(expert)
        if expert < 0:
            raise ReadmeError(f"expert id must be >= 0, got {expert}")
        self._time += 1
        if expert in self._last_use:
            self._last_use[expert] = self._time
            self.stats.hits += 1
            return Access(expert, True, None)
        self.stats.misses += 1
        victim = self._make_room(future, protected, expert)
        if victim is _NO_ROOM:
            raise ReadmeError(f"expert cache: all {self.capacity} residents are protected; cannot load {expert}")
        self._last_use[expert] = self._time
        self._loaded_at[expert] = self._time
        return Access(expert, False, victim)

    def prefetch(self, expert: int, future: Sequence[Use] = (), protected: Iterable[int] = ()) -> Access | None:
        """Load ``expert`` ahead of its use (no hit or miss is counted). Returns None when it is
        already resident or every resident is protected (nothing may be evicted for it)."""
        expert = int(expert)
        if expert in self._last_use:
            return None
        victim = self._make_room(future, protected, expert)
        if victim is _NO_ROOM:
            return None
        self._time += 1
        self._last_use[expert] = self._time
        self._loaded_at[expert] = self._time
        self.stats.prefetches += 1
        return Access(expert, False, victim)

    def _make_room(self, future, protected, incoming):
        if len(self._last_use) < self.capacity:
            return None
        keep = {int(e) for e in protected} | {incoming}
        cands = sorted(e for e in self._last_use if e not in keep)
        if not cands:
            return _NO_ROOM
        victim = self._victim(cands, future)
        del self._last_use[victim]
        del self._loaded_at[victim]
        self.stats.evictions += 1
        return victim

    def access_step(self, experts: Iterable[int], future: Sequence[Use] = ()) -> list[Access]:
        """Use a step's unique experts: cut into calls (:func:`split_calls`), each call's experts
        protected while it loads; later calls of the step count as nearest future."""
        calls = split_calls(experts, self.resident, self.capacity)
        out = []
        for i, call in enumerate(calls):
            fut = [frozenset(c) for c in calls[i + 1:]] + list(future) if self.policy == "belady" else ()
            for e in call:
                out.append(self.access(e, fut, protected=call))
        return out

    def _victim(self, cands: list, future: Sequence[Use]) -> int:
        if self.policy == "lru":
            return min(cands, key=lambda e: (self._last_use[e], e))
        if self.policy == "fifo":
            return min(cands, key=lambda e: (self._loaded_at[e], e))
        if self.policy == "random":
            return cands[int(self._rng.integers(len(cands)))]
        # belady: farthest next use; never used again = infinitely far
        next_use: dict = {}
        for i, f in enumerate(future):
            for e in cands:
                if e not in next_use and _uses(f, e):
                    next_use[e] = i
            if len(next_use) == len(cands):
                break
        inf = len(future) + 1
        return max(cands, key=lambda e: (next_use.get(e, inf), -self._last_use[e], -e))


_NO_ROOM = object()


def split_calls(experts: Iterable[int], resident: Iterable[int], capacity: int) -> list[list[int]]:
    """Cut one step's expert set into calls of at most ``capacity`` experts: resident experts
    first, then the rest, each in ascending id order."""
    s = sorted({int(e) for e in experts})
    res = set(int(e) for e in resident)
    order = [e for e in s if e in res] + [e for e in s if e not in res]
    return [order[i:i + capacity] for i in range(0, len(order), capacity)]


def step_access_sequence(step_sets: Sequence[Iterable[int]]) -> list[int]:
    """Flatten per-step expert sets (each in ascending order): a lookahead as single uses."""
    return [e for s in step_sets for e in sorted({int(x) for x in s})]


def simulate_cache(step_sets: Sequence[Iterable[int]], capacity: int, policy: str, *, seed: int = 0,
                   futures: Sequence[Sequence[Use]] | None = None) -> CacheStats:
    """Run a cache over per-step expert sets (:meth:`ExpertCache.access_step` per step).

    For ``belady``, ``futures[t]`` is what is known at step t about later uses (the
    scheduler's lookahead); ``None`` means every later step's set (offline).
    """
    cache = ExpertCache(capacity, policy, seed=seed)
    sets = [frozenset(int(x) for x in s) for s in step_sets]
    if futures is not None and len(futures) != len(sets):
        raise ReadmeError(f"simulate_cache: {len(futures)} futures given for {len(sets)} steps")
    for t, s in enumerate(sets):
        fut = () if policy != "belady" else (sets[t + 1:] if futures is None else futures[t])
        cache.access_step(s, fut)
    return cache.stats


def step_hits_bruteforce(step_sets: Sequence[Iterable[int]], capacity: int, policy: str) -> tuple[int, int]:
    """``(hits, misses)`` of ``lru`` or ``fifo`` on per-step sets, by a plain list simulation
    written apart from :class:`ExpertCache`: each step is cut into calls of at most
    ``capacity`` experts (resident first, then ascending), a call's residents are hits,
    each missing expert evicts the oldest (by last use, or by load time) resident not in the call."""
    if policy not in ("lru", "fifo"):
        raise ConfigError(f"step_hits_bruteforce: lru or fifo, got {policy!r}")
    order: list[int] = []  # residents, oldest first (by last use for lru, by load for fifo)
    hits = misses = 0
    for s in step_sets:
        s = sorted({int(e) for e in s})
        first = [e for e in s if e in order] + [e for e in s if e not in order]
        for i in range(0, len(first), capacity):
            call = first[i:i + capacity]
            for e in call:
                if e in order:
                    hits += 1
                    if policy == "lru":
                        order.remove(e)
                        order.append(e)
                    continue
                misses += 1
                if len(order) >= capacity:
                    order.remove(next(r for r in order if r not in call))
                order.append(e)
    return hits, misses


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
    return _belady_offline([int(e) for e in seq], capacity).misses


def optimal_misses_bruteforce(seq: Sequence[Use], capacity: int, *, max_states: int = 200_000) -> int:
    """Minimum misses over every eviction choice, by dynamic programming over resident sets.

    ``seq`` holds expert ids, or sets of them (one call: all resident together, at most
    ``capacity``). Independent of Belady's rule (used to test it). Demand paging: load only on
    a miss, evict only when full. Exponential in the number of experts: small cases only.
    """
    if capacity < 1:
        raise ConfigError(f"capacity must be >= 1, got {capacity}")
    states: dict[frozenset, int] = {frozenset(): 0}
    for x in seq:
        need_all = frozenset(int(e) for e in x) if isinstance(x, (set, frozenset)) else frozenset({int(x)})
        if len(need_all) > capacity:
            raise ConfigError(f"optimal_misses_bruteforce: a call of {len(need_all)} experts exceeds capacity {capacity}")
        nxt: dict[frozenset, int] = {}
        for s, cost in states.items():
            missing = len(need_all - s)
            union = s | need_all
            if len(union) <= capacity:
                cands = [union]
            else:
                others = sorted(s - need_all)
                cands = [need_all | frozenset(keep) for keep in itertools.combinations(others, capacity - len(need_all))]
            for ns in cands:
                c = cost + missing
                if c < nxt.get(ns, c + 1):
                    nxt[ns] = c
        states = nxt
        if len(states) > max_states:
            raise ReadmeError(
                f"optimal_misses_bruteforce: {len(states)} cache states exceed max_states={max_states}; "
                f"use a shorter sequence or fewer experts"
            )
    return min(states.values())

"""Expert cache policies against independent references, and the simulated transfer timeline."""

import collections
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from readme_jax.errors import ConfigError, ReadmeError
from readme_jax.serve.scheduling.cache_policy import (ExpertCache, offline_optimum_misses, optimal_misses_bruteforce,
                                           simulate_cache, split_calls, step_access_sequence,
                                           step_hits_bruteforce)
from readme_jax.serve.sim.transfer import (ExpertStoreSim, LinkModel, StoreConfig, TransferTimeline,
                                       compare_prefetch)

seqs = st.lists(st.integers(0, 5), min_size=0, max_size=16)


def belady_misses_online(seq, cap):
    c = ExpertCache(cap, "belady")
    for i, e in enumerate(seq):
        c.access(e, seq[i + 1:])
    return c.stats.misses


# ----------------------------------------------------------------------------- Belady = optimum


def test_belady_equals_bruteforce_optimum_exhaustive():
    for n, length in ((3, 7), (4, 6)):
        for seq in itertools.product(range(n), repeat=length):
            for cap in range(1, n):
                opt = optimal_misses_bruteforce(seq, cap)
                assert belady_misses_online(list(seq), cap) == opt, (seq, cap)


@settings(max_examples=150, deadline=None)
@given(seq=seqs, cap=st.integers(1, 4))
def test_belady_equals_bruteforce_optimum_random(seq, cap):
    opt = optimal_misses_bruteforce(seq, cap)
    assert belady_misses_online(seq, cap) == opt
    assert offline_optimum_misses(seq, cap) == opt


calls = st.lists(st.sets(st.integers(0, 5), min_size=1, max_size=3), max_size=10)


@settings(max_examples=150, deadline=None)
@given(sets=calls, cap=st.integers(3, 4))
def test_belady_over_calls_equals_bruteforce_optimum(sets, cap):
    # each step fits one call: Belady with every later call as its future is the optimum
    best = optimal_misses_bruteforce([frozenset(s) for s in sets], cap)
    assert simulate_cache(sets, cap, "belady").misses == best
    for policy in ("lru", "fifo", "random"):
        assert simulate_cache(sets, cap, policy, seed=3).misses >= best


@settings(max_examples=150, deadline=None)
@given(sets=st.lists(st.sets(st.integers(0, 6), max_size=5), max_size=25), cap=st.integers(1, 5))
def test_step_hit_accounting_matches_bruteforce(sets, cap):
    for policy in ("lru", "fifo"):
        st_ = simulate_cache(sets, cap, policy)
        assert (st_.hits, st_.misses) == step_hits_bruteforce(sets, cap, policy), policy
        assert st_.accesses == sum(len(s) for s in sets)


def test_bruteforce_finds_what_lru_misses():
    # cyclic pattern larger than the cache: LRU misses every access, the optimum does not
    seq = [0, 1, 2] * 4
    lru = simulate_cache([[e] for e in seq], 2, "lru")
    assert lru.misses == len(seq)
    assert optimal_misses_bruteforce(seq, 2) == offline_optimum_misses(seq, 2) < len(seq)


def test_bruteforce_state_limit():
    with pytest.raises(ReadmeError, match="exceed max_states=5"):
        optimal_misses_bruteforce(list(range(10)) * 2, 4, max_states=5)


# ----------------------------------------------------------------------------- LRU / FIFO / random references


def ref_lru(seq, cap):
    od, out = collections.OrderedDict(), []
    for e in seq:
        if e in od:
            od.move_to_end(e)
            out.append((True, None))
            continue
        ev = od.popitem(last=False)[0] if len(od) >= cap else None
        od[e] = True
        out.append((False, ev))
    return out


def ref_fifo(seq, cap):
    q, out = collections.deque(), []
    for e in seq:
        if e in q:
            out.append((True, None))
            continue
        ev = q.popleft() if len(q) >= cap else None
        q.append(e)
        out.append((False, ev))
    return out


def ref_random(seq, cap, seed):
    rng, res, out = np.random.default_rng(seed), set(), []
    for e in seq:
        if e in res:
            out.append((True, None))
            continue
        ev = None
        if len(res) >= cap:
            ev = sorted(res)[int(rng.integers(len(res)))]
            res.remove(ev)
        res.add(e)
        out.append((False, ev))
    return out


@settings(max_examples=100, deadline=None)
@given(seq=seqs, cap=st.integers(1, 4), seed=st.integers(0, 1000))
def test_policies_match_references(seq, cap, seed):
    for policy, ref in (("lru", ref_lru(seq, cap)), ("fifo", ref_fifo(seq, cap)),
                        ("random", ref_random(seq, cap, seed))):
        c = ExpertCache(cap, policy, seed=seed)
        got = [(a.hit, a.evicted) for a in (c.access(e) for e in seq)]
        assert got == ref, policy
        assert len(c.resident) <= cap


def test_belady_rule_and_tie_break_by_hand():
    c = ExpertCache(3, "belady")
    for e in (0, 1, 2):
        c.access(e)
    # 2 is used again last, 1 soonest: evict 2 (farthest)
    assert c.access(3, [1, 0, 2]).evicted == 2
    # nothing known: every resident is "never used" -> least recently used (0)
    assert c.access(4, []).evicted == 0
    # 1 and 3 both absent from the future; 1 was used less recently than 3
    assert c.access(5, [4]).evicted == 1


def test_access_step_resident_first_never_evicts_its_own_experts():
    # residents {2, 3}, 3 least recently used; step {1, 3}: 3 is a hit (used first), 1 evicts 2.
    # In ascending order (the old accounting) 1 evicted 3 and 3 then missed.
    c = ExpertCache(2, "lru")
    c.access(3)
    c.access(2)
    acc = c.access_step({1, 3})
    assert [(a.expert, a.hit, a.evicted) for a in acc] == [(3, True, None), (1, False, 2)]
    # a step larger than the cache: calls of 2, residents first; no call evicts its own expert
    c = ExpertCache(2, "lru")
    c.access_step({4, 5})
    acc = c.access_step({1, 2, 5})
    assert [(a.expert, a.hit) for a in acc] == [(5, True), (1, False), (2, False)]
    assert acc[1].evicted == 4 and acc[2].evicted == 5
    assert split_calls({1, 2, 5, 6}, {6, 2}, 3) == [[2, 6, 1], [5]]


def test_belady_in_step_future():
    # in-step future: 5 is needed by the step's second call, 0 by nothing -> evict 0
    c = ExpertCache(1, "belady")
    c.access(0)
    acc = c.access_step({2, 5}, [frozenset({0})])
    assert [(a.expert, a.hit, a.evicted) for a in acc] == [(2, False, 0), (5, False, 2)]
    c = ExpertCache(2, "belady")
    c.access(5)
    c.access(0)
    acc = c.access_step({2, 3, 5}, [frozenset({0})])  # calls [5, 2], [3]; 0 is used next step
    assert [(a.expert, a.hit) for a in acc] == [(5, True), (2, False), (3, False)]
    assert acc[1].evicted == 0 and acc[2].evicted == 5


def test_prefetch_counts_no_access_and_respects_protection():
    c = ExpertCache(2, "lru")
    c.access(0)
    c.access(1)
    assert c.prefetch(1) is None  # resident already
    assert c.prefetch(2, protected={0, 1}) is None  # nothing may be evicted
    a = c.prefetch(2, protected={1})
    assert (a.expert, a.evicted) == (2, 0)
    assert (c.stats.hits, c.stats.misses, c.stats.prefetches) == (0, 2, 1)
    assert c.access(2).hit and c.stats.hits == 1
    with pytest.raises(ReadmeError, match="all 2 residents are protected"):
        c.access(3, protected={1, 2})


def test_cache_errors():
    with pytest.raises(ConfigError, match="capacity must be an integer >= 1, got 0"):
        ExpertCache(0)
    with pytest.raises(ConfigError, match="unknown expert cache policy 'mru'"):
        ExpertCache(2, "mru")
    with pytest.raises(ReadmeError, match="3 futures given for 2 steps"):
        simulate_cache([[0], [1]], 1, "belady", futures=[[], [], []])


# ----------------------------------------------------------------------------- transfers


def test_compare_prefetch_by_hand():
    link = LinkModel(bandwidth_bytes_per_s=100.0, expert_bytes=100)  # 1 s per expert
    rep = compare_prefetch([2, 1, 0, 3], [1.0, 1.0, 1.0, 1.0], link)
    np.testing.assert_allclose(rep.on_demand_step_s, [3, 2, 1, 4])
    np.testing.assert_allclose(rep.prefetch_step_s, [3, 1, 1, 3])
    assert rep.on_demand_total_s == pytest.approx(10.0) and rep.prefetch_total_s == pytest.approx(8.0)
    # a blocked load in step 1 must wait for step 0 to finish
    rep_b = compare_prefetch([2, 1, 0, 3], [1.0] * 4, link, n_blocked=[0, 1, 0, 0])
    np.testing.assert_allclose(rep_b.prefetch_step_s, [3, 2, 1, 3])


@settings(max_examples=60, deadline=None)
@given(data=st.lists(st.tuples(st.integers(0, 4), st.floats(0.0, 3.0)), min_size=1, max_size=20),
       load_s=st.floats(0.01, 2.0))
def test_prefetch_properties(data, load_s):
    loads = [d[0] for d in data]
    comp = [d[1] for d in data]
    link = LinkModel(1.0 / load_s, 1)
    rep = compare_prefetch(loads, comp, link)
    # on demand = every load plus every compute, serially
    assert rep.on_demand_total_s == pytest.approx(sum(comp) + load_s * sum(loads))
    assert rep.prefetch_total_s <= rep.on_demand_total_s + 1e-9
    # neither can beat compute alone, nor the link alone
    assert rep.prefetch_total_s >= max(sum(comp), load_s * sum(loads)) - 1e-9
    # if every load is blocked, prefetching cannot help
    rep_b = compare_prefetch(loads, comp, link, n_blocked=loads)
    assert rep_b.prefetch_total_s == pytest.approx(rep.on_demand_total_s)


def test_timeline_idle_gap_means_on_demand():
    tl = TransferTimeline(LinkModel(1.0, 1), prefetch=True)  # 1 s per load
    a = tl.step(0.0, 0, 0, 1.0)
    b = tl.step(5.0, 2, 0, 1.0)  # batch known only at 5 s (after an idle gap): nothing to prefetch
    assert (a.end_s, b.compute_start_s, b.end_s, b.stall_s) == (1.0, 7.0, 8.0, 2.0)


def test_store_counts_blocked_loads():
    s = ExpertStoreSim(StoreConfig(capacity=2, policy="lru", bandwidth_bytes_per_s=1.0, expert_bytes=1))
    s.step({0, 1}, (), 0.0, 1.0)  # cold: 2 loads, 2 s, then 1 s compute -> ends at 3
    t = s.step({2}, (), 3.0, 1.0)  # evicts 0, used by the previous step: blocked, so no overlap
    assert t.n_loads == 1 and t.stall_s == pytest.approx(1.0)
    s2 = ExpertStoreSim(StoreConfig(capacity=2, policy="lru", bandwidth_bytes_per_s=1.0, expert_bytes=1))
    s2.step({0}, (), 0.0, 1.0)
    s2.step({1}, (), 2.0, 1.0)  # loads during step 0 (prefetch), ends at 3
    t2 = s2.step({2}, (), 3.0, 1.0)  # evicts 0 (not in use): overlaps step 1's compute
    assert t2.stall_s == pytest.approx(0.0)


def test_link_errors():
    with pytest.raises(ConfigError, match="bandwidth_bytes_per_s must be > 0"):
        LinkModel(0.0, 10)
    with pytest.raises(ConfigError, match="2 load counts but 1 compute times"):
        compare_prefetch([1, 1], [1.0], LinkModel(1.0, 1))
    with pytest.raises(ConfigError, match="n_blocked <= n_loads"):
        TransferTimeline(LinkModel(1.0, 1), True).step(0.0, 1, 2, 1.0)

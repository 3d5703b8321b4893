"""Expert cache policies against independent references, and the simulated transfer timeline."""

import collections
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from readme_jax.errors import ConfigError, ReadmeError
from readme_jax.serve.cache_policy import (ExpertCache, offline_optimum_misses, optimal_misses_bruteforce,
                                           simulate_cache, step_access_sequence)
from readme_jax.serve.transfer import (ExpertStoreSim, LinkModel, StoreConfig, TransferTimeline,
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


@settings(max_examples=100, deadline=None)
@given(sets=st.lists(st.sets(st.integers(0, 6), max_size=4), max_size=25), cap=st.integers(1, 5))
def test_offline_fast_path_matches_cache_with_full_future(sets, cap):
    flat = step_access_sequence(sets)
    fast = simulate_cache(sets, cap, "belady")
    c = ExpertCache(cap, "belady")
    for i, e in enumerate(flat):
        c.access(e, flat[i + 1:])
    assert (fast.hits, fast.misses, fast.evictions) == (c.stats.hits, c.stats.misses, c.stats.evictions)
    for policy in ("lru", "fifo", "random"):
        other = simulate_cache(sets, cap, policy, seed=3)
        assert fast.misses <= other.misses  # the optimum is a lower bound
        assert other.accesses == len(flat)


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


def test_access_step_sorted_with_in_step_future():
    c = ExpertCache(2, "belady")
    acc = c.access_step({3, 1, 2})
    assert [a.expert for a in acc] == [1, 2, 3]
    # loading 3 must evict 1 or 2; nothing later needs either -> LRU -> 1
    assert acc[2].evicted == 1
    # in-step future: 5 (least recently used) is needed later in this same step, 0 is not
    c2 = ExpertCache(2, "belady")
    c2.access(5)
    c2.access(0)
    acc2 = c2.access_step({2, 5})
    assert acc2[0].evicted == 0 and acc2[1].hit
    c3 = ExpertCache(2, "lru")
    c3.access(5)
    c3.access(0)
    acc3 = c3.access_step({2, 5})
    assert acc3[0].evicted == 5 and not acc3[1].hit


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

"""The real expert store: outputs with a small device pool equal all-resident outputs exactly (prompts
in chunks, chunks cut where they would exceed the pool, calls packed resident-first), the pool never
holds more than its capacity, and its hit accounting equals a brute-force reference."""

import numpy as np
import pytest
from conftest import tiny_readme

from readme_jax.errors import ConfigError
from readme_jax.serve.scheduling.cache_policy import step_hits_bruteforce
from readme_jax.serve.engine import Engine, EngineConfig, EngineRunner
from readme_jax.serve.engine.expert_store import ExpertStore
from readme_jax.serve.scheduling.requests import Status
from readme_jax.serve.scheduling.scheduler import Scheduler, SchedulerConfig
from readme_jax.serve.sim.simulate import CostModel, simulate
from readme_jax.serve.sim.workload import RequestSpec

E = 4
ECFG = EngineConfig(n_slots=4, max_len=24, token_budget=6, min_window=24)


@pytest.fixture(scope="module")
def moe():
    return tiny_readme(E, backbone_seed=21, router_seed=3)


def _specs(seed, n=10):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = rng.integers(0, 97, size=int(rng.integers(1, 12))).astype(np.int32)
        out.append(RequestSpec(i, 0.003 * i, len(p), int(rng.integers(1, 9)), None, None, p))
    return out


def _serve(engine, specs, policy="expert_aware", lookahead=False):
    """``(outputs, routes, engine calls, steps)`` of serving ``specs`` with budget 6 (prompts chunked)."""
    sched = Scheduler(SchedulerConfig(policy=policy, token_budget=6, n_slots=4, max_queue=100, max_wait_steps=4,
                                      n_experts=E, chunked_prefill=True))
    if lookahead:
        engine.lookahead = lambda: sched.lookahead(4)
    calls = []
    inner = engine._step
    engine._step = type("Counted", (), {"__call__": lambda self, *a, **k: calls.append(1) or inner(*a, **k),
                                        "lower": lambda self, *a, **k: inner.lower(*a, **k)})()
    res = simulate(specs, sched, runner=EngineRunner(engine, cost_model=CostModel()), keep_batches=True)
    engine._step = inner
    assert all(r.status is Status.FINISHED for r in res.requests) and len(res.requests) == len(specs)
    return ({s.rid: engine.output(s.rid) for s in specs}, {s.rid: engine.routes(s.rid).tolist() for s in specs},
            len(calls), len(res.batches))


@pytest.fixture(scope="module")
def all_resident(moe):
    specs = _specs(4)
    return specs, _serve(Engine(moe, ECFG), specs)[:2]


# lru at capacity 1 (every step swaps) and belady with prefetch pin the fast suite; the other two repeat
# the same path (20-30 s each in CI) and run under -m slow
@pytest.mark.parametrize("capacity,policy,prefetch", [(1, "lru", False), (2, "belady", True),
                                                      pytest.param(2, "random", False, marks=pytest.mark.slow),
                                                      pytest.param(4, "lru", False, marks=pytest.mark.slow)])
def test_small_pool_outputs_equal_all_resident(moe, all_resident, capacity, policy, prefetch):
    """Tokens and routes with a pool of ``capacity`` experts equal the all-resident engine's exactly;
    with every expert resident it is one call per step."""
    specs, (want_out, want_routes) = all_resident
    store = ExpertStore(moe, capacity, policy, prefetch=prefetch, seed=1)
    eng = Engine(moe, ECFG, store=store)
    assert not {"wg", "wu", "wd"} & set(eng.params["layers"])  # the experts' own weights are not on the device
    out, routes, calls, steps = _serve(eng, specs, lookahead=prefetch)
    assert out == want_out and routes == want_routes
    st = store.stats
    assert len(store.resident) <= capacity and len(store._buf) <= capacity
    assert all(len(c) <= store.max_call_experts for c in store.calls_log)
    assert st.transient_loads == 0  # chunks are cut to fit the pool
    assert st.calls == calls  # every call acquired its experts
    assert st.demand_loads + st.prefetch_loads >= len({e for r in want_routes.values() for e in r})
    if prefetch:
        assert st.prefetch_loads > 0  # the lookahead was used
    if capacity == E:
        assert calls == steps  # fits the pool: one call per step
    else:
        assert calls >= steps and store.cache.stats.evictions > 0  # the pool really was too small for the work


def test_store_hit_accounting_equals_bruteforce(moe, all_resident):
    specs, _ = all_resident
    for policy in ("lru", "fifo"):
        store = ExpertStore(moe, 2, policy)
        _serve(Engine(moe, ECFG, store=store), specs)
        assert store.stats.transient_loads == 0
        hits, misses = step_hits_bruteforce(store.calls_log, 2, policy)
        assert store.cache.stats.hits == hits
        assert store.cache.stats.misses == misses
        assert store.stats.demand_loads == misses


def test_store_errors(moe):
    with pytest.raises(ConfigError, match=r"capacity must be an integer in \[1, n_experts=4\], got 5"):
        ExpertStore(moe, 5)
    with pytest.raises(ConfigError, match="unknown expert cache policy 'mru'"):
        ExpertStore(moe, 2, "mru")


def test_benchmark_loops_run_and_agree(moe):
    """The two measured benchmarks' serving loops, on the tiny model: every policy and store
    generates the same tokens (greedy), the wall-clock loop finishes every request."""
    from readme_jax.bench import expert_store as bstore
    from readme_jax.bench import serving_latency as blat

    rng = np.random.default_rng(0)
    prompt_fn = lambda n, seed: rng.integers(0, 97, size=n).astype(np.int32)  # noqa: E731
    work = bstore.workload(prompt_fn, 5, 0, prompt_range=(2, 10), output_range=(2, 6))
    ref = bstore.serve(Engine(moe, ECFG, store=ExpertStore(moe, E)), work, budget=6, slots=4, lookahead_steps=2)
    got = bstore.serve(Engine(moe, ECFG, store=ExpertStore(moe, 2, "belady", prefetch=True)), work, budget=6,
                       slots=4, lookahead_steps=2)
    assert got["outputs"] == ref["outputs"] and got["stall_seconds"] >= 0
    lat_work = [(i, 0.01 * i, p, n) for i, p, n in work]
    eng = Engine(moe, ECFG)
    outs = {}
    for pol in blat.POLICIES:
        r = blat.serve_wall_clock(eng, lat_work, pol, budget=6, slots=4, max_wait=4, seed=0)
        outs[pol] = r.pop("outputs")
        assert r["p95_norm_latency"] >= r["mean_norm_latency"] * 0.5 > 0 and 1 <= r["unique_experts_per_call"] <= E
    assert all(o == ref["outputs"] for o in outs.values())
    # the step-time sweep over the number of experts present
    sw = blat.expert_sweep({"engine": eng}, 8, 24, repeats=2)
    assert list(sw["engines"]) == ["engine"] and sw["tokens"] == 8
    assert sorted(sw["engines"]["engine"]["ms_by_experts"]) == list(range(1, E + 1))


def test_cut_and_pack_pieces():
    from readme_jax.serve.engine.calls import Piece, cut_by_experts, pack_calls

    assert cut_by_experts([0, 0, 1, 2, 2, 1, 3], 2) == [(0, 3), (3, 6), (6, 7)]
    assert cut_by_experts([5, 5], 1) == [(0, 2)]

    def pc(rid, start, ex):
        return Piece(rid, start, 1, False, True, frozenset(ex))

    items = [[pc(0, 0, {0}), pc(0, 1, {1})], [pc(1, 0, {2})], [pc(2, 0, {1})]]
    calls = pack_calls(items, resident={2}, cap=2)
    # resident expert 2 first, then the smallest id; request 0's second piece only after its first
    assert [[(p.st, p.start) for p in c] for c in calls] == [[(1, 0), (0, 0)], [(0, 1), (2, 0)]]
    assert all(len(frozenset().union(*(p.experts for p in c))) <= 2 for c in calls)

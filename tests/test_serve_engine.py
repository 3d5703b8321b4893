"""Serving engine: batched generation (prompt chunks and decodes in one call per step) equals
one-request-at-a-time full forwards, for every policy; a prompt 4x the step's budget; incremental
routes equal full routing; sampling, EOS, invalid requests, 2x overload; compiling ahead; serve-bench."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_readme
from flax import nnx

from readme_jax.config import tiny_model_config
from readme_jax.errors import ConfigError, ReadmeError, RequestError
from readme_jax.model import decoder
from readme_jax.model.llama import Llama
from readme_jax.model.readme_model import DenseModel, ExpertLayout, ReadMEModel
from readme_jax.serve.engine import Engine, EngineConfig, EngineRunner, SamplingParams, complete, generate
from readme_jax.serve.scheduling.requests import Kind, Status
from readme_jax.serve.scheduling.scheduler import SCHEDULER_POLICIES, Scheduler, SchedulerConfig
from readme_jax.serve.sim.simulate import CostModel, simulate
from readme_jax.serve.sim.workload import RequestSpec

E = 3
MAX_LEN = 24
PAD = MAX_LEN  # reference forwards run on [1, PAD] (causal: the padding never reaches real tokens)
# one attention window (min_window = max_len) and a small budget: few compiled shapes, shared by the tests
ECFG = EngineConfig(n_slots=4, max_len=MAX_LEN, token_budget=6, min_window=MAX_LEN)


@pytest.fixture(scope="module")
def models():
    moe = tiny_readme(E, backbone_seed=11, router_seed=5)
    dense = DenseModel.from_module(Llama(tiny_model_config(), rngs=nnx.Rngs(12)))
    return moe, dense


@pytest.fixture(scope="module")
def reference(models):
    """Greedy one-request-at-a-time generation by repeated FULL forwards (no KV cache), and the
    router's routes of the whole sequence; impl 'reference' (per-expert loop) for the MoE."""
    moe, dense = models
    f_moe = jax.jit(lambda m, tok: m(tok, impl="reference")[:2])
    f_dense = jax.jit(lambda p, tok: decoder.forward(p, dense.cfg, tok)[0])
    cache = {}

    def run(kind, prompt, n):
        key = (kind, tuple(int(t) for t in prompt), n)
        if key not in cache:
            seq, out = [int(t) for t in prompt], []
            for _ in range(n + 1):
                tok = np.zeros((1, PAD), np.int32)
                tok[0, :len(seq)] = seq
                if kind == "moe":
                    logits, route = f_moe(moe, tok)
                else:
                    logits, route = f_dense(dense.params, tok), jnp.zeros((1, PAD), jnp.int32)
                if len(out) == n:
                    break
                nxt = int(np.argmax(np.asarray(logits[0, len(seq) - 1])))
                out.append(nxt)
                seq.append(nxt)
            cache[key] = (out, np.asarray(route[0, :len(seq)]))
        return cache[key]

    return run


@pytest.fixture(scope="module")
def moe_engine(models):
    return Engine(models[0], ECFG)


def _prompts(seed, n, vocab=97, lo=1, hi=14):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(lo, hi + 1))).astype(np.int32) for _ in range(n)]


def _specs(prompts, max_new, arrivals):
    return [RequestSpec(i, float(a), len(p), int(m), None, None, p) for i, (p, m, a) in
            enumerate(zip(prompts, max_new, arrivals))]


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("policy", SCHEDULER_POLICIES)
def test_batched_greedy_equals_one_at_a_time_for_every_policy(policy, models, moe_engine, reference):
    prompts = _prompts(2, 9, hi=14)
    max_new = [1 + (i * 3) % 7 for i in range(9)]
    specs = _specs(prompts, max_new, np.arange(9) * 0.004)
    # budget 6 < most prompts: prompts run in chunks, mixed with other requests' decodes in one call
    cfg = SchedulerConfig(policy=policy, token_budget=6, n_slots=4, max_queue=100, max_wait_steps=4, n_experts=E,
                          chunked_prefill=True)
    res = simulate(specs, Scheduler(cfg), runner=EngineRunner(moe_engine, cost_model=CostModel()),
                   keep_batches=True)
    assert not res.invalid and all(r.status is Status.FINISHED for r in res.requests) and len(res.requests) == 9
    assert all(b.n_tokens <= 6 for b in res.batches) and max(len(b) for b in res.batches) > 1
    assert any(it.kind.value == "prefill" and it.n_tokens < it.request.prompt_len for b in res.batches
               for it in b.items)  # really chunked
    assert any(b.prefills and b.decodes for b in res.batches)
    for s in specs:
        ref_out, ref_routes = reference("moe", s.prompt_ids, s.output_len)
        assert moe_engine.output(s.rid) == ref_out, s.rid
        # incremental routing (prompt at arrival, each token right after sampling) == the full router
        np.testing.assert_array_equal(moe_engine.routes(s.rid), ref_routes)
    assert not moe_engine._slot_owner  # every slot released


def test_prompt_four_times_the_budget_equals_one_at_a_time(models, moe_engine, reference):
    """A prompt 4x the step's token budget runs in chunks (alone, and beside other requests) and
    generates what one-at-a-time full forwards generate."""
    budget = 4
    long = _prompts(11, 1, lo=4 * budget, hi=4 * budget)[0]
    others = _prompts(12, 3, hi=5)
    ref_long = reference("moe", long, 3)
    assert generate(moe_engine, [long], 3, token_budget=budget) == [ref_long[0]]
    np.testing.assert_array_equal(moe_engine.routes(0), ref_long[1])
    outs = generate(moe_engine, [long] + others, 3, policy="expert_aware", token_budget=budget)
    assert outs == [ref_long[0]] + [reference("moe", p, 3)[0] for p in others]


def test_dense_engine_with_windows_equals_full_forward(models, reference):
    eng = Engine(models[1], dataclasses.replace(ECFG, min_window=8))  # steps read 8, 16 or 24 positions
    prompts = _prompts(2, 6)
    outs = generate(eng, prompts, [5, 1, 7, 3, 6, 2], policy="decode_first")
    for p, o, n in zip(prompts, outs, [5, 1, 7, 3, 6, 2]):
        assert o == reference("dense", p, n)[0]
    assert np.all(eng.routes(0) == 0)
    used = {k[2] for k in eng._compiled if k[0] != "route"}
    assert len(used) >= 2 and used <= {8, 16, 24}  # steps read only the windows their positions need


def test_eos_stops_and_frees_the_slot(models, reference):
    moe = models[0]
    p = _prompts(3, 1, lo=4, hi=4)[0]
    ref, _ = reference("moe", p, 8)
    k = next(i for i in range(1, 8) if ref[i] not in ref[:i])  # first position whose token is new
    eng = Engine(moe, dataclasses.replace(ECFG, eos_id=ref[k]))
    others = _prompts(4, 3)
    outs = generate(eng, [p] + others, 8)
    assert outs[0] == ref[:k + 1]  # stops right after emitting EOS
    for q, o in zip(others, outs[1:]):
        full = reference("moe", q, 8)[0]
        cut = full.index(ref[k]) + 1 if ref[k] in full else 8
        assert o == full[:cut]
    assert not eng._slot_owner


def test_sampling_is_batch_invariant_and_top_p_zero_is_greedy(moe_engine, reference):
    eng = moe_engine
    prompts = _prompts(5, 4, hi=8)
    sp = SamplingParams(temperature=0.9, top_p=0.9, seed=123)
    together = generate(eng, prompts, 6, sp)
    alone = [generate(eng, [p], 6, sp)[0] for p in prompts[:2]]
    assert together[:2] == alone
    other_seed = generate(eng, prompts, 6, SamplingParams(temperature=0.9, top_p=0.9, seed=7))
    assert other_seed != together  # the seed matters (4 x 6 tokens from 97 colliding is vanishingly unlikely)
    nucleus_of_one = generate(eng, prompts, 6, SamplingParams(temperature=1.0, top_p=1e-9))
    assert nucleus_of_one == [reference("moe", p, 6)[0] for p in prompts]


# ----------------------------------------------------------------------------- invalid requests


def test_invalid_requests_raise_clear_errors(moe_engine):
    eng = moe_engine
    eng.reset()
    ok = np.array([1, 2, 3], np.int32)
    cases = [
        (dict(prompt_ids=[]), "request 0: empty prompt"),
        (dict(prompt_ids=None), "request 0: no prompt token ids"),
        (dict(prompt_ids=np.zeros((2, 2), np.int32)), r"1-D sequence of token ids, got shape \(2, 2\)"),
        (dict(prompt_ids=np.array([1.5])), "token ids must be integers"),
        (dict(prompt_ids=np.arange(23)), r"prompt \(23\) \+ max_new_tokens \(2\) = 25 > engine max_len=24"),
        (dict(prompt_ids=[3, 97]), r"token id 97 at index 1 is out of the vocabulary \[0, 97\)"),
        (dict(prompt_ids=[-1]), r"token id -1 at index 0 is out of the vocabulary"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
        (dict(prompt_ids=np.arange(10), max_new_tokens=15), r"= 25 > engine max_len=24"),
        (dict(sampling_params=SamplingParams(temperature=-1.0)), "temperature must be a finite number >= 0"),
        (dict(sampling_params=SamplingParams(temperature=float("nan"))), "temperature must be a finite number"),
        (dict(sampling_params=SamplingParams(top_p=0.0)), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(sampling_params=SamplingParams(top_p=1.5)), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(sampling_params=SamplingParams(seed=-3)), r"seed must be an integer in \[0, 2\*\*31\)"),
    ]
    for kw, msg in cases:
        args = dict(prompt_ids=ok, max_new_tokens=2, sampling_params=None) | kw
        with pytest.raises(RequestError, match=msg):
            eng.new_request(0, args["prompt_ids"], args["max_new_tokens"], sampling_params=args["sampling_params"])
    eng.new_request(0, ok, 2)
    with pytest.raises(RequestError, match="request 0: request id already used"):
        eng.new_request(0, ok, 2)
    with pytest.raises(RequestError, match="unknown request id 5"):
        eng.output(5)


def test_invalid_requests_do_not_disturb_the_others(models, moe_engine, reference):
    prompts = _prompts(6, 6)
    specs = _specs(prompts, [4] * 6, np.arange(6) * 0.01)
    bad = [RequestSpec(100, 0.005, 0, 3, None, None, np.zeros((0,), np.int32)),  # empty
           RequestSpec(101, 0.012, 2, 3, None, None, np.array([5, 400], np.int32)),  # out of vocab
           RequestSpec(102, 0.013, 22, 3, None, None, np.arange(22, dtype=np.int32)),  # too long
           RequestSpec(103, 0.02, 3, 0, None, None, np.array([1, 2, 3], np.int32))]  # no new tokens
    cfg = SchedulerConfig(policy="expert_aware", token_budget=6, n_slots=4, max_queue=100, n_experts=E,
                          chunked_prefill=True)
    res = simulate(specs + bad, Scheduler(cfg), runner=EngineRunner(moe_engine, cost_model=CostModel()))
    assert sorted(res.invalid) == [100, 101, 102, 103]
    assert "empty prompt" in res.invalid[100] and "out of the vocabulary" in res.invalid[101]
    assert "> engine max_len=24" in res.invalid[102] and "max_new_tokens" in res.invalid[103]
    assert sorted(r.rid for r in res.requests) == list(range(6))
    for s in specs:
        assert moe_engine.output(s.rid) == reference("moe", s.prompt_ids, 4)[0]


def test_trailing_invalid_request_keeps_every_result(moe_engine, reference):
    """The last arrival is too long for the engine: recorded as rejected with the engine's reason, the
    others' outputs intact; bad sampling parameters make every request rejected, and the run still returns."""
    prompts = _prompts(8, 3)
    specs = _specs(prompts, [3] * 3, np.arange(3) * 0.01)
    too_long = RequestSpec(50, 1.0, 23, 2, None, None, np.arange(23, dtype=np.int32))
    cfg = SchedulerConfig(policy="fcfs", token_budget=6, n_slots=4, max_queue=10, n_experts=E, chunked_prefill=True)
    res = simulate(specs + [too_long], Scheduler(cfg), runner=EngineRunner(moe_engine, cost_model=CostModel()))
    out = res.outcomes()
    assert [out[i]["status"] for i in range(3)] == ["finished"] * 3 and out[50]["status"] == "rejected"
    assert "request 50: prompt (23) + max_new_tokens (2) = 25 > engine max_len=24" in out[50]["reason"]
    for s in specs:
        assert moe_engine.output(s.rid) == reference("moe", s.prompt_ids, 3)[0]
    bad = EngineRunner(moe_engine, SamplingParams(temperature=-1.0), cost_model=CostModel())
    res = simulate(specs, Scheduler(cfg), runner=bad)
    assert not res.requests and not res.steps and sorted(res.invalid) == [0, 1, 2]
    assert all("temperature must be a finite number >= 0" in o["reason"] and o["status"] == "rejected"
               for o in res.outcomes().values())


# ----------------------------------------------------------------------------- overload


class _Watch(Scheduler):
    max_waiting = 0

    def add(self, request):
        ok = super().add(request)
        self.max_waiting = max(self.max_waiting, self.n_waiting - len(self._free_slots))  # beyond the free slots
        return ok


def test_engine_2x_overload_500_requests(models, moe_engine):
    rng = np.random.default_rng(9)
    n = 500
    prompts = [rng.integers(0, 97, size=int(rng.integers(1, 7))).astype(np.int32) for _ in range(n)]
    max_new = rng.integers(1, 4, size=n)
    cfg = SchedulerConfig(policy="expert_aware", token_budget=6, n_slots=4, max_queue=8, max_wait_steps=4,
                          n_experts=E, chunked_prefill=True)
    cost = CostModel(a_s=0.01, b_s_per_token=0.001, c_s_per_expert=0.002)  # virtual clock: deterministic
    # service rate: a burst of the first 100 requests with no queue limit
    burst = _specs(prompts[:100], max_new[:100], np.zeros(100))
    sat = simulate(burst, Scheduler(dataclasses.replace(cfg, max_queue=10_000)),
                   runner=EngineRunner(moe_engine, cost_model=cost))
    rate = 2 * 100 / sat.makespan_s
    arrivals = np.cumsum(rng.exponential(1 / rate, size=n))
    specs = _specs(prompts, max_new, arrivals)
    specs.append(RequestSpec(n, float(arrivals[-1] / 2), 0, 2, None, None, np.zeros((0,), np.int32)))  # invalid
    sched = _Watch(cfg)
    res = simulate(specs, sched, runner=EngineRunner(moe_engine, cost_model=cost), keep_batches=True)
    fin = [r for r in res.requests if r.status is Status.FINISHED]
    rej = [r for r in res.requests if r.status is Status.REJECTED]
    ids = [r.rid for r in fin] + [r.rid for r in rej] + list(res.invalid)
    assert sorted(ids) == list(range(n + 1))  # every request accounted for exactly once
    assert list(res.invalid) == [n]
    assert 50 < len(rej) < 450 and all(r.reject_reason.startswith("queue full") for r in rej)
    assert sched.max_waiting <= cfg.max_queue
    for r in fin:
        out = moe_engine.output(r.rid)
        assert len(out) == r.n_generated == max_new[r.rid]
    runs, decodes = {}, {}
    for b in res.batches:
        for it in b.items:
            runs[it.rid] = runs.get(it.rid, 0) + 1
            decodes[it.rid] = decodes.get(it.rid, 0) + (it.kind is Kind.DECODE)
    assert all(decodes[r.rid] == max_new[r.rid] - 1 for r in fin) and not any(r.rid in runs for r in rej)
    assert not moe_engine._slot_owner


# ----------------------------------------------------------------------------- config and model checks


def test_config_and_model_errors(models):
    moe, dense = models
    cfg = EngineConfig(n_slots=6, max_len=100, min_window=16)
    assert cfg.windows() == (16, 32, 64, 100)
    assert [cfg.window(n) for n in (1, 16, 17, 64, 65, 100)] == [16, 16, 32, 64, 100, 100]
    assert [cfg.rows(n) for n in (1, 2, 3, 5, 6)] == [1, 2, 4, 6, 6]
    assert [cfg.tokens(n) for n in (1, 2, 3, 9, 64, 65)] == [1, 2, 4, 16, 64, 128]
    with pytest.raises(ConfigError, match="engine.n_slots must be >= 1"):
        EngineConfig(n_slots=0)
    with pytest.raises(ConfigError, match="engine.token_budget must be >= 1, got 0"):
        EngineConfig(token_budget=0)
    with pytest.raises(ConfigError, match=r"engine.min_window must be >= 1, got 0"):
        EngineConfig(max_len=64, min_window=0)
    assert EngineConfig(max_len=24, min_window=32).windows() == (24,)
    with pytest.raises(ConfigError, match=r"layers.wg must be \[L, D, F\]"):
        Engine(DenseModel(moe.backbone_params, dense.cfg), ECFG)
    with pytest.raises(ConfigError, match=r"backbone layers.wg must be \[L=2, E=4"):
        Engine(moe.replace(layout=ExpertLayout(4, 16)), ECFG)
    with pytest.raises(ConfigError, match="serves a ReadMEModel or a DenseModel"):
        Engine(object(), ECFG)
    assert moe.expert_bytes() == 3 * 2 * 32 * 16 * 4  # wg+wu+wd, 2 layers, D=32, F_e=16, float32
    eng = Engine(moe, ECFG)
    req = eng.new_request(0, [1, 2], 2)
    from readme_jax.serve.scheduling.requests import Batch, BatchItem
    with pytest.raises(ReadmeError, match=r"slot 7 of request 0 is out of range \[0, 4\)"):
        eng.step(Batch(0, (BatchItem(req, Kind.PREFILL, 2, 7, 0, frozenset()),)))


# ----------------------------------------------------------------------------- serve-bench


def test_serve_bench_tiny_end_to_end(models, tmp_path):
    """The main job's serving stage on the engine (chunked prefill)."""
    from readme_jax.serve.sim.bench import BenchModels, load_bench_config, run_serve_bench

    moe, dense = models
    cfg = load_bench_config(None, ["workload.n_requests=14", "workload.rate_per_s=40", "workload.prompt_mean=5",
                                   "workload.prompt_max=12", "workload.output_mean=4", "workload.output_max=8",
                                   "workload.length_scale=1.0", "token_budget=6", "n_slots=4", f"max_len={MAX_LEN}",
                                   f"min_window={MAX_LEN}", "capacities=[1, 2, 3]",
                                   "latency_tokens=3", "latency_repeats=1", "latency_prompt_len=5", "sweep_rows=4",
                                   "sweep_repeats=1"])
    assert cfg.workload.rate_per_s == 40 and cfg.workload.n_experts == 8  # other keys from the cpu preset
    with pytest.raises(ConfigError, match="unknown config key.*workload.nope"):
        load_bench_config(None, ["workload.nope=1"])
    with pytest.raises(ConfigError, match=r"policies\[0\] must be one of"):
        load_bench_config(None, ["policies=[sjf]"])
    with pytest.raises(ConfigError, match="unknown config key.*mixed_step"):  # one engine: the key is gone
        load_bench_config(None, ["mixed_step=false"])

    def prompt_fn(length, seed):  # synthetic ids: the tiny model's vocabulary is not a real tokenizer's
        return np.random.default_rng(seed).integers(0, 97, size=length).astype(np.int32)

    r = run_serve_bench(BenchModels(moe, dense, None, "tiny test"), cfg, tmp_path, prompt_fn=prompt_fn,
                        progress=False, log=lambda s: None)
    saved = json.loads((tmp_path / "serve_bench.json").read_text())
    assert saved["n_requests"] == 14 and set(saved["policies"]) == set(SCHEDULER_POLICIES)
    for p, s in r["policies"].items():
        assert s["n_finished"] + s["n_rejected"] + s["n_invalid"] == 14
        assert set(s["hit_ratio"]) == {"belady", "lru", "fifo", "random", "optimum"}
        opt = s["hit_ratio"]["optimum"]
        assert opt[1] <= opt[2] <= opt[3] and all(s["hit_ratio"][c][k] <= opt[k] + 1e-12
                                                  for c in ("belady", "lru", "fifo", "random") for k in (1, 2, 3))
        pf = s["prefetch_simulated"]["2"]
        assert pf["prefetch"]["total_s_simulated"] <= pf["on_demand"]["total_s_simulated"] + 1e-12
        assert abs(pf["prefetch"]["compute_s_measured"] - s["measured_compute_s"]) < 1e-9
        assert s["measured_step_compute_s"] > 0
    assert all(v == 1.0 for v in r["greedy_outputs_agree_with_expert_aware"].values())  # batch-invariant
    assert r["burn_in_s"] > 0  # one untimed pass before the timed policies
    cal = r["calibrated"]
    assert set(cal["policies"]) == set(SCHEDULER_POLICIES) and cal["n_requests"] == r["policies"]["expert_aware"][
        "n_finished"]
    assert all(s["n_finished"] + s["n_rejected"] == cal["n_requests"] for s in cal["policies"].values())
    assert min(cal["cost_model_fit"][k] for k in ("a_s", "b_s_per_token", "c_s_per_expert")) >= 0
    lat = r["batch1_decode_latency"]
    assert lat["moe_ms_per_token_median"] > 0 and lat["dense_ms_per_token_median"] > 0
    assert len(lat["samples_ms"]["moe"]) == 3 and 0 < lat["router_share_of_moe_token"]
    assert set(r["decode_step_ms_vs_present_experts_measured"]["moe"]) == {1, 2, 3}
    assert len(r["plots"]) == 6
    for name in r["plots"]:  # file names inside out_dir
        assert "/" not in name and (tmp_path / name).stat().st_size > 1000


def test_step_time_fit_is_the_constrained_least_squares_solution():
    """fit_step_time against brute force over active sets: the non-negative least-squares
    solution is the unconstrained fit on some subset of columns (others 0) that is feasible and
    has the least residual. On data whose unconstrained fit has a negative coefficient, the
    refit differs from clipping that coefficient to 0, and fits better."""
    import itertools

    from readme_jax.serve.sim.bench import fit_step_time

    rng = np.random.default_rng(3)
    better = 0
    for trial in range(20):
        n = 40
        X = np.column_stack([np.ones(n), rng.integers(1, 33, n), rng.integers(1, 8, n)]).astype(float)
        truth = rng.uniform(-0.02, 0.05, 3)
        y = X @ truth + rng.normal(0, 0.01, n)
        got = fit_step_time(X, y)
        best, best_res = None, np.inf
        for k in range(4):
            for cols in itertools.combinations(range(3), k):
                c = np.zeros(3)
                if cols:
                    c[list(cols)] = np.linalg.lstsq(X[:, cols], y, rcond=None)[0]
                if (c >= -1e-12).all() and ((X @ c - y) ** 2).sum() < best_res:
                    best, best_res = c, ((X @ c - y) ** 2).sum()
        assert (got >= 0).all()
        np.testing.assert_allclose(got, best, rtol=1e-6, atol=1e-9)
        ols = np.linalg.lstsq(X, y, rcond=None)[0]
        if (ols < 0).any():
            clipped = np.maximum(ols, 0)
            res_fit, res_clip = ((X @ got - y) ** 2).sum(), ((X @ clipped - y) ** 2).sum()
            assert res_fit <= res_clip * (1 + 1e-12)
            better += res_fit < res_clip * (1 - 1e-6)
    assert better >= 3  # the refit beat clipping on several of the 20 draws


def test_bench_models_save_load_round_trip(tmp_path):
    from readme_jax.serve.sim.bench import load_bench_models, save_bench_models, tiny_models

    m = tiny_models(vocab_size=50, n_experts=3, seed=1)
    save_bench_models(tmp_path / "m", m)
    back = load_bench_models(str(tmp_path / "m"))
    assert back.moe.n_experts == 3 and back.moe.backbone_cfg == m.moe.backbone_cfg
    assert back.moe.router_cfg == m.moe.router_cfg and back.moe.layout == m.moe.layout
    assert back.dense.cfg == m.dense.cfg and back.description == m.description
    for a, b in zip(jax.tree.leaves((m.moe, m.dense)), jax.tree.leaves((back.moe, back.dense))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ReadmeError, match="expected 'tiny', 'smollm-timing' or a folder"):
        load_bench_models(str(tmp_path / "nothing"))


def test_complete_equals_repeated_full_forward():
    """``complete`` (a one-slot engine through the KV cache) = greedy by repeated full forwards."""
    cfg = tiny_model_config()
    model = DenseModel.from_module(Llama(cfg, rngs=nnx.Rngs(int(np.random.randint(1 << 30)))))
    prompt = [int(t) for t in np.random.randint(0, cfg.vocab_size, 5)]
    got = complete(model, prompt, 6)
    seq = list(prompt)
    for _ in range(6):
        logits = decoder.forward(model.params, cfg, jnp.asarray([seq]))[0]
        seq.append(int(jnp.argmax(logits[0, -1])))
    assert got == seq[5:]
    new = seq[5:]
    assert complete(model, prompt, 6, eos_id=new[1]) == new[:new.index(new[1]) + 1]  # stops at (keeps) EOS
    with pytest.raises(ReadmeError, match="non-empty prompt"):
        complete(model, [], 3)


# ----------------------------------------------------------------------------- one call per step, compiling ahead


def test_dense_and_sampled_runs_are_batch_invariant(models, moe_engine, reference):
    prompts = _prompts(5, 4, hi=10)
    dense = Engine(models[1], ECFG)
    for p, o in zip(prompts, generate(dense, prompts, 5, policy="fcfs")):
        assert o == reference("dense", p, 5)[0]
    # sampling: per-request keys, so a request samples the same tokens alone and in a batch
    sp = SamplingParams(temperature=0.9, top_p=0.95, seed=5)  # (the default seed is the request id)
    together = generate(moe_engine, prompts, 6, sp, policy="fcfs")
    assert together[1:3] == generate(moe_engine, prompts[1:3], 6, sp, policy="prefill_first")


def test_one_call_per_step_and_compiling_is_never_in_a_step(models):
    """Every scheduler step runs exactly one jitted call (chunks and decodes together); a new shape
    compiles before its run (``compile_s``), a known one does not compile again."""
    eng = Engine(models[0], ECFG)
    calls = []
    inner = eng._step
    eng._step = type("Counted", (), {"__call__": lambda self, *a, **k: calls.append(1) or inner(*a, **k),
                                     "lower": lambda self, *a, **k: inner.lower(*a, **k)})()
    sched = Scheduler(SchedulerConfig(policy="expert_aware", token_budget=6, n_slots=4, n_experts=E,
                                      chunked_prefill=True))
    for i, p in enumerate(_prompts(9, 5, hi=14)):
        sched.add(eng.new_request(i, p, 3))
    steps = 0
    while sched.has_work():
        b = sched.next_batch()
        before, c0, known = len(calls), eng.compile_s, set(eng._compiled)
        out = eng.step(b)
        assert len(calls) == before + 1, "one engine call per step"
        assert (eng.compile_s > c0) == (set(eng._compiled) != known)
        sched.on_step_done(b, out.next_routes, 0.0)
        steps += 1
    assert steps == len(calls) and steps >= 5


def test_warm_compiles_the_serving_shapes_ahead(models):
    eng = Engine(models[1], dataclasses.replace(ECFG, n_slots=2, token_budget=2))
    shapes = eng.serving_shapes()
    assert (1, 1, MAX_LEN, 0, True, False) in shapes and (2, 2, MAX_LEN, 0, True, False) in shapes
    lines = []
    eng.warm(progress=lines.append)
    assert len(lines) == len(shapes) and set(shapes) <= eng._compiled
    c0, n0 = eng.compile_s, len(eng._compiled)
    generate(eng, [[1, 2]], 3)  # a prompt of 2 tokens (one chunk), then decodes of one row: all warmed
    assert eng.compile_s == c0 and len(eng._compiled) == n0


def test_step_breakdown_times_both_models_at_every_shape(models):
    """bench/step_breakdown: Read-ME and dense steps, interleaved, a median per (N, W)."""
    from readme_jax.bench.step_breakdown import breakdown

    engines = {"readme": Engine(models[0], ECFG), "dense": Engine(models[1], ECFG)}
    got = breakdown(engines, [8], [MAX_LEN], repeats=2)
    assert set(got) == {"readme", "dense"} and all(v["N=8"][f"W={MAX_LEN}"] > 0 for v in got.values())

"""Workload generator statistics and determinism; serving metrics and plots."""

import dataclasses
import math
from statistics import NormalDist

import numpy as np
import pytest

from readme_jax.config import from_dict
from readme_jax.errors import ConfigError, DataError
from readme_jax.serve.scheduling.cache_policy import simulate_cache
from readme_jax.serve.sim.metrics import (hit_ratio_table, plot_hit_ratio_vs_capacity, plot_normalized_latency_hist,
                                      plot_unique_experts, request_metrics, summarize)
from readme_jax.serve.scheduling.requests import Request, Status
from readme_jax.serve.scheduling.scheduler import SchedulerConfig
from readme_jax.serve.sim.simulate import CostModel, run_policies
from readme_jax.config import LMSYS_PROMPT_MEAN_TOKENS, LMSYS_RESPONSE_MEAN_TOKENS, WorkloadConfig
from readme_jax.config import WORKLOAD_PRESETS as PRESETS
from readme_jax.serve.sim.workload import expected_length, expert_popularity, generate_workload, sample_lengths, solve_mu

# ----------------------------------------------------------------------------- lengths


def ref_expected_length(mu, sigma, lo, hi, n=20_000):
    """Numerical reference: average the clipped, rounded length over n normal quantile midpoints."""
    z = np.array([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)])
    return float(np.clip(np.floor(np.exp(mu + sigma * z) + 0.5), lo, hi).mean())


@pytest.mark.parametrize("mean,sigma,lo,hi", [(69.5, 1.0, 1, 1024), (214.5, 1.0, 1, 1024), (8.7, 0.6, 2, 40)])
def test_solve_mu_hits_target_mean(mean, sigma, lo, hi):
    mu = solve_mu(mean, sigma, lo, hi)
    assert expected_length(mu, sigma, lo, hi) == pytest.approx(mean, rel=1e-9)
    assert ref_expected_length(mu, sigma, lo, hi) == pytest.approx(mean, rel=0.005)
    x = sample_lengths(np.random.default_rng(1), 200_000, mean, sigma, lo, hi)
    assert x.min() >= lo and x.max() <= hi
    se = x.std() / math.sqrt(len(x))
    assert abs(x.mean() - mean) < 4 * se


def test_workload_statistics_large_n():
    cfg = WorkloadConfig(n_requests=20_000, rate_per_s=3.0, seed=5)
    wl = generate_workload(cfg, with_routes=False)
    pl = np.array([s.prompt_len for s in wl])
    ol = np.array([s.output_len for s in wl])
    assert abs(pl.mean() - LMSYS_PROMPT_MEAN_TOKENS) < 4 * pl.std() / math.sqrt(len(pl))
    assert abs(ol.mean() - LMSYS_RESPONSE_MEAN_TOKENS) < 4 * ol.std() / math.sqrt(len(ol))
    assert pl.max() <= 1024 and ol.max() <= 1024 and pl.min() >= 1
    arr = np.array([s.arrival_s for s in wl])
    gaps = np.diff(np.concatenate([[0.0], arr]))
    assert np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 3.0, rel=0.03)
    # Poisson: counts per 1-second window have variance close to their mean (3)
    counts = np.bincount(arr.astype(int))[:-1]
    assert counts.mean() == pytest.approx(3.0, rel=0.05)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.1)


def test_cpu_preset_scales_lengths():
    cfg = PRESETS["cpu"]
    assert cfg.bounds("prompt") == (1, 128) and cfg.bounds("output") == (1, 128)
    wl = generate_workload(dataclasses.replace(cfg, n_requests=20_000), with_routes=False)
    ol = np.array([s.output_len for s in wl])
    assert abs(ol.mean() - 0.125 * LMSYS_RESPONSE_MEAN_TOKENS) < 4 * ol.std() / math.sqrt(len(ol))


def test_deterministic_and_independent_streams():
    cfg = dataclasses.replace(PRESETS["cpu"], n_requests=50)
    a, b = generate_workload(cfg), generate_workload(cfg)
    for x, y in zip(a, b):
        assert (x.arrival_s, x.prompt_len, x.output_len) == (y.arrival_s, y.prompt_len, y.output_len)
        np.testing.assert_array_equal(x.prompt_routes, y.prompt_routes)
        np.testing.assert_array_equal(x.output_routes, y.output_routes)
    c = generate_workload(dataclasses.replace(cfg, seed=1))
    assert [s.prompt_len for s in c] != [s.prompt_len for s in a]
    # changing the rate changes arrivals only
    d = generate_workload(dataclasses.replace(cfg, rate_per_s=7.0))
    assert [s.prompt_len for s in d] == [s.prompt_len for s in a]
    assert [s.arrival_s for s in d] != [s.arrival_s for s in a]


def test_prompt_fn_contract():
    calls = []

    def prompt_fn(length, seed):
        calls.append((length, seed))
        return np.random.default_rng(seed).integers(0, 100, size=length)

    cfg = dataclasses.replace(PRESETS["cpu"], n_requests=10)
    wl = generate_workload(cfg, prompt_fn)
    assert [c[0] for c in calls] == [s.prompt_len for s in wl]
    assert all(len(s.prompt_ids) == s.prompt_len for s in wl)
    again = generate_workload(cfg, prompt_fn)
    assert all(np.array_equal(x.prompt_ids, y.prompt_ids) for x, y in zip(wl, again))
    r = wl[0].to_request()
    assert r.max_new_tokens == wl[0].output_len and r.prompt_len == wl[0].prompt_len
    with pytest.raises(DataError, match=r"returned shape \(3,\); expected"):
        generate_workload(cfg, lambda n, s: np.zeros(3, int) if n != 3 else np.zeros(4, int))
    with pytest.raises(DataError, match="has no prompt routes"):
        generate_workload(cfg, with_routes=False)[0].to_request()


def test_synthetic_routes_skew_and_locality():
    cfg = dataclasses.replace(PRESETS["cpu"], n_requests=3000, n_experts=6, expert_zipf=1.2, seed=2)
    wl = generate_workload(cfg)
    pr = np.concatenate([s.prompt_routes for s in wl] + [s.output_routes for s in wl])
    assert pr.min() >= 0 and pr.max() < 6
    # a token keeps the previous token's expert at least route_stay of the time
    same = np.mean(np.concatenate([s.output_routes[1:] == s.output_routes[:-1] for s in wl]))
    assert same > cfg.route_stay
    # the per-request majority expert follows the Zipf popularity of home experts
    homes = np.array([np.bincount(np.concatenate([s.prompt_routes, s.output_routes])).argmax() for s in wl])
    freq = np.bincount(homes, minlength=6) / len(homes)
    assert freq[0] == pytest.approx(expert_popularity(6, 1.2)[0], abs=0.06)
    assert np.all(np.diff(freq[:3]) < 0)


def test_workload_config_errors_and_yaml_loading():
    with pytest.raises(ConfigError, match="workload.rate_per_s must be > 0"):
        WorkloadConfig(rate_per_s=0.0)
    with pytest.raises(ConfigError, match=r"workload.prompt_mean \* length_scale = 2000 must lie strictly between"):
        WorkloadConfig(prompt_mean=2000.0)
    cfg = from_dict(WorkloadConfig, {"n_requests": 7, "length_scale": 0.5})
    assert cfg.n_requests == 7 and cfg.bounds("output") == (1, 512)
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(WorkloadConfig, {"n_request": 7})


# ----------------------------------------------------------------------------- metrics


def finished(rid, arrival, first, finish, n):
    r = Request(rid, arrival, np.array([0]), n)
    r.status, r.first_token_s, r.finish_s, r.n_generated = Status.FINISHED, first, finish, n
    return r


def ref_p95(x):
    x = sorted(x)
    pos = 0.95 * (len(x) - 1)
    lo = int(math.floor(pos))
    return x[lo] + (x[min(lo + 1, len(x) - 1)] - x[lo]) * (pos - lo)


def test_request_metrics_and_summary_by_hand():
    rng = np.random.default_rng(0)
    reqs = []
    for i in range(37):
        a = float(rng.uniform(0, 10))
        f = a + float(rng.uniform(0.1, 1))
        reqs.append(finished(i, a, f, f + float(rng.uniform(0, 5)), int(rng.integers(1, 50))))
    rej = Request(99, 1.0, np.array([0]), 4)
    rej.status = Status.REJECTED
    m = request_metrics(reqs + [rej])
    lat = [r.finish_s - r.arrival_s for r in reqs]
    assert len(m.rid) == 37
    np.testing.assert_allclose(m.latency_s, lat)
    np.testing.assert_allclose(m.normalized_latency_s, [l / r.n_generated for l, r in zip(lat, reqs)])
    np.testing.assert_allclose(m.ttft_s, [r.first_token_s - r.arrival_s for r in reqs])
    s = summarize(reqs + [rej])
    assert (s["n_finished"], s["n_rejected"]) == (37, 1)
    assert s["latency_p95_s"] == pytest.approx(ref_p95(lat))
    assert s["normalized_latency_mean_s"] == pytest.approx(sum(l / r.n_generated for l, r in zip(lat, reqs)) / 37)
    span = max(r.finish_s for r in reqs)
    assert s["throughput_tokens_per_s"] == pytest.approx(sum(r.n_generated for r in reqs) / span)


def test_summary_of_a_simulation_and_hit_ratio_table(tmp_path):
    wl = generate_workload(dataclasses.replace(PRESETS["cpu"], n_requests=40, rate_per_s=20.0, prompt_max=192))
    runs = run_policies(wl, SchedulerConfig(token_budget=24, n_slots=16, max_wait_steps=8), ("expert_aware", "fcfs"),
                        CostModel(), record_future=True, lookahead_steps=4)
    res = runs["expert_aware"]
    s = summarize(res.requests, res.steps, res.makespan_s)
    assert s["n_finished"] == 40 and s["n_steps"] == len(res.steps)
    assert s["tokens_per_batch_mean"] == pytest.approx(np.mean([st.n_tokens for st in res.steps]))
    assert s["items_per_batch_mean"] == pytest.approx(np.mean([st.n_prefill + st.n_decode for st in res.steps]))
    assert s["transfer_stall_s_total_simulated"] == 0.0  # no store given
    sets = [st.experts for st in res.steps]
    table = hit_ratio_table(sets, [1, 2, 4], futures=[st.future for st in res.steps])
    assert set(table) == {"belady", "lru", "fifo", "random", "optimum"}
    for c in (1, 2, 4):
        assert all(table[p][c] <= table["optimum"][c] + 1e-12 for p in table)
        full = simulate_cache(sets, c, "belady")
        assert table["optimum"][c] == pytest.approx(full.hit_ratio)
    for p in table:
        assert table[p][1] <= table[p][4] + 0.02  # more room, (almost always) more hits
    # plots: real PNG files
    paths = [
        plot_normalized_latency_hist({k: request_metrics(v.requests).normalized_latency_s for k, v in runs.items()},
                                     tmp_path / "hist.png"),
        plot_hit_ratio_vs_capacity(table, tmp_path / "hit.png"),
        plot_unique_experts({k: [len(st.experts) for st in v.steps] for k, v in runs.items()},
                            tmp_path / "unique.png"),
    ]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000

"""bench/serving_report: composes serving.json from the measured runs without changing a number."""

import numpy as np

from readme_jax.bench.serving_report import compose, plots, shape_name

POLICIES = ("expert_aware", "fcfs", "decode_first", "prefill_first", "expert_aware_blind")
KEYS = ("p95_norm_latency", "mean_norm_latency", "mean_ttft", "unique_experts_per_call",
        "unique_experts_per_call_bound", "bound_share")


def interval(rng):
    m = float(rng.uniform(0.2, 5.0))
    return {"mean": m, "ci95_low": m - 0.1, "ci95_high": m + 0.1}


def latency_run(rng, slots, requests, rates):
    return {"summary": {str(r): {p: {k: interval(rng) for k in KEYS} for p in POLICIES} for r in rates},
            "workload": {"slots": slots, "requests": requests, "token_budget": 32},
            "command": "c", "machine": "m", "date": "d", "model": "x", "warmup_seconds": {},
            "step_ms_vs_experts": {"tokens": 32}}


def store_run(rng):
    pols = ("lru_on_demand", "belady_prefetch")
    summary = {c: {p: {"hit_ratio": interval(rng), "stall_seconds": interval(rng), "total_seconds": interval(rng)}
                   for p in pols} for c in ("2", "3")}
    for c in summary:
        summary[c]["stall_ratio_belady_prefetch_vs_lru_on_demand"] = interval(rng)
    return {"summary": summary, "command": "c", "machine": "m", "date": "d", "model": "x", "workload": {},
            "expert_bytes": 1, "all_outputs_equal_all_resident": True, "n_experts": 7}


def test_compose_selects_without_changing_numbers(tmp_path):
    rng = np.random.default_rng(0)
    lat, wide, store = latency_run(rng, 16, 24, (4.0, 8.0)), latency_run(rng, 64, 48, (8.0,)), store_run(rng)
    out = compose(lat, store, more=(wide,))
    heavy = lat["summary"]["8.0"]
    assert out["rate_per_s"] == 8.0 and out["shape"] == "16 slots, 24 requests, budget 32"
    assert set(out["policies"]) == set(POLICIES) - {"expert_aware_blind"}
    for p, v in out["policies"].items():
        assert v["p95_norm_latency"] == heavy[p]["p95_norm_latency"]
        assert v["unique_experts_per_call_when_budget_binds"] == heavy[p]["unique_experts_per_call_bound"]["mean"]
    assert out["control"]["mean_norm_latency"] == heavy["expert_aware_blind"]["mean_norm_latency"]
    assert list(out["by_shape"]) == [shape_name(lat), "64 slots, 48 requests, budget 32"]
    assert out["by_shape"][shape_name(wide)]["8.0"]["fcfs"]["mean_ttft"] == wide["summary"]["8.0"]["fcfs"]["mean_ttft"]["mean"]
    assert out["cache"]["3"]["belady_prefetch"]["stall_seconds"] == store["summary"]["3"]["belady_prefetch"]["stall_seconds"]["mean"]
    assert out["sources"]["latency_more"][0]["workload"]["slots"] == 64
    paths = plots(lat, store, tmp_path, more=(wide,))
    assert len(paths) == 2 and all(p.stat().st_size > 1000 for p in paths)

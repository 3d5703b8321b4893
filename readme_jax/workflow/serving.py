"""Stage `serve_bench`: the serving benchmark (readme_jax.serve.sim.bench) on the trained Read-ME model,
with the dense source model for the batch-1 latency comparison, prompts from the test split of the
same domains. ``serve:`` in the run config is a ServeBenchConfig (readme_jax/config/serve.py)."""

from __future__ import annotations

import time

import yaml

from readme_jax.config import ServeBenchConfig, to_dict
from readme_jax.model.readme_model import DenseModel
from readme_jax.serve.sim import bench
from readme_jax.workflow.training import load_trained
from readme_jax.jsonfile import write_json
from readme_jax.workflow.workspace import Workspace


def bench_config(ws: Workspace) -> ServeBenchConfig:
    """The run's ``serve:`` settings (written beside the results as YAML)."""
    cfg = ws.cfg.serve
    (ws.stage_dir("serve_bench") / "bench_config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    return cfg


def run_serve_bench_stage(ws: Workspace) -> dict:
    t0 = time.time()
    out = ws.stage_dir("serve_bench")
    cfg = bench_config(ws)
    model = load_trained(ws)
    dense, tok = ws.dense
    models = bench.BenchModels(
        moe=model, dense=DenseModel.from_module(dense), tokenizer=tok,
        description=f"trained Read-ME from {ws.cfg.model} ({model.n_experts} experts) vs its dense source")
    prompt_fn, _ = bench.corpus_prompt_fn(tok, list(model.layout.domains), cfg.corpus_split, ws.sep_id,
                                          ws.cfg.data.cache_dir)
    result = bench.run_serve_bench(models, cfg, out, prompt_fn=prompt_fn, progress=ws.progress, log=ws.log)
    plots = [str(out / p) for p in result.get("plots", [])]  # names inside out (absolute paths stay as they are)
    summary = {"summary": headline(result), "plots": plots, "json": str(out / "serve_bench.json")}
    write_json(out / "summary.json", summary)
    ws.mark_done("serve_bench", summary, time.time() - t0)
    return summary


def headline(result: dict) -> dict:
    """The numbers the report shows (the full JSON is beside it)."""
    cols = ("normalized_latency_mean_s", "normalized_latency_p95_s", "latency_mean_s", "latency_p95_s",
            "ttft_mean_s", "unique_experts_per_batch_mean", "tokens_per_batch_mean", "throughput_tokens_per_s")
    out = {"policies_measured": {p: {c: s.get(c) for c in cols} for p, s in result.get("policies", {}).items()}}
    out["engine"] = "one call per step, prompt chunks and decodes together (chunked prefill)"
    cal = result.get("calibrated", {}).get("policies", {})
    out["policies_calibrated"] = {p: {c: s.get(c) for c in cols} for p, s in cal.items()}
    if "cost_model_fit" in result.get("calibrated", {}):
        out["cost_model_fit"] = result["calibrated"]["cost_model_fit"]
    first = next(iter(result.get("policies", {}).values()), {})
    out["hit_ratio"] = first.get("hit_ratio", {})
    out["prefetch_simulated"] = first.get("prefetch_simulated", {})
    b1 = result.get("batch1_decode_latency", {})
    out["batch1_decode_ms_per_token"] = {k: b1.get(k) for k in ("moe_ms_per_token_median", "dense_ms_per_token_median",
                                                                  "moe_vs_dense_median_change",
                                                                  "router_step_ms_measured", "router_share_of_moe_token")}
    out["decode_step_ms_vs_present_experts"] = result.get("decode_step_ms_vs_present_experts_measured")
    return out

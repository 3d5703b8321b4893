"""``serve-bench``: the serving policies side by side on the real engine, one workload, one run.

What it measures (every number in the JSON says whether it is MEASURED or SIMULATED):

* per scheduler policy (same engine, same workload, same token budget): latency, normalized
  latency and TTFT (mean, p95), unique experts and tokens per batch, throughput. Step times are
  the engine's measured compute (prompt routing at arrival included); arrivals follow the
  workload's virtual Poisson clock, which advances by the measured step times.
* expert cache hit ratios per cache policy and capacity, on each run's per-step expert sets
  (Belady with the scheduler's lookahead as its future; ``optimum`` = Belady, whole future);
* prefetch vs on-demand expert loading: each run's steps replayed back to back with their
  measured compute and SIMULATED host->device loads over a configurable link;
* decode step time vs the number of experts present in a batch (the MoE step reads only those);
* per-token decode latency at batch 1, Read-ME MoE vs the dense model, same engine, interleaved.

Prompts are windows of the real text domains (``readme_jax.data``), tokenized by the model's
tokenizer, and their routes are the model's router's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from flax import nnx

from readme_jax.checkpoints import embedded_gguf_path, load_model
from readme_jax.checkpoints.orbax_io import read_meta, restore_params, save_params
from readme_jax.checkpoints.readme_io import load_readme, save_readme
from readme_jax.checkpoints.tokenizer import tokenizer_from_gguf, tokenizer_from_hf
from readme_jax.config import ModelConfig, RouterConfig, ServeBenchConfig, from_dict, load, tiny_model_config, to_dict
from readme_jax.convert.experts import expert_width, moe_arrays_from_dense
from readme_jax.data import available_domains, token_stream
from readme_jax.errors import CheckpointError, ConfigError, DataError
from readme_jax.figures import new_figure
from readme_jax.jsonfile import write_json
from readme_jax.model import decoder
from readme_jax.model.llama import Llama
from readme_jax.model.readme_model import DenseModel, ExpertLayout, ReadMEModel
from readme_jax.model.router import make_router
from readme_jax.serve.engine import Engine, EngineConfig, EngineRunner, SamplingParams
from readme_jax.serve.sim.metrics import (hit_ratio_table, plot_hit_ratio_vs_capacity,
                                      plot_normalized_latency_hist, plot_unique_experts, request_metrics, summarize)
from readme_jax.serve.scheduling.requests import Status
from readme_jax.serve.scheduling.scheduler import Scheduler, SchedulerConfig
from readme_jax.serve.sim.simulate import CostModel, simulate
from readme_jax.serve.sim.transfer import ExpertStoreSim, StoreConfig
from readme_jax.serve.sim.workload import generate_workload


def load_bench_config(path=None, overrides=()) -> ServeBenchConfig:
    """ServeBenchConfig from an optional YAML file and ``key=value`` overrides (``workload.*`` keys fill
    in from :data:`readme_jax.config.BENCH_WORKLOAD`)."""
    return load(ServeBenchConfig, path, overrides)


@dataclasses.dataclass
class BenchModels:
    moe: ReadMEModel
    dense: DenseModel | None = None  # for the batch-1 latency comparison
    tokenizer: Any = None  # for corpus prompts and EOS
    description: str = ""


# ----------------------------------------------------------------------------- models


def tiny_models(vocab_size: int = 97, n_experts: int = 7, r: float = 0.5, seed: int = 0,
                tokenizer=None) -> BenchModels:
    """Random tiny dense Llama and the Read-ME built from it (random channel subsets as experts,
    untrained router): same attention weights, so the two differ only in the FFN and the router."""
    cfg = tiny_model_config(vocab_size=vocab_size, max_seq_len=4096)
    dense = Llama(cfg, rngs=nnx.Rngs(seed))
    return _readme_from_dense(cfg, dense.arrays(), n_experts, r, seed, RouterConfig(width=16, n_heads=2, ffn_dim=32),
                              tokenizer, f"tiny random (D={cfg.d_model}, L={cfg.n_layers}, V={vocab_size}), "
                              f"{n_experts} random-channel experts r={r}, untrained router")


def _readme_from_dense(cfg, dense_arrays, n_experts, r, seed, rc, tokenizer, description) -> BenchModels:
    rng = np.random.default_rng(seed)
    F, L = cfg.ffn_dim, cfg.n_layers
    fe = expert_width(F, r)
    masks = np.zeros((n_experts, L, F), bool)
    for e in range(n_experts):
        for layer in range(L):
            masks[e, layer, rng.permutation(F)[:fe]] = True
    arrays = jax.tree.map(np.asarray, dense_arrays)
    params, _ = moe_arrays_from_dense(arrays, masks, r=r)
    router = make_router(dataclasses.replace(rc, seed=seed), n_experts, cfg.vocab_size, cfg.max_seq_len,
                         backbone_embed_VD=arrays["embed"])
    moe = ReadMEModel(router.arrays(), params, router.cfg, cfg, ExpertLayout.of(params), router.mlp).validate()
    return BenchModels(moe, DenseModel(arrays, cfg).validate(), tokenizer, description)


def smollm_timing_models(n_experts: int = 7, r: float = 0.5, seed: int = 0) -> BenchModels:
    """The embedded SmolLM2-135M as dense model and a Read-ME made of random channel subsets with
    an untrained paper-size router: right sizes for TIMING, meaningless routes."""
    dense, tok = load_model("embedded")
    return _readme_from_dense(dense.cfg, dense.arrays(), n_experts, r, seed, RouterConfig(), tok,
                              f"SmolLM2-135M (embedded GGUF) + {n_experts} random-channel experts r={r} + untrained "
                              f"router (timing only: routes are not a trained router's)")


def save_bench_models(path, models: BenchModels) -> Path:
    """Write ``models`` for :func:`load_bench_models`: ``path/readme`` (router + backbone, as training
    writes them), ``path/dense`` when there is a dense model, and the tokenizer beside."""
    d = Path(path)
    save_readme(d / "readme", models.moe, backbone_meta={"description": models.description})
    if models.dense is not None:
        save_params(d / "dense", models.dense.params, {"kind": "llama", "model_config": to_dict(models.dense.cfg)},
                    overwrite=True)
    if models.tokenizer is not None:
        models.tokenizer.save_hf(d)
    return d


def load_bench_models(source: str, seed: int = 0) -> BenchModels:
    """``tiny`` (random, real tokenizer vocabulary if the embedded one loads), ``smollm-timing``, or a
    folder written by :func:`save_bench_models`."""
    if source == "tiny":
        tok = _embedded_tokenizer()
        return tiny_models(tok.vocab_size if tok is not None else 97, seed=seed, tokenizer=tok)
    if source == "smollm-timing":
        return smollm_timing_models(seed=seed)
    p = Path(source)
    if not (p / "readme").is_dir():
        raise CheckpointError(f"serve-bench model {source!r}: expected 'tiny', 'smollm-timing' or a folder "
                              f"written by save_bench_models (readme/, optional dense/)")
    moe = load_readme(p / "readme")
    dense = None
    if (p / "dense").is_dir():
        arrays, meta = restore_params(p / "dense")
        try:
            dense = DenseModel(arrays, from_dict(ModelConfig, meta["model_config"], "model_config.")).validate()
        except (ConfigError, KeyError) as e:
            raise CheckpointError(f"{p / 'dense' / 'meta.json'}: {e}") from None
    tok = tokenizer_from_hf(p) if (p / "tokenizer.json").is_file() else None
    description = read_meta(p / "readme" / "backbone").get("description", str(p))
    return BenchModels(moe, dense, tok, description)


def _embedded_tokenizer():
    try:
        return tokenizer_from_gguf(embedded_gguf_path())
    except Exception:  # noqa: BLE001 - the tiny model works without it (synthetic prompts)
        return None


def corpus_prompt_fn(tokenizer, domains=None, split: str = "test", sep_id: int | None = 0, cache_dir=None):
    """``(prompt_fn, domain_of_seed)``: prompt = a window of one domain's token stream (domain and
    offset drawn from the request's prompt seed)."""
    names = list(domains) if domains else available_domains(cache_dir)
    if not names:
        raise DataError("serve-bench: no prepared text domains (run `python -m readme_jax.data` first, or set "
                        "READMEJAX_CACHE)")
    streams = {d: token_stream(d, split, tokenizer, sep_id=sep_id, cache_dir=cache_dir, progress=False) for d in names}
    domain_of: dict[int, str] = {}

    def prompt_fn(length: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        d = names[int(rng.integers(len(names)))]
        s = streams[d]
        if s.size <= length:
            raise DataError(f"domain {d}/{split} has {s.size} tokens, a prompt needs {length}")
        start = int(rng.integers(0, s.size - length))
        domain_of[seed] = d
        return np.array(s[start:start + length], np.int32)

    return prompt_fn, domain_of


# ----------------------------------------------------------------------------- measurements


def decode_latency(engine: Engine, prompt, n_tokens: int) -> np.ndarray:
    """Measured seconds of each decode step of ONE request (batch 1), ``n_tokens`` steps."""
    engine.reset()
    prompt = np.asarray(prompt, np.int32)
    sched = Scheduler(SchedulerConfig(policy="fcfs", token_budget=engine.cfg.token_budget, n_slots=engine.cfg.n_slots,
                                      n_experts=engine.model.n_experts, chunked_prefill=True))
    sched.add(engine.new_request(0, prompt, n_tokens + 1))
    times = []
    while sched.has_work():
        b = sched.next_batch()
        out = engine.step(b)
        sched.on_step_done(b, out.next_routes, 0.0)
        if b.decodes:
            times.append(out.compute_s)
    engine.reset()
    return np.asarray(times)


def router_step_time(model: ReadMEModel, max_len: int, repeats: int = 20) -> float:
    """Median measured seconds of the router alone on one token with a ``max_len`` cache (batch 1)."""
    f = jax.jit(lambda m, rc, tok, pos: m.router_logits(tok, pos, rc))
    rc = decoder.init_cache(model.router_cfg, 1, max_len)
    tok, pos = jnp.zeros((1, 1), jnp.int32), jnp.full((1, 1), max_len // 2, jnp.int32)
    jax.block_until_ready(f(model, rc, tok, pos))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(model, rc, tok, pos))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def replay_store(steps, capacity: int, policy: str, expert_bytes: int, bandwidth: float, latency_s: float,
                 prefetch: bool) -> dict:
    """Replay recorded steps back to back: measured compute + SIMULATED expert loads."""
    sim = ExpertStoreSim(StoreConfig(capacity=capacity, policy=policy, bandwidth_bytes_per_s=bandwidth,
                                     expert_bytes=expert_bytes, latency_s=latency_s, prefetch=prefetch))
    end, stall, loads = 0.0, 0.0, 0
    for st in steps:
        t = sim.step(st.experts, st.future, end, st.compute_s)
        end, stall, loads = t.end_s, stall + t.stall_s, loads + t.n_loads
    return {"total_s_simulated": end, "stall_s_simulated": stall, "loads": loads,
            "compute_s_measured": float(sum(st.compute_s for st in steps))}


# ----------------------------------------------------------------------------- the benchmark


def run_serve_bench(models: BenchModels, cfg: ServeBenchConfig, out_dir, *, prompt_fn: Callable | None = None,
                    progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run everything (module doc) and write ``serve_bench.json`` and PNG plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    moe = models.moe
    E = moe.n_experts
    domain_of: dict = {}
    if prompt_fn is None:
        if models.tokenizer is None:
            raise ConfigError("serve-bench needs a tokenizer for corpus prompts (or pass prompt_fn)")
        prompt_fn, domain_of = corpus_prompt_fn(models.tokenizer, cfg.domains, cfg.corpus_split, cfg.corpus_sep_id)
    specs = generate_workload(cfg.workload, prompt_fn, with_routes=False)
    eos = getattr(models.tokenizer, "eos_id", None) if cfg.stop_at_eos else None
    ecfg = EngineConfig(n_slots=cfg.n_slots, max_len=cfg.max_len, token_budget=cfg.token_budget,
                        min_window=cfg.min_window, eos_id=eos, mesh=cfg.mesh)
    engine = Engine(moe, ecfg)
    policies, outputs, step_sets, routes = {}, {}, {}, {}
    burn_s = 0.0
    if cfg.burn_in:  # untimed pass: the first policy would otherwise absorb the slow first seconds
        t0 = time.perf_counter()
        simulate(specs, Scheduler(_scheduler_config(cfg, cfg.policies[0], E)),
                 runner=EngineRunner(engine, SamplingParams(temperature=cfg.temperature)))
        burn_s = time.perf_counter() - t0
        log(f"[serve-bench] burn-in (untimed, discarded): {burn_s:.1f}s")
    for policy in cfg.policies:
        policies[policy], step_sets[policy] = _run_policy(engine, specs, policy, cfg, progress, log)
        outputs[policy] = engine.outputs()
        if not routes:  # the real router's routes of every prompt and generated token (first run)
            routes = {r.rid: engine.routes(r.rid) for r in step_sets[policy].requests
                      if r.status is Status.FINISHED}
    calibrated = _calibrated_runs(specs, routes, step_sets, cfg, E)
    for p, s in calibrated["policies"].items():
        log(f"[serve-bench] calibrated {p}: latency mean {s['latency_mean_s']:.3f}s p95 {s['latency_p95_s']:.3f}s, "
            f"unique experts/batch {s.get('unique_experts_per_batch_mean', float('nan')):.2f} (modelled times)")
    first = cfg.policies[0]
    agree = {p: float(np.mean([outputs[p].get(r) == outputs[first].get(r) for r in outputs[first]]))
             if outputs[first] else float("nan") for p in cfg.policies}
    # decode time vs experts present in one batch
    rows = min(cfg.sweep_rows, cfg.n_slots)
    pos = min(cfg.max_len - 2, 64)
    dense_engine = Engine(models.dense, ecfg) if models.dense is not None else None
    sweep, sweep_dense = _expert_sweep(engine, dense_engine, rows, pos, cfg.sweep_repeats)
    # per-token decode latency at batch 1: MoE vs dense, interleaved in the same run
    latency = _latency_compare(engine, dense_engine, prompt_fn, cfg)
    if moe.is_moe:
        latency["router_step_ms_measured"] = 1e3 * router_step_time(moe, cfg.max_len)
        latency["router_share_of_moe_token"] = latency["router_step_ms_measured"] / latency["moe_ms_per_token_median"]
    result = {
        "what": "serve-bench: measured engine compute on a virtual Poisson clock; *_simulated = simulated link",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": _machine(), "model": models.description, "n_experts": E,
        "expert_bytes": moe.expert_bytes(), "config": to_dict(cfg), "n_requests": len(specs),
        "policies": policies, "calibrated": {k: v for k, v in calibrated.items() if k != "runs"},
        "greedy_outputs_agree_with_" + first: agree,
        "decode_step_ms_vs_present_experts_measured": {"rows": rows, "position": pos, "moe": sweep,
                                                       "dense": sweep_dense},
        "batch1_decode_latency": latency, "compile_and_warmup_s": engine.compile_s, "burn_in_s": burn_s,
        "prompt_domains": _count(domain_of.values()), "total_wall_s": time.perf_counter() - t_start,
    }
    result["plots"] = _plots(out, result, step_sets, calibrated["runs"])
    write_json(out / "serve_bench.json", result)
    log(f"[serve-bench] wrote {out / 'serve_bench.json'} and {len(result['plots'])} plots")
    return result


def _scheduler_config(cfg: ServeBenchConfig, policy: str, n_experts: int) -> SchedulerConfig:
    """The scheduler every run of the bench uses for ``policy`` (prompts over the budget run in chunks)."""
    return SchedulerConfig(policy=policy, token_budget=cfg.token_budget, n_slots=cfg.n_slots,
                           max_queue=cfg.max_queue, max_wait_steps=cfg.max_wait_steps, n_experts=n_experts,
                           chunked_prefill=True)


def _run_policy(engine: Engine, specs, policy: str, cfg: ServeBenchConfig, progress: bool, log) -> tuple[dict, Any]:
    """One scheduler policy on the real engine over the workload: ``(summary, simulation result)``;
    the summary holds latencies, measured compute, hit ratios and the simulated prefetch replay."""
    E = engine.model.n_experts
    scfg = _scheduler_config(cfg, policy, E)
    runner = EngineRunner(engine, SamplingParams(temperature=cfg.temperature))
    t0 = time.perf_counter()
    res = simulate(specs, Scheduler(scfg), runner=runner, record_future=True,
                   lookahead_steps=cfg.lookahead_steps, progress=progress)
    wall = time.perf_counter() - t0
    s = summarize(res.requests, res.steps, res.makespan_s)
    s.pop("transfer_stall_s_total_simulated", None)  # no store in these runs
    s["n_invalid"] = len(res.invalid)
    s["invalid"] = {str(k): v for k, v in res.invalid.items()}
    s["reject_reasons"] = sorted({r.reject_reason for r in res.requests if r.status is Status.REJECTED})
    rs = runner.steps
    s["measured_compute_s"] = float(sum(st.compute_s for st in res.steps))
    s["measured_step_compute_s"] = float(sum(r["compute_s"] for r in rs))
    s["measured_arrival_routing_s"] = float(sum(r["router_arrival_s"] for r in rs))
    dec = [r["compute_s"] for r in rs if r["n_decode"] and not r["n_prefill"]]
    s["decode_only_step_ms_mean"] = 1e3 * float(np.mean(dec)) if dec else float("nan")
    s["wall_s"] = wall
    s["hit_ratio"] = hit_ratio_table([st.experts for st in res.steps], cfg.capacities, cfg.cache_policies,
                                     futures=[st.future for st in res.steps], seed=cfg.seed)
    s["prefetch_simulated"] = {
        str(c): {mode: replay_store(res.steps, c, "belady", engine.model.expert_bytes(),
                                    cfg.link_bandwidth_bytes_per_s, cfg.link_latency_s, mode == "prefetch")
                 for mode in ("on_demand", "prefetch")} for c in cfg.capacities if c < E}
    log(f"[serve-bench] {policy}: latency mean {s['latency_mean_s']:.3f}s p95 {s['latency_p95_s']:.3f}s, "
        f"unique experts/batch {s.get('unique_experts_per_batch_mean', float('nan')):.2f}, "
        f"finished {s['n_finished']}/{len(specs)} ({wall:.1f}s wall)")
    return s, res


def _expert_sweep(engine: Engine, dense_engine: Engine | None, rows: int, pos: int, repeats: int):
    """Median ms of a decode step of ``rows`` requests at position ``pos`` with k = 1..min(E, rows)
    experts present (round robin over k, so load noise spreads evenly), and the dense model's at the
    same batch (``Engine.time_step``: the same compute as real decodes at that window)."""
    ks = list(range(1, min(engine.model.n_experts, rows) + 1))
    t: dict = {k: [] for k in ks}
    td = []
    W = engine.cfg.window(pos + 1)
    for _ in range(repeats):
        for k in ks:
            t[k].extend(engine.time_step(rows, rows, np.arange(rows) % k, window=W))
        if dense_engine is not None:
            td.extend(dense_engine.time_step(rows, rows, np.zeros(rows), window=W))
    return {k: 1e3 * float(np.median(v)) for k, v in t.items()}, (1e3 * float(np.median(td)) if td else None)


def _latency_compare(engine: Engine, dense_engine: Engine | None, prompt_fn, cfg: ServeBenchConfig) -> dict:
    prompt = prompt_fn(cfg.latency_prompt_len, cfg.seed + 12345)
    n = min(cfg.latency_tokens, cfg.max_len - prompt.size - 1)
    times: dict[str, list] = {"moe": [], "dense": []}
    for _ in range(cfg.latency_repeats):
        times["moe"].extend(decode_latency(engine, prompt, n))
        if dense_engine is not None:
            times["dense"].extend(decode_latency(dense_engine, prompt, n))
    out = {"batch": 1, "prompt_len": int(prompt.size), "tokens_per_repeat": n, "repeats": cfg.latency_repeats}
    for k, v in times.items():
        if v:
            out[f"{k}_ms_per_token_median"] = 1e3 * float(np.median(v))
            out[f"{k}_ms_per_token_mean"] = 1e3 * float(np.mean(v))
            out[f"{k}_ms_per_token_p95"] = 1e3 * float(np.percentile(v, 95))
    if times["dense"]:
        out["moe_vs_dense_median_change"] = out["moe_ms_per_token_median"] / out["dense_ms_per_token_median"] - 1
    out["samples_ms"] = {k: [round(1e3 * x, 4) for x in v] for k, v in times.items()}
    return out


def fit_step_time(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of ``y ~ X @ coef`` with every coefficient >= 0 (an intercept column in ``X``
    stays a free non-negative term). A solved constrained fit (``scipy.optimize.nnls``), not the
    unconstrained one with its negative coefficients clipped to 0, which is no fit at all."""
    coef, _ = scipy.optimize.nnls(np.asarray(X, np.float64), np.asarray(y, np.float64))
    return coef


def _calibrated_runs(specs, routes: dict, runs: dict, cfg: ServeBenchConfig, E: int) -> dict:
    """The policies again, model-free and deterministic: the real router's routes (recorded by the
    engine) and a step-time model ``a + b*tokens + c*experts`` fitted to every measured engine step.

    Measured-clock runs on a shared CPU are confounded by load: a slower step lets more work
    queue, which changes the batches. This comparison removes that noise; its times are MODELLED.
    """
    steps = [st for res in runs.values() for st in res.steps]
    X = np.array([[1.0, st.n_tokens, len(st.experts)] for st in steps])
    y = np.array([st.compute_s for st in steps])
    coef = fit_step_time(X, y)
    pred = X @ coef
    r2 = 1.0 - float(((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30))
    cost = CostModel(float(coef[0]), float(coef[1]), float(coef[2]))
    real = [dataclasses.replace(s, prompt_routes=routes[s.rid][:s.prompt_len], output_routes=routes[s.rid][s.prompt_len:],
                                output_len=len(routes[s.rid]) - s.prompt_len)  # EOS may end a request early
            for s in specs if s.rid in routes]
    out: dict = {"what": "MODELLED step times (fit to measured engine steps), real routes; deterministic",
                 "cost_model_fit": {"a_s": cost.a_s, "b_s_per_token": cost.b_s_per_token,
                                    "c_s_per_expert": cost.c_s_per_expert, "r2": r2, "n_steps": len(steps)},
                 "n_requests": len(real), "policies": {}, "runs": {}}
    for policy in runs:
        res = simulate(real, Scheduler(_scheduler_config(cfg, policy, E)), cost, record_future=True,
                       lookahead_steps=cfg.lookahead_steps)
        s = summarize(res.requests, res.steps, res.makespan_s)
        s.pop("transfer_stall_s_total_simulated", None)
        s["hit_ratio"] = hit_ratio_table([st.experts for st in res.steps], cfg.capacities, cfg.cache_policies,
                                         futures=[st.future for st in res.steps], seed=cfg.seed)
        out["policies"][policy] = s
        out["runs"][policy] = res
    return out


def _plots(out: Path, r: dict, runs: dict, calibrated: dict) -> list[str]:
    paths = []
    for name, rr in (("measured", runs), ("calibrated", calibrated)):
        norm = {p: request_metrics(res.requests).normalized_latency_s for p, res in rr.items()}
        what = "measured compute" if name == "measured" else "fitted step-time model, real routes"
        paths.append(plot_normalized_latency_hist(norm, out / f"normalized_latency_{name}.png",
                                                  title=f"normalized latency ({what})"))
        paths.append(plot_unique_experts({p: [len(s.experts) for s in res.steps] for p, res in rr.items()},
                                         out / f"unique_experts_{name}.png",
                                         title=f"unique experts per batch ({name})"))
    pol = "expert_aware" if "expert_aware" in r["policies"] else next(iter(r["policies"]))
    paths.append(plot_hit_ratio_vs_capacity(r["calibrated"]["policies"][pol]["hit_ratio"], out / "hit_ratio.png",
                                            title=f"expert cache hit ratio ({pol} batches, calibrated run)"))
    fig = new_figure(3, 4.0, 3.2)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    sw = r["decode_step_ms_vs_present_experts_measured"]
    ks = sorted(sw["moe"])
    ax1.plot(ks, [sw["moe"][k] for k in ks], marker="o", label="Read-ME MoE")
    if sw["dense"] is not None:
        ax1.axhline(sw["dense"], color="tab:gray", linestyle="--", label="dense")
    ax1.set(xlabel="experts present in the batch", ylabel="decode step (ms, measured)",
            title=f"decode, batch {sw['rows']}")
    ax1.legend(fontsize=7)
    lat = r["batch1_decode_latency"]
    names = [k for k in ("moe", "dense") if f"{k}_ms_per_token_median" in lat]
    ax2.bar(names, [lat[f"{k}_ms_per_token_median"] for k in names], color=["tab:blue", "tab:gray"][:len(names)])
    ax2.set(ylabel="ms / token (median, measured)", title="decode latency, batch 1")
    pf = r["policies"][pol]["prefetch_simulated"]
    caps = sorted(pf, key=int)
    x = np.arange(len(caps))
    for i, mode in enumerate(("on_demand", "prefetch")):
        ax3.bar(x + 0.4 * i - 0.2, [pf[c][mode]["stall_s_simulated"] for c in caps], 0.4, label=mode)
    ax3.set_xticks(x, caps)
    ax3.set(xlabel="capacity (experts)", ylabel="load stall (s, SIMULATED link)",
            title=f"expert loads ({pol}, belady)")
    ax3.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "engine.png")
    paths.append(out / "engine.png")
    return [Path(p).name for p in paths]  # file names inside out_dir


def _machine() -> str:
    d = jax.devices()[0]
    return f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} on {d.platform} ({d.device_kind})"


def _count(xs) -> dict:
    out: dict = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny",
                        help="'tiny' (random), 'smollm-timing' (SmolLM2 + random experts, untrained router) or a "
                             "directory written by save_bench_models (default: tiny)")
    parser.add_argument("--out", default="serve_bench_out", help="output directory (JSON + PNG)")
    parser.add_argument("--config", default=None, help="YAML file of ServeBenchConfig keys")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. workload.n_requests=32")


def run(args: argparse.Namespace) -> dict:
    cfg = load_bench_config(args.config, args.overrides)
    models = load_bench_models(args.model, seed=cfg.seed)
    return run_serve_bench(models, cfg, args.out, progress=not args.no_progress)


def main(argv=None) -> None:
    """``python -m readme_jax.serve.sim.bench [--model tiny] [--out DIR] [key=value ...]``."""
    ap = argparse.ArgumentParser(prog="readme-jax serve-bench", description=__doc__.splitlines()[0])
    add_arguments(ap)
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()

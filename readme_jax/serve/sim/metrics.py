"""Serving metrics (per request and per run), cache hit-ratio tables, and plot helpers.

Per request: end-to-end latency ``finish - arrival``, normalized latency ``latency / output
tokens`` and time to first token ``first_token - arrival``. Per run: mean and p95 (numpy's
linear-interpolation percentile) of each, throughput, mean unique experts and tokens per
batch. Plots draw on Agg figures (no display, no pyplot global state).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from readme_jax.config import CACHE_POLICIES
from readme_jax.errors import ReadmeError
from readme_jax.figures import new_figure
from readme_jax.serve.scheduling.cache_policy import simulate_cache
from readme_jax.serve.scheduling.requests import Request, Status


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    rid: np.ndarray
    latency_s: np.ndarray
    normalized_latency_s: np.ndarray  # seconds per output token
    ttft_s: np.ndarray
    output_tokens: np.ndarray


def request_metrics(requests: Sequence[Request]) -> RequestMetrics:
    """Metrics of the FINISHED requests (rejected or unfinished ones are skipped)."""
    fin = [r for r in requests if r.status is Status.FINISHED]
    for r in fin:
        if r.finish_s is None or r.first_token_s is None or r.n_generated < 1:
            raise ReadmeError(f"request {r.rid} is marked finished but lacks timestamps or tokens")
    arr = np.array([r.arrival_s for r in fin], np.float64)
    lat = np.array([r.finish_s for r in fin], np.float64) - arr
    ntok = np.array([r.n_generated for r in fin], np.int64)
    ttft = np.array([r.first_token_s for r in fin], np.float64) - arr
    return RequestMetrics(np.array([r.rid for r in fin], np.int64), lat, lat / np.maximum(ntok, 1), ttft, ntok)


def _mean(x) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def _p95(x) -> float:
    return float(np.percentile(x, 95)) if len(x) else float("nan")


def summarize(requests: Sequence[Request], steps: Sequence = (), makespan_s: float | None = None) -> dict:
    """Per-run summary. ``steps``: records with ``n_tokens`` and ``experts`` (e.g. simulate's)."""
    m = request_metrics(requests)
    if makespan_s is None:
        ends = [r.finish_s for r in requests if r.finish_s is not None]
        makespan_s = max(ends) if ends else 0.0
    out = {
        "n_requests": len(requests),
        "n_finished": int(len(m.rid)),
        "n_rejected": sum(1 for r in requests if r.status is Status.REJECTED),
        "latency_mean_s": _mean(m.latency_s),
        "latency_p95_s": _p95(m.latency_s),
        "normalized_latency_mean_s": _mean(m.normalized_latency_s),
        "normalized_latency_p95_s": _p95(m.normalized_latency_s),
        "ttft_mean_s": _mean(m.ttft_s),
        "ttft_p95_s": _p95(m.ttft_s),
        "makespan_s": float(makespan_s),
        "throughput_tokens_per_s": float(m.output_tokens.sum() / makespan_s) if makespan_s > 0 else float("nan"),
        "throughput_requests_per_s": float(len(m.rid) / makespan_s) if makespan_s > 0 else float("nan"),
    }
    if len(steps):
        out["n_steps"] = len(steps)
        out["unique_experts_per_batch_mean"] = _mean([len(s.experts) for s in steps])
        out["tokens_per_batch_mean"] = _mean([s.n_tokens for s in steps])
        if all(hasattr(s, "n_prefill") for s in steps):
            out["items_per_batch_mean"] = _mean([s.n_prefill + s.n_decode for s in steps])
        if all(hasattr(s, "stall_s") for s in steps):
            out["transfer_stall_s_total_simulated"] = float(sum(s.stall_s for s in steps))
    return out


def hit_ratio_table(step_sets: Sequence, capacities: Sequence[int], policies: Sequence[str] = CACHE_POLICIES, *,
                    futures: Sequence[Sequence[int]] | None = None, seed: int = 0) -> dict:
    """``{policy: {capacity: hit ratio}}`` on one per-step access sequence, plus an ``optimum`` row.

    ``belady`` uses ``futures`` (what the scheduler knew at each step) when given, else the
    whole future; ``optimum`` is always Belady with the whole future, the offline optimum.
    """
    table: dict = {}
    for p in list(policies) + ["optimum"]:
        table[p] = {}
        for c in capacities:
            if p == "optimum":
                st = simulate_cache(step_sets, c, "belady")
            else:
                st = simulate_cache(step_sets, c, p, seed=seed, futures=futures if p == "belady" else None)
            table[p][int(c)] = st.hit_ratio
    return table


# ----------------------------------------------------------------------------- plots


def plot_normalized_latency_hist(per_policy: Mapping[str, np.ndarray], path: str | Path, *, bins: int = 30,
                                 title: str = "normalized latency") -> Path:
    """One histogram per policy (seconds per output token), p95 marked."""
    if not per_policy:
        raise ReadmeError("plot_normalized_latency_hist: no policies given")
    fig = new_figure(len(per_policy))
    axes = fig.subplots(1, len(per_policy), squeeze=False)[0]
    for ax, (name, x) in zip(axes, per_policy.items()):
        x = np.asarray(x, np.float64)
        ax.hist(x, bins=bins, color="tab:blue", alpha=0.8)
        if len(x):
            p95 = _p95(x)
            ax.axvline(p95, color="tab:red", linestyle="--", label=f"p95 {p95:.3g} s")
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("s / output token")
    axes[0].set_ylabel("requests")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def plot_hit_ratio_vs_capacity(table: Mapping[str, Mapping[int, float]], path: str | Path, *,
                               title: str = "expert cache hit ratio") -> Path:
    """Hit ratio vs capacity, one line per policy (a :func:`hit_ratio_table`)."""
    fig = new_figure(1, 4.5, 3.2)
    ax = fig.subplots()
    for name, row in table.items():
        caps = sorted(row)
        ax.plot(caps, [100 * row[c] for c in caps], marker="o", label=name)
    ax.set_xlabel("capacity (experts on device)")
    ax.set_ylabel("hit ratio (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def plot_unique_experts(per_policy: Mapping[str, Sequence[int]], path: str | Path, *,
                        title: str = "unique experts per batch") -> Path:
    """Distribution of unique experts per batch for each policy (box plot, mean marked)."""
    if not per_policy:
        raise ReadmeError("plot_unique_experts: no policies given")
    fig = new_figure(1, 1.2 * len(per_policy) + 2.0, 3.2)
    ax = fig.subplots()
    names = list(per_policy)
    data = [np.asarray(per_policy[n], np.float64) for n in names]
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names, fontsize=8)
    ax.set_ylabel("unique experts")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path

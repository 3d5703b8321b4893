"""The serving summary from the two measured benchmarks: ``docs/results/serving.json`` and its plots.

    python -m readme_jax.bench.serving_report --latency LAT.json [--latency-more LAT2.json ...] \
        --store STORE.json [--sweep SWEEP.json] --out docs/results/serving.json --plots docs

``LAT.json`` is written by ``readme_jax.bench.serving_latency``, ``STORE.json`` by
``readme_jax.bench.expert_store``. Nothing here measures; it only selects and draws.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from readme_jax.jsonfile import read_json, write_json  # noqa: E402

LAT_KEYS = ("p95_norm_latency", "mean_norm_latency")


def shape_name(lat: dict) -> str:
    """A latency run's serving shape, e.g. ``16 slots, 24 requests, budget 32``."""
    w = lat["workload"]
    return f"{w['slots']} slots, {w['requests']} requests, budget {w['token_budget']}"


def compose(lat: dict, store: dict, sweep: dict | None = None, more: tuple = ()) -> dict:
    """``policies``/``control``: ``lat``'s heaviest rate; ``by_rate``: every rate of ``lat``;
    ``by_shape``: every rate of ``lat`` and of each run in ``more`` (other serving shapes)."""
    rates = sorted(lat["summary"], key=float)
    heavy = rates[-1]

    def fields(v):
        out = {k: {q: v[k][q] for q in ("mean", "ci95_low", "ci95_high")} for k in LAT_KEYS}
        out["unique_experts_per_call"] = v["unique_experts_per_call"]["mean"]
        out["unique_experts_per_call_when_budget_binds"] = v["unique_experts_per_call_bound"]["mean"]
        out["budget_bound_share"] = v["bound_share"]["mean"]
        out["mean_ttft"] = v["mean_ttft"]["mean"]
        return out

    def rate_table(run: dict) -> dict:
        return {r: {p: fields(v) for p, v in run["summary"][r].items()} for r in sorted(run["summary"], key=float)}

    by_rate = rate_table(lat)
    by_shape = {shape_name(lat): by_rate, **{shape_name(run): rate_table(run) for run in more}}
    cache = {}
    for cap, pols in store["summary"].items():
        cache[cap] = {p: {"hit_ratio": v["hit_ratio"]["mean"], "stall_seconds": v["stall_seconds"]["mean"],
                          "stall_seconds_ci95": [v["stall_seconds"]["ci95_low"], v["stall_seconds"]["ci95_high"]],
                          "total_seconds": v["total_seconds"]["mean"]}
                      for p, v in pols.items() if not p.startswith("stall_ratio")}
        cache[cap]["stall_ratio_belady_prefetch_vs_lru_on_demand"] = \
            pols["stall_ratio_belady_prefetch_vs_lru_on_demand"]
    pol = {p: v for p, v in by_rate[heavy].items() if not p.endswith("_blind")}
    sweep = sweep or lat.get("step_ms_vs_experts")
    return {"policies": pol, "control": by_rate[heavy]["expert_aware_blind"], "rate_per_s": float(heavy),
            "shape": shape_name(lat), "by_rate": by_rate, "by_shape": by_shape, "cache": cache,
            "step_ms_vs_experts": sweep,
            "sources": {"latency": {k: lat[k] for k in ("command", "machine", "date", "model", "workload",
                                                         "warmup_seconds")},
                        "latency_more": [{k: run[k] for k in ("command", "machine", "date", "model", "workload",
                                                              "warmup_seconds")} for run in more],
                        "cache": {k: store[k] for k in ("command", "machine", "date", "model", "workload",
                                                         "expert_bytes", "all_outputs_equal_all_resident")}}}


def plots(lat: dict, store: dict, out_dir: Path, prefix: str = "", more: tuple = ()) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    panels = [(run, r) for run in (lat, *more) for r in sorted(run["summary"], key=float)]
    pols = list(lat["summary"][panels[0][1]])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharey=True)
    axes = axes if len(panels) > 1 else [axes]
    for ax, (run, r) in zip(axes, panels):
        for k, (key, mark) in enumerate((("p95_norm_latency", "o"), ("mean_norm_latency", "s"))):
            m = [run["summary"][r][p][key]["mean"] for p in pols]
            lo = [m[i] - run["summary"][r][p][key]["ci95_low"] for i, p in enumerate(pols)]
            hi = [run["summary"][r][p][key]["ci95_high"] - m[i] for i, p in enumerate(pols)]
            ax.errorbar([i + 0.15 * k for i in range(len(pols))], m, yerr=[lo, hi], fmt=mark, capsize=3,
                        label=key.replace("_", " "))
        ax.set_xticks(range(len(pols)), [p.replace("_", "\n") for p in pols], fontsize=8)
        ax.set_title(f"{float(r):g} requests/s; {shape_name(run)}\n(measured, 95 % CI over seeds)", fontsize=9)
        ax.set_ylabel("normalized latency (s / output token)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    paths.append(out_dir / f"{prefix}serving_latency_measured.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    caps = list(store["summary"])
    spols = [p for p in store["summary"][caps[0]] if not p.startswith("stall_ratio")]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    w = 0.8 / len(spols)
    for j, p in enumerate(spols):
        xs = [i + j * w for i in range(len(caps))]
        m = [store["summary"][c][p]["stall_seconds"]["mean"] for c in caps]
        lo = [m[i] - store["summary"][c][p]["stall_seconds"]["ci95_low"] for i, c in enumerate(caps)]
        hi = [store["summary"][c][p]["stall_seconds"]["ci95_high"] - m[i] for i, c in enumerate(caps)]
        a1.bar(xs, m, w, yerr=[lo, hi], capsize=2, label=p)
        a2.bar(xs, [store["summary"][c][p]["hit_ratio"]["mean"] for c in caps], w, label=p)
    for ax, title in ((a1, "stall seconds per run (real copies)"), (a2, "hit ratio")):
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(caps))], [f"capacity {c} of {store['n_experts']}"
                                                                     for c in caps])
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    a1.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / f"{prefix}expert_store_measured.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latency", type=Path, required=True, help="the headline serving shape's latency run")
    p.add_argument("--latency-more", type=Path, nargs="*", default=[],
                   help="latency runs of other serving shapes (slots, requests), for by_shape and the plot")
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--sweep", type=Path, default=None, help="a --sweep-only run of serving_latency (step ms vs experts)")
    p.add_argument("--out", type=Path, default=Path("docs/results/serving.json"))
    p.add_argument("--plots", type=Path, default=Path("docs"))
    p.add_argument("--prefix", default="", help="file-name prefix of the plots (keeps an earlier set beside)")
    a = p.parse_args(argv)
    lat, store = read_json(a.latency), read_json(a.store)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    sweep = read_json(a.sweep)["step_ms_vs_experts"] if a.sweep else None
    more = tuple(read_json(f) for f in a.latency_more)
    write_json(a.out, compose(lat, store, sweep, more))
    for path in plots(lat, store, a.plots, a.prefix, more):
        print(path)
    print(a.out)


if __name__ == "__main__":
    main()

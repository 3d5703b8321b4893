"""Stage `report`: ``report.md``, PNG plots and ``metrics.json`` from the other stages' outputs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from readme_jax.train.loop import stage_summaries
from readme_jax.workflow.workspace import Workspace, write_json

ROW_LABELS = {
    "dense": "dense",
    "pruned_dense": "pruned dense (same active width)",
    "pruned_dense_tuned": "pruned dense, tuned (same LM tokens)",
    "readme_oracle_untrained": "Read-ME, oracle routing, untrained",
    "readme_router_only": "Read-ME, router tuned, experts untouched",
    "readme_trained": "Read-ME after all rounds",
    "moe_oracle": "MoE, own-domain expert",
    "moe_wrong": "MoE, wrong expert",
}


def _figure(w=7, h=4):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110)


def plot_ppl_bars(rows: dict, path: Path, title: str):
    names = [r for r in rows if rows[r]]
    domains = list(next(iter(rows.values())).keys())
    fig = _figure(max(7, len(domains) * 1.2), 4)
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    x = np.arange(len(domains))
    for i, n in enumerate(names):
        ax.bar(x + i * width, [rows[n].get(d, np.nan) for d in domains], width, label=ROW_LABELS.get(n, n))
    ax.set_xticks(x + 0.4 - width / 2, domains, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def plot_training(train_dir: Path, out: Path) -> list[str]:
    files = []
    summaries = stage_summaries(train_dir)
    if not summaries:
        return files
    rows = []
    for p in sorted((train_dir / "metrics").glob("stage_[0-9]*.jsonl")):
        rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    fig = _figure(10, 3.5)
    for k, (stage, key) in enumerate((("router", "loss"), ("router", "agreement"), ("experts", "loss"))):
        ax = fig.add_subplot(1, 3, k + 1)
        r = [x for x in rows if x["stage"] == stage]
        ax.plot(np.arange(len(r)), [x[key] for x in r], lw=1)
        for b in np.flatnonzero(np.diff([x["round"] for x in r])):
            ax.axvline(b + 0.5, color="gray", lw=0.5, ls=":")
        ax.set_title(f"{stage} {key}")
        ax.set_xlabel("micro-step (rounds dotted)")
    fig.tight_layout()
    fig.savefig(out / "training_curves.png")
    files.append("training_curves.png")

    fig = _figure(10, 3.5)
    ax = fig.add_subplot(1, 2, 1)
    names = [s["name"] for s in summaries]
    for d in summaries[0]["val_ppl"]:
        ax.plot(range(len(summaries)), [s["val_ppl"][d] for s in summaries], marker="o", ms=3, label=d)
    ax.set_xticks(range(len(summaries)), names, rotation=60, fontsize=6)
    ax.set_yscale("log")
    ax.set_title("validation perplexity after each stage")
    ax.legend(fontsize=6)
    ax = fig.add_subplot(1, 2, 2)
    ax.plot(range(len(summaries)), [s["locality_mean"] for s in summaries], marker="o")
    ax.set_xticks(range(len(summaries)), names, rotation=60, fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_title("router locality (same expert as previous token)")
    fig.tight_layout()
    fig.savefig(out / "stage_metrics.png")
    files.append("stage_metrics.png")
    return files


def plot_expert_load(load: dict, path: Path):
    domains = list(load)
    m = np.asarray([load[d] for d in domains])
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    ax.set_yticks(range(len(domains)), domains)
    ax.set_xticks(range(m.shape[1]), [f"e{i}" for i in range(m.shape[1])])
    ax.set_xlabel("expert")
    ax.set_title("fraction of each domain's tokens per expert")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path)


def _table(rows: dict) -> list[str]:
    names = [r for r in rows if rows[r]]
    domains = list(rows[names[0]].keys())
    lines = ["| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for n in names:
        lines.append(f"| {ROW_LABELS.get(n, n)} | " + " | ".join(
            f"{rows[n][d]:.2f}" if d in rows[n] else "—" for d in domains) + " |")
    return lines


def _fmt(v, spec=".3f"):
    return "—" if v is None else format(v, spec)


def serving_section(h: dict) -> list[str]:
    md = ["## Serving benchmark", "",
          "Same engine, same workload, same token budget per step for every policy. `measured`: real step "
          "times on this machine (sensitive to load); `calibrated`: the recorded routes replayed with a step-time "
          "model fitted to the measured steps (deterministic). Normalized latency = latency / output tokens.", ""]
    for kind in ("measured", "calibrated"):
        rows = h.get(f"policies_{kind}", {})
        if not rows:
            continue
        md += [f"### Policies ({kind})", "",
               "| policy | norm. latency mean (s) | norm. latency p95 (s) | latency mean (s) | TTFT mean (s) "
               "| unique experts / batch | tokens / batch |", "|---|---|---|---|---|---|---|"]
        for p, r in rows.items():
            md.append(f"| {p} | {_fmt(r['normalized_latency_mean_s'])} | {_fmt(r['normalized_latency_p95_s'])} | "
                      f"{_fmt(r['latency_mean_s'], '.2f')} | {_fmt(r['ttft_mean_s'], '.2f')} | "
                      f"{_fmt(r['unique_experts_per_batch_mean'], '.2f')} | {_fmt(r['tokens_per_batch_mean'], '.1f')} |")
        md.append("")
    hr = h.get("hit_ratio", {})
    if hr:
        caps = list(next(iter(hr.values())).keys())
        md += ["### Expert cache hit ratio (first policy's batches)", "",
               "| cache policy | " + " | ".join(f"capacity {c}" for c in caps) + " |", "|---|" + "---|" * len(caps)]
        md += [f"| {pol} | " + " | ".join(f"{100 * v[c]:.1f} %" for c in caps) + " |" for pol, v in hr.items()]
        md.append("")
    b1 = h.get("batch1_decode_ms_per_token", {})
    if b1.get("moe_ms_per_token_median") is not None:
        md += [f"Batch-1 decode, median ms per token: Read-ME {b1['moe_ms_per_token_median']:.1f}, dense "
               f"{b1['dense_ms_per_token_median']:.1f} ({100 * b1['moe_vs_dense_median_change']:+.1f} %; paper: -19 %); "
               f"router {b1['router_step_ms_measured']:.2f} ms per token "
               f"({100 * b1['router_share_of_moe_token']:.1f} % of a Read-ME token; paper 0.4 %).", ""]
    return md


def run_report(ws: Workspace) -> dict:
    t0 = time.time()
    out = ws.stage_dir("report")
    metrics = {"config": json.loads((ws.out / "config.json").read_text())}
    md = ["# Read-ME on JAX: run report", "",
          f"Model `{ws.cfg.model}`, output `{ws.out}`, written {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    plots = []
    for stage in ("dense_eval", "refactor", "refactor_eval", "train", "baseline", "final_eval", "serve_bench"):
        if ws.is_done(stage):
            metrics[stage] = ws.done_info(stage)
    if "dense_eval" in metrics:
        de = metrics["dense_eval"]
        md += ["## Dense model", "", f"Greedy: `{de['prompt']}` → `{de['completion']}`", ""]
    if "refactor" in metrics:
        r = metrics["refactor"]
        md += ["## Refactoring", "", f"{len(r['domains'])} experts ({', '.join(r['domains'])}), width "
               f"{r['expert_width']} channels; permanent channels per layer: {r['permanent_per_layer']}.", ""]
    if "refactor_eval" in metrics:
        md += ["### Perplexity right after refactoring (no training)", ""] + _table(metrics["refactor_eval"]["ppl"]) + [""]
        plot_ppl_bars(metrics["refactor_eval"]["ppl"], out / "ppl_refactor.png", "after refactoring")
        plots.append("ppl_refactor.png")
    if "final_eval" in metrics:
        fe = metrics["final_eval"]
        md += ["## Results (held-out perplexity)", ""] + _table(fe["ppl"]) + [
            "", f"Router locality (fraction of tokens keeping the previous token's expert): "
                f"{fe['locality_mean']:.3f} (paper: 2921/4096 = 0.713 for Read-ME, 850/4096 = 0.208 for Mixtral).", ""]
        plot_ppl_bars(fe["ppl"], out / "ppl_final.png", "held-out perplexity")
        plot_expert_load(fe["expert_load"], out / "expert_load.png")
        plots += ["ppl_final.png", "expert_load.png"]
    if (ws.out / "train" / "metrics").is_dir():
        plots += plot_training(ws.out / "train", out)
    if "serve_bench" in metrics:
        md += serving_section(metrics["serve_bench"].get("summary", {}))
        for p in metrics["serve_bench"].get("plots", []):
            src = Path(p) if Path(p).is_absolute() else ws.out / "serve_bench" / p
            if src.is_file():
                (out / src.name).write_bytes(src.read_bytes())
                plots.append(src.name)
    md += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    md += ["## Stage times", ""] + [f"- {s}: {metrics[s].get('seconds', 0):.0f} s" for s in metrics if s != "config"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    write_json(out / "metrics.json", metrics)
    ws.mark_done("report", {"plots": plots}, time.time() - t0)
    return {"report": str(out / "report.md"), "plots": plots}

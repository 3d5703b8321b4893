"""Stage `report`: ``report.md``, PNG plots and ``metrics.json`` from the other stages' outputs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from readme_jax.eval.spread import domain_ppl_ci
from readme_jax.figures import new_figure
from readme_jax.jsonfile import write_json
from readme_jax.train.loop import stage_summaries
from readme_jax.workflow.usability import usability_metrics, usability_section
from readme_jax.workflow.workspace import Workspace

PIPELINE_STAGES = ("chat_data", "dense_eval", "refactor", "refactor_eval", "train", "baseline", "final_eval",
                   "chat_eval", "serve_bench")
ROW_ALIASES = {"readme_final": "readme_trained", "pruned_tuned": "pruned_dense_tuned"}  # metrics.json names

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


def plot_ppl_bars(rows: dict, path: Path, title: str, ci: dict | None = None):
    """Grouped bars per domain, one per row, with the 95 % interval as error bars where known."""
    names = [r for r in rows if rows[r]]
    domains = list(next(iter(rows.values())).keys())
    fig = new_figure(1, max(7, len(domains) * 1.2), 4)
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    x = np.arange(len(domains))
    for i, n in enumerate(names):
        v = np.asarray([rows[n].get(d, np.nan) for d in domains])
        lohi = np.asarray([(ci or {}).get(n, {}).get(d, [np.nan, np.nan]) for d in domains]).reshape(-1, 2)
        yerr = np.nan_to_num(np.abs(np.stack([v - lohi[:, 0], lohi[:, 1] - v])))
        ax.bar(x + i * width, v, width, yerr=yerr, capsize=2, label=ROW_LABELS.get(n, n))
    ax.set_xticks(x + 0.4 - width / 2, domains, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def plot_training(train_dir: Path, out: Path, n_experts: int | None = None) -> list[str]:
    files = []
    summaries = stage_summaries(train_dir)
    if not summaries:
        return files
    rows = []
    for p in sorted((train_dir / "metrics").glob("stage_[0-9]*.jsonl")):
        rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    fig = new_figure(1, 10, 3.5)
    for k, (stage, key) in enumerate((("router", "loss"), ("router", "agreement"), ("experts", "loss"))):
        ax = fig.add_subplot(1, 3, k + 1)
        r = [x for x in rows if x["stage"] == stage]
        ax.plot(np.arange(len(r)), [x[key] for x in r], lw=1)
        for b in np.flatnonzero(np.diff([x["round"] for x in r])):
            ax.axvline(b + 0.5, color="gray", lw=0.5, ls=":")
        if key == "agreement":
            ax.set_ylim(0, 1)
            if n_experts:
                _chance_line(ax, n_experts)
        ax.set_title(f"{stage} {key}")
        ax.set_xlabel("micro-step (rounds dotted)")
    fig.tight_layout()
    fig.savefig(out / "training_curves.png")
    files.append("training_curves.png")

    fig = new_figure(1, 10, 3.5)
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


def _chance_line(ax, n_experts: int):
    ax.axhline(1 / n_experts, color="tab:red", lw=0.8, ls="--", label=f"chance 1/E = {1 / n_experts:.2f}")
    ax.legend(fontsize=6)


def plot_expert_load(load: dict, experts: list[str], path: Path):
    """Heatmap: rows are the eval domains, columns the experts named by the domain each was built for."""
    domains = list(load)
    m = np.asarray([load[d] for d in domains])
    fig = new_figure(1, max(5.0, 2.0 + 1.0 * m.shape[1]), max(3.5, 1.6 + 0.5 * len(domains)))
    ax = fig.add_subplot()
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
    ax.set_yticks(range(len(domains)), domains)
    ax.set_xticks(range(m.shape[1]), [f"{experts[i]} expert" if i < len(experts) else f"e{i}"
                                      for i in range(m.shape[1])], rotation=35, ha="right")
    ax.set_ylabel("eval domain")
    ax.set_xlabel("expert (built for domain)")
    ax.set_title("share of a domain's tokens per expert")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path)


def plot_router_accuracy(acc: dict, path: Path, n_experts: int):
    """Bars of the fraction of tokens routed to their domain's expert, per router, with chance 1/E."""
    domains = list(next(iter(acc.values())))
    fig = new_figure(1, max(5, 1.2 * len(domains)), 3.5)
    ax = fig.add_subplot()
    width = 0.8 / len(acc)
    for i, (name, a) in enumerate(acc.items()):
        ax.bar(np.arange(len(domains)) + i * width, [a[d] for d in domains], width, label=name)
    ax.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("tokens routed to own domain's expert")
    ax.set_title("router accuracy vs domain label (held-out blocks)")
    _chance_line(ax, n_experts)
    fig.tight_layout()
    fig.savefig(path)


def _table(rows: dict, ci: dict | None = None) -> list[str]:
    """Markdown perplexity table; a cell reads ``36.20 [34.10, 38.50]`` where the 95 % interval is known."""
    names = [r for r in rows if rows[r]]
    domains = list(rows[names[0]].keys())
    lines = ["| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for n in names:
        lines.append(f"| {ROW_LABELS.get(n, n)} | " + " | ".join(
            _ppl_cell(rows[n].get(d), (ci or {}).get(n, {}).get(d)) for d in domains) + " |")
    return lines


def _ppl_cell(v, lohi) -> str:
    if v is None:
        return "—"
    return f"{v:.2f}" if lohi is None else f"{v:.2f} [{lohi[0]:.2f}, {lohi[1]:.2f}]"


def _fmt(v, spec=".3f"):
    return "—" if v is None else format(v, spec)


def serving_section(h: dict) -> list[str]:
    md = ["## Serving benchmark", "",
          "Same engine, same workload, same token budget per step for every policy. `measured`: real step "
          "times on this machine (sensitive to load); `calibrated`: the recorded routes replayed with a step-time "
          "model fitted to the measured steps (deterministic). Normalized latency = latency / output tokens.", ""]
    if h.get("engine"):
        md += [f"Engine: {h['engine']}.", ""]
    fit = h.get("cost_model_fit")
    if fit:
        md += [f"Calibrated clock's fit (non-negative least squares over {fit['n_steps']} measured steps): "
               f"{1e3 * fit['a_s']:.1f} ms + {1e3 * fit['b_s_per_token']:.2f} ms/token + "
               f"{1e3 * fit['c_s_per_expert']:.2f} ms/expert, R² {fit['r2']:.2f}.", ""]
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


def budget_title(metrics: dict) -> str:
    """The report's title, with the training budget when the train stage is done."""
    t = metrics.get("train")
    if not t:
        return "# Read-ME on JAX: run report"
    r = metrics["config"]["train"]["router"]
    return (f"# Read-ME on JAX: {t['rounds']} rounds; router {r['steps']} steps × batch {r['batch_size']} × "
            f"{r['seq_len']} tokens per round ({t['router_tokens']:,} in all); "
            f"experts {t['lm_tokens']:,} LM tokens in all")


def wins_line(wins: dict | None) -> str:
    if not wins:
        return "Read-ME vs the tuned pruned dense: not compared (baseline stage missing)."
    return (f"Read-ME beats the tuned pruned dense on {wins['better']} of {wins['n_domains']} domains "
            f"({wins['significant']} of them beyond the 95% paired-bootstrap interval).")


def samples_line(config: dict) -> str:
    """Which tokens the run calibrated on and was scored on (the sampling decides what a domain means)."""
    e, c = config.get("eval", {}), config.get("convert", {})
    return (f"Scored on {e.get('blocks_per_domain')} blocks of {e.get('seq_len')} tokens per domain from the "
            f"{e.get('split')} split ({e.get('sampling', 'head')}); calibrated on {c.get('calib_samples')} x "
            f"{c.get('calib_seq_len')} train tokens per domain ({c.get('calib_sampling', 'head')}).")


def results_section(fe: dict, config: dict | None = None) -> list[str]:
    md = ["## Results (held-out perplexity, 95 % bootstrap interval over blocks)", ""]
    if config:
        md += [samples_line(config), ""]
    md += _table(fe["ppl"], fe.get("ppl_ci")) + ["", wins_line(fe.get("wins")), ""]
    if fe.get("comparison"):
        md += ["| domain | log-ppl Read-ME − tuned pruned dense | 95 % interval | beyond the interval |",
               "|---|---|---|---|"]
        md += [f"| {d} | {c['mean_diff']:+.4f} | [{c['lo']:+.4f}, {c['hi']:+.4f}] | "
               f"{'yes' if c['significant'] else 'no'} |" for d, c in fe["comparison"].items()]
        md.append("")
    return md


def router_section(fe: dict) -> list[str]:
    E = len(fe["domains"])
    acc = fe.get("router_accuracy_per_domain", {})
    acc0 = fe.get("router_accuracy_per_domain_router_only", {})
    md = ["## Router (held-out eval blocks)", "",
          f"Accuracy: fraction of a domain's tokens routed to the expert built for that domain (chance 1/E = "
          f"{1 / E:.3f}). Locality: fraction of tokens keeping the previous token's expert (paper: 2921/4096 = "
          f"0.713 for Read-ME, 850/4096 = 0.208 for Mixtral).", "",
          "| domain | accuracy, final router | accuracy, round-0 router | locality |", "|---|---|---|---|"]
    for d in fe["locality"]:
        md.append(f"| {d} | {_fmt(acc.get(d))} | {_fmt(acc0.get(d))} | {_fmt(fe['locality'][d])} |")
    md += [f"| **mean** | {_fmt(fe.get('router_accuracy'))} | {_fmt(fe.get('router_accuracy_router_only'))} | "
           f"{_fmt(fe['locality_mean'])} |", "",
           "Expert load (rows: eval domain; columns: expert, named by the domain it was built for):", "",
           "| domain | " + " | ".join(fe["domains"]) + " |", "|---|" + "---|" * E]
    md += [f"| {d} | " + " | ".join(f"{v:.2f}" for v in load) + " |" for d, load in fe["expert_load"].items()]
    return md + [""]


def final_eval_plots(fe: dict, out: Path) -> list[str]:
    plot_ppl_bars(fe["ppl"], out / "ppl_final.png", "held-out perplexity (95 % interval)", fe.get("ppl_ci"))
    plot_expert_load(fe["expert_load"], fe["domains"], out / "expert_load.png")
    plots = ["ppl_final.png", "expert_load.png"]
    acc = {"final router": fe.get("router_accuracy_per_domain"),
           "round-0 router": fe.get("router_accuracy_per_domain_router_only")}
    acc = {k: v for k, v in acc.items() if v}
    if acc:
        plot_router_accuracy(acc, out / "router_accuracy.png", len(fe["domains"]))
        plots.append("router_accuracy.png")
    return plots


def headline_metrics(stages: dict) -> dict:
    """metrics.json's top-level summary: ppl and ppl_ci per row (with aliases), router accuracy,
    locality, wins, and the main job's time."""
    out = main_job_seconds(stages)
    fe = stages.get("final_eval")
    if not fe:
        return out
    ppl, ci = dict(fe["ppl"]), dict(fe.get("ppl_ci", {}))
    for alias, row in ROW_ALIASES.items():
        for table in (ppl, ci):
            if row in table:
                table[alias] = table[row]
    return {"ppl": ppl, "ppl_ci": ci, "router_accuracy": fe.get("router_accuracy"),
            "locality": fe["locality_mean"], "wins": fe.get("wins"), **usability_metrics(stages), **out}


def main_job_seconds(stages: dict) -> dict:
    """Sum of the ``seconds`` the pipeline stages' done.json files record (the report's own time excluded)."""
    have = [s for s in PIPELINE_STAGES if "seconds" in stages.get(s, {})]
    lacking = [s for s in PIPELINE_STAGES if s not in have]
    note = f"sum over {', '.join(have)}; report stage excluded (it writes this file)"
    if lacking:
        note += f"; not counted (not done or no seconds recorded): {', '.join(lacking)}"
    return {"main_job_seconds": round(sum(float(stages[s]["seconds"]) for s in have), 2),
            "main_job_seconds_note": note}


def run_report(ws: Workspace) -> dict:
    t0 = time.time()
    out = ws.stage_dir("report")
    stages = {s: ws.done_info(s) for s in PIPELINE_STAGES if ws.is_done(s)}
    metrics = {"config": json.loads((ws.out / "config.json").read_text()), **stages}
    md = [budget_title(metrics), "",
          f"Model `{ws.cfg.model}`, output `{ws.out}`, written {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    plots = []
    if "dense_eval" in stages:
        de = stages["dense_eval"]
        md += ["## Dense model", "", f"Greedy: `{de['prompt']}` → `{de['completion']}`", ""]
    if "refactor" in stages:
        r = stages["refactor"]
        md += ["## Refactoring", "", f"{len(r['domains'])} experts ({', '.join(r['domains'])}), width "
               f"{r['expert_width']} channels; permanent channels per layer: {r['permanent_per_layer']}.", ""]
    if "refactor_eval" in stages:
        re_ = stages["refactor_eval"]
        ci = {row: domain_ppl_ci(v) for row, v in re_.get("nll_blocks", {}).items()}
        md += ["### Perplexity right after refactoring (no training)", ""] + _table(re_["ppl"], ci) + [""]
        plot_ppl_bars(re_["ppl"], out / "ppl_refactor.png", "after refactoring (95 % interval)", ci)
        plots.append("ppl_refactor.png")
    n_experts = len(stages["refactor"]["domains"]) if "refactor" in stages else None
    answers = ws.out / "chat_eval" / "answers.json"
    md += usability_section(stages, json.loads(answers.read_text()) if answers.is_file() else None)
    if "final_eval" in stages:
        md += results_section(stages["final_eval"], metrics["config"]) + router_section(stages["final_eval"])
        plots += final_eval_plots(stages["final_eval"], out)
    if (ws.out / "train" / "metrics").is_dir():
        plots += plot_training(ws.out / "train", out, n_experts)
    if "serve_bench" in stages:
        md += serving_section(stages["serve_bench"].get("summary", {}))
        for p in stages["serve_bench"].get("plots", []):
            src = Path(p) if Path(p).is_absolute() else ws.out / "serve_bench" / p
            if src.is_file():
                (out / src.name).write_bytes(src.read_bytes())
                plots.append(src.name)
    metrics.update(headline_metrics(stages))
    md += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    md += ["## Stage times", ""] + [f"- {s}: {info.get('seconds', 0):.0f} s" for s, info in stages.items()]
    md += [f"- main job (stages above): {metrics['main_job_seconds']:.0f} s ({metrics['main_job_seconds_note']})"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    write_json(out / "metrics.json", metrics)
    ws.mark_done("report", {"plots": plots}, time.time() - t0)
    return {"report": str(out / "report.md"), "plots": plots}

"""Read-ME vs its tuned pruned twin over several finished runs (training seeds, budgets), side by side.

    python -m readme_jax.bench.seed_spread --runs NAME=RUN_DIR ... [--pool NAME,NAME,...] \
        [--across NAME,NAME,...] --json OUT.json [--plot OUT.png]

For each run (its ``final_eval/done.json``): the paired block bootstrap of the log-perplexity difference
(Read-ME minus the tuned pruned dense) per domain, as the report computes it. ``--pool``: per test block,
the NLL averaged over the listed runs first, then the same bootstrap. ``--across``: a t-interval over the
listed runs' per-domain mean differences (the training-seed spread, which the block bootstrap does not
see). The plot shows every run's difference and interval per domain, and the pooled one.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
from pathlib import Path

import numpy as np

from readme_jax.eval.spread import domain_comparison, t_interval
from readme_jax.figures import new_figure
from readme_jax.jsonfile import read_json, write_json

CANDIDATE, REFERENCE = "readme_trained", "pruned_dense_tuned"


def _blocks(doc: dict, model: str) -> dict[str, np.ndarray]:
    return {d: np.asarray(v, np.float64) for d, v in doc["nll_blocks"][model].items()}


def compare(docs: list[dict]) -> dict:
    """Paired bootstrap per domain on the block NLLs averaged over ``docs``; win counts."""
    a = [_blocks(doc, CANDIDATE) for doc in docs]
    b = [_blocks(doc, REFERENCE) for doc in docs]
    comp, counts = domain_comparison({d: np.mean([x[d] for x in a], 0) for d in a[0]},
                                     {d: np.mean([x[d] for x in b], 0) for d in b[0]})
    return {"comparison": comp, **counts}


def across(docs: list[dict]) -> dict:
    """t-interval over runs of each domain's mean difference (one number per run)."""
    domains = list(docs[0]["nll_blocks"][CANDIDATE])
    return {d: t_interval([float(np.mean(doc["nll_blocks"][CANDIDATE][d]) - np.mean(doc["nll_blocks"][REFERENCE][d]))
                           for doc in docs]) for d in domains}


def plot(result: dict, pool_name: str | None, path: Path) -> None:
    runs = result["runs"]
    domains = list(next(iter(runs.values()))["comparison"])
    rows = [(n, r["comparison"]) for n, r in runs.items()]
    if pool_name:
        rows.append((f"pooled: {pool_name}", result["pooled"]["comparison"]))
    fig = new_figure(width=11.0, height=0.5 + 0.9 * len(domains))
    ax = fig.add_subplot()
    step = 0.8 / max(1, len(rows))
    for i, (name, comp) in enumerate(rows):
        ys = np.arange(len(domains)) + i * step
        mid = [comp[d]["mean_diff"] for d in domains]
        err = [[comp[d]["mean_diff"] - comp[d]["lo"] for d in domains], [comp[d]["hi"] - comp[d]["mean_diff"] for d in domains]]
        ax.errorbar(mid, ys, xerr=err, fmt="D" if name.startswith("pooled") else "o", ms=4, capsize=2, label=name)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(np.arange(len(domains)) + 0.4 - step / 2, domains)
    ax.invert_yaxis()
    ax.set_xlabel("log-perplexity, Read-ME minus tuned pruned dense (95 % paired block bootstrap); < 0: Read-ME better")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="NAME=RUN_DIR (a folder with final_eval/done.json)")
    p.add_argument("--pool", default="", help="comma-separated run names to pool per block")
    p.add_argument("--across", default="", help="comma-separated run names for the across-run t-interval")
    p.add_argument("--json", required=True)
    p.add_argument("--plot", default="")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    docs = {}
    for item in args.runs:
        name, _, folder = item.partition("=")
        docs[name] = read_json(Path(folder) / "final_eval" / "done.json")
    result = {"command": "python -m readme_jax.bench.seed_spread " + shlex.join(argv),
              "machine": f"{platform.machine()}, {platform.system()}", "date": datetime.date.today().isoformat(),
              "candidate": CANDIDATE, "reference": REFERENCE,
              "runs": {n: {"ppl": {m: doc["ppl"][m] for m in (CANDIDATE, REFERENCE)},
                           "router_accuracy": doc.get("router_accuracy"), "locality": doc.get("locality_mean"),
                           **compare([doc])} for n, doc in docs.items()}}
    pool = [n for n in args.pool.split(",") if n]
    if pool:
        result["pooled"] = {"runs": pool, **compare([docs[n] for n in pool])}
    acr = [n for n in args.across.split(",") if n]
    if acr:
        result["across_runs"] = {"runs": acr, "t_interval": across([docs[n] for n in acr])}
    write_json(args.json, result)
    if args.plot:
        plot(result, ",".join(pool) if pool else None, Path(args.plot))
    for n, r in result["runs"].items():
        print(f"{n}: better {r['better']}, beyond the interval {r['significant']}, significant losses {r['significant_losses']}")
    if pool:
        r = result["pooled"]
        print(f"pooled {pool}: better {r['better']}, beyond the interval {r['significant']}, "
              f"significant losses {r['significant_losses']}")
    return result


if __name__ == "__main__":
    main()

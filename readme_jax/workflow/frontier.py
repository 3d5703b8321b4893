"""`readme-jax frontier`: the sparsity-quality frontier — expert width r x shared fraction x tuning loss.

Every point is a main-job run folder under ``--out`` (``<out>/<point>/``), made from the base config
with the point's overrides, so a point is resumable and inspectable like any run, and its numbers come
from the same stages as the default run's:

* untuned points run ``chat_data, dense_eval, refactor, refactor_eval``: Read-ME with oracle routing and
  the pruned twin of the same active width, right after conversion;
* tuned points add ``train, baseline, final_eval, chat_eval``: both models tuned with the point's loss
  on the same batches, the router trained, out-of-domain perplexity and the chat metrics.

The stages that do not depend on a point's settings (chat_data, dense_eval) are computed once and
copied into the other points' folders (their fingerprints match, so the run reuses them). The result,
``frontier.json``, holds per point the active-parameter ratio and perplexity over dense (geometric mean
of the text domains) for Read-ME and its pruned twin, and for tuned points the out-of-domain ratio, the
wins and the chat metrics; ``frontier.png`` plots perplexity ratio against active parameters.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from readme_jax import config as config_mod
from readme_jax.config import RunConfig
from readme_jax.figures import new_figure
from readme_jax.jsonfile import read_json, write_json
from readme_jax.workflow.usability import ppl_ratios, usability_metrics
from readme_jax.workflow.run import run

UNTUNED = ("chat_data", "dense_eval", "refactor", "refactor_eval")
TUNED = UNTUNED + ("train", "baseline", "final_eval", "chat_eval")
SHARED = ("chat_data", "dense_eval")
_PAPER = {"convert.score": "activation", "convert.refit": False}


@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    overrides: dict
    tuned: bool = False


def default_points() -> list[Point]:
    """The grid the docs report (about 2 h on a 2-core CPU): r x shared fraction untuned, the losses at the
    default width, the default loss at two more widths, and the paper's extraction (activation score, no
    refit) as the ablation."""
    pts = [Point(f"r{r}_sf0.75", {"convert.r": r}) for r in (0.4, 0.5, 0.599, 0.7, 0.8)]
    pts += [Point(f"r0.599_sf{sf}", {"convert.r": 0.599, "convert.shared_fraction": sf}) for sf in (0.5, 0.9)]
    pts += [Point("r0.599_paper_extraction", {"convert.r": 0.599, **_PAPER})]
    pts += [Point(f"r0.599_{loss}_tuned", {"convert.r": 0.599, "train.expert_loss": loss}, True)
            for loss in ("lm", "kl", "kl+lm")]
    pts += [Point(f"r{r}_kl+lm_tuned", {"convert.r": r, "train.expert_loss": "kl+lm"}, True) for r in (0.5, 0.7)]
    return pts


def point_config(base: RunConfig, p: Point, out: Path) -> RunConfig:
    data = config_mod.to_dict(base)
    for k, v in {**p.overrides, "output_dir": str(out / p.name)}.items():
        node = data
        *path, last = k.split(".")
        for part in path:
            node = node[part]
        node[last] = v
    data["stages"] = list(TUNED if p.tuned else UNTUNED)
    return config_mod.from_dict(RunConfig, data)


def _seed_shared(out: Path, p: Point) -> None:
    """Copy the settings-independent stages from the first point that has them."""
    dst = out / p.name
    for stage in SHARED:
        if (dst / stage / "done.json").is_file():
            continue
        src = next((d / stage for d in sorted(out.iterdir()) if d != dst and (d / stage / "done.json").is_file()),
                   None)
        if src is not None:
            shutil.copytree(src, dst / stage, dirs_exist_ok=True)


def point_result(run_dir: Path, p: Point) -> dict:
    """One point's numbers from its finished stages."""
    stages = {}
    for s in TUNED:
        f = run_dir / s / "done.json"
        if f.is_file():
            stages[s] = read_json(f)
    u = usability_metrics(stages)
    out = {"name": p.name, "overrides": p.overrides, "tuned": p.tuned,
           "active_param_ratio": u.get("active_param_ratio")}
    re_ = stages.get("refactor_eval")
    if re_:
        for row, key in (("moe_oracle", "readme_oracle_untuned"), ("pruned_dense", "pruned_untuned")):
            r = ppl_ratios(re_["ppl"], row)
            out[key] = {"ppl_ratio_geomean": _geomean(r.values()), "per_domain": r}
    if p.tuned and "final_eval" in stages:
        fe = stages["final_eval"]
        out["readme_tuned"] = {"ppl_ratio_geomean": u.get("ppl_ratio_geomean"), "ood_ppl_ratio": u.get("ood_ppl_ratio"),
                               "per_domain": u.get("ppl_ratio_per_domain")}
        out["pruned_tuned"] = {"ppl_ratio_geomean": u.get("ppl_ratio_geomean_pruned"),
                               "ood_ppl_ratio": u.get("ood_ppl_ratio_pruned"),
                               "per_domain": u.get("ppl_ratio_per_domain_pruned")}
        out.update(wins=fe.get("wins"), router_accuracy=fe.get("router_accuracy"), locality=fe.get("locality_mean"),
                   chat=u.get("chat"))
    return out


def _geomean(v) -> float | None:
    v = [x for x in v if x and x > 0]
    return float(np.exp(np.mean(np.log(v)))) if v else None


def plot_frontier(points: list[dict], path: Path) -> None:
    fig = new_figure(1, 7.5, 4.5)
    ax = fig.add_subplot()
    series = (("readme_oracle_untuned", "Read-ME, oracle routing, untuned", "o", "tab:blue"),
              ("pruned_untuned", "pruned twin, untuned", "s", "tab:orange"),
              ("readme_tuned", "Read-ME, tuned (router routes)", "o", "tab:green"),
              ("pruned_tuned", "pruned twin, tuned", "s", "tab:red"))
    for key, label, marker, color in series:
        pts = [(p["active_param_ratio"], p[key]["ppl_ratio_geomean"], p["name"]) for p in points
               if p.get(key) and p[key].get("ppl_ratio_geomean") and p.get("active_param_ratio")]
        if not pts:
            continue
        ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], marker=marker, color=color, label=label, s=28)
        for x, y, n in pts:
            if key in ("readme_tuned", "readme_oracle_untuned"):
                ax.annotate(n.replace("_tuned", "").replace("r0.599_", ""), (x, y), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
    ax.axhline(1.5, color="gray", lw=0.8, ls=":", label="target 1.5x dense")
    ax.axvline(0.70, color="gray", lw=0.8, ls="--", label="0.70 of dense's active parameters")
    ax.set_yscale("log")
    ax.set_xlabel("active parameters per token / dense (attention + FFN)")
    ax.set_ylabel("perplexity / dense (geometric mean, text domains)")
    ax.set_title("sparsity-quality frontier (SmolLM2-135M)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def run_frontier(base: RunConfig, out: Path, points: list[Point], json_path: Path, plot_path: Path | None,
                 progress: bool = True, log: Callable[[str], None] = print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    results = []
    for i, p in enumerate(points):
        log(f"== frontier point {i + 1}/{len(points)}: {p.name} {p.overrides}")
        (out / p.name).mkdir(exist_ok=True)
        _seed_shared(out, p)
        run(point_config(base, p, out), progress=progress, log=log)
        results.append(point_result(out / p.name, p))
        doc = {"command": " ".join(["readme-jax", "frontier", *sys.argv[2:]]),
               "machine": f"{platform.machine()} {platform.processor() or ''} CPU, Python {platform.python_version()}",
               "date": f"{started:%Y-%m-%d %H:%M} - {datetime.datetime.now(datetime.timezone.utc):%H:%M} UTC",
               "base_config": config_mod.to_dict(base), "points": results}
        write_json(json_path, doc)  # after every point: a kill keeps what is done
        if plot_path is not None:
            plot_frontier(results, plot_path)
    return doc

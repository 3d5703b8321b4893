"""`readme-jax run`: every stage in order, each skipped when its ``done.json`` exists (resume)."""

from __future__ import annotations

import time
from typing import Callable

import jax

from readme_jax.config import RunConfig
from readme_jax.distributed.lead import is_multiprocess, lead_only
from readme_jax.errors import ConfigError
from readme_jax.train.tracking import check_wandb
from readme_jax.workflow.chat_data import run_chat_data
from readme_jax.workflow.chat_eval import run_chat_eval
from readme_jax.workflow.dense_eval import run_dense_eval
from readme_jax.workflow.final_eval import run_final_eval
from readme_jax.workflow.refactor import run_refactor, run_refactor_eval
from readme_jax.workflow.report import run_report
from readme_jax.workflow.serving import run_serve_bench_stage
from readme_jax.workflow.training import run_baseline, run_train
from readme_jax.workflow.workspace import Workspace


STAGE_FNS: dict[str, Callable[[Workspace], dict]] = {
    "chat_data": run_chat_data, "dense_eval": run_dense_eval, "refactor": run_refactor,
    "refactor_eval": run_refactor_eval, "train": run_train, "baseline": run_baseline, "final_eval": run_final_eval,
    "chat_eval": run_chat_eval, "serve_bench": run_serve_bench_stage, "report": run_report}


def check_multiprocess(cfg: RunConfig) -> None:
    """Under a multi-process launch process 0 runs every stage on its own devices; expert tuning on a
    ``mesh:`` would span every process's devices, which the Trainer does not do yet: refused."""
    if is_multiprocess() and cfg.mesh is not None and "train" in cfg.stages:
        raise ConfigError("stage 'train' with a mesh: section is not supported under a multi-process launch yet "
                          "(process 0 runs the stages alone; its mesh would need every process): drop mesh, or "
                          "launch one process (docs/DISTRIBUTED.md)")


def stages_to_run(cfg: RunConfig) -> tuple[str, ...]:
    """``cfg.stages``, plus ``chat_data`` when the chat domain is on: every stage that reads the domains needs it
    (it is reused, not redone, when its cached chat domain matches)."""
    if cfg.data.chat_prompts > 0 and "chat_data" not in cfg.stages and set(cfg.stages) - {"report", "serve_bench"}:
        return ("chat_data", *cfg.stages)
    return tuple(cfg.stages)


def run(cfg: RunConfig, progress: bool = True, log: Callable[[str], None] = print, force: tuple[str, ...] = (),
        recompute: bool = False) -> Workspace:
    """Run ``cfg.stages`` in order, skipping finished ones whose fingerprint matches this config.

    Before any work: the output folder is locked (a second run on it is refused) and checked
    (``Workspace.prepare``): a finished stage made with other settings is refused, naming the
    changed keys, unless ``recompute`` (then it and the stages after it are redone). ``force``
    redoes the named stages even when they are up to date.

    Under a multi-process launch (``jax.distributed`` started by the CLI) process 0 does all of
    this, lock and every write included, and the other processes wait for it
    (``distributed/lead.py``), then return an unprepared Workspace of the same folder (or raise
    process 0's error).
    """
    check_multiprocess(cfg)
    if is_multiprocess():
        log(f"process {jax.process_index()} of {jax.process_count()}: process 0 runs the stages and writes "
            f"{cfg.output_dir}")
    return lead_only("run", lambda: _run(cfg, progress, log, force, recompute),
                     others=lambda: Workspace(cfg, progress=progress, log=log))


def _run(cfg: RunConfig, progress: bool, log: Callable[[str], None], force: tuple[str, ...],
         recompute: bool) -> Workspace:
    if "train" in cfg.stages:
        check_wandb(cfg.train.wandb_project)  # asked-for tracking that cannot work: refused before any stage
    ws = Workspace(cfg, progress=progress, log=log).prepare(recompute=recompute)
    try:
        t_all = time.time()
        for name in sorted(stages_to_run(cfg), key=list(STAGE_FNS).index):  # dependency order, however listed
            if ws.is_done(name) and name not in force:
                log(f"== {name}: done already ({ws.out / name / 'done.json'}), skipped")
                continue
            log(f"== {name}")
            ws.start_stage(name)
            t0 = time.time()
            STAGE_FNS[name](ws)
            log(f"== {name}: {time.time() - t0:.0f} s")
        log(f"all stages finished in {time.time() - t_all:.0f} s; report: {ws.out / 'report' / 'report.md'}")
    finally:
        ws.release()
    return ws

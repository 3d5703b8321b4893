"""Training curves beside the JSONL: TensorBoard event files (``<train dir>/tensorboard``) always,
Weights & Biases when asked for (``train.wandb_project``).

Both sinks get the same scalars (:func:`stage_scalars`), written once per finished stage (its per-step
rows and its validation summary), so a resumed run never writes a step twice.

- TensorBoard: tensorboardX writes the event format without TensorFlow. Where it is not installed
  (a bare accelerator image) the JSONL stays the only record.
- W&B: ``wandb`` is not a dependency. A run that asks for it (``train.wandb_project=NAME``) without it
  installed is refused before any stage runs (:func:`check_wandb`). ``WANDB_MODE=offline`` and the
  other ``WANDB_*`` variables work as wandb documents them. Router and expert steps each get their
  own x axis (``router/global_step``, ``experts/global_step``), the stage summaries ``val/stage``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterator

from readme_jax.errors import ConfigError

try:
    from tensorboardX import SummaryWriter
except ImportError:  # optional at run time: the JSONL metrics do not depend on it
    SummaryWriter = None

_ROW_AXES = ("round", "stage", "step", "micro", "micro_step", "global_step")
_PER_DOMAIN = ("val_ppl", "router_accuracy", "locality")
_SUMMARY_SCALARS = ("locality_mean", "router_accuracy_mean", "final_loss", "gap_mean", "teacher_domain_agreement")


def stage_scalars(stage: int, rows: list[dict], summary: dict) -> Iterator[tuple[str, float, int]]:
    """``(tag, value, x)`` for one finished stage: every numeric field of its step rows under
    ``router/`` or ``experts/`` (x = optimizer micro-step counted across rounds), and its validation
    summary under ``val/`` (x = stage index + 1; the initial summary, stage -1, is x = 0)."""
    for r in rows:
        kind, x = r.get("stage", "train"), r.get("global_step", 0)
        for k, v in r.items():
            if k not in _ROW_AXES and isinstance(v, (int, float)) and not isinstance(v, bool):
                yield f"{kind}/{k}", v, x
    for key in _PER_DOMAIN:
        for d, v in (summary.get(key) or {}).items():
            yield f"val/{key}/{d}", v, stage + 1
    for key in _SUMMARY_SCALARS:
        if isinstance(summary.get(key), (int, float)):
            yield f"val/{key}", summary[key], stage + 1


def check_wandb(project: str) -> None:
    """Refuse a run that asks for W&B where ``wandb`` is not installed (before any work)."""
    if project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"train.wandb_project={project!r} asks for Weights & Biases, but the `wandb` package "
                          f"is not installed: `pip install wandb`, or leave train.wandb_project empty "
                          f"(TensorBoard events and the JSONL are written either way)")


class EventLog:
    """TensorBoard event files in ``log_dir``."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._writer = None  # opened on the first stage, closed by close()

    @property
    def enabled(self) -> bool:
        return SummaryWriter is not None

    def stage(self, stage: int, name: str, rows: list[dict], summary: dict) -> None:
        if SummaryWriter is None:
            return
        if self._writer is None:
            self._writer = SummaryWriter(str(self.log_dir))
        for tag, v, x in stage_scalars(stage, rows, summary):
            self._writer.add_scalar(tag, v, x)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbLog:
    """One W&B run for one training folder (resumed under the same id when the folder resumes)."""

    def __init__(self, project: str, run_dir: Path, config: dict | None = None):
        self.project, self.run_dir, self.config = project, Path(run_dir), config or {}
        self._run = None

    def _open(self):
        import wandb  # local import: optional package, only when train.wandb_project asks for it
        id_file = self.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
        self._run = wandb.init(project=self.project, id=run_id, resume="allow", dir=str(self.run_dir),
                               name=self.run_dir.parent.name, config=self.config)
        for kind in ("router", "experts"):
            self._run.define_metric(f"{kind}/global_step")
            self._run.define_metric(f"{kind}/*", step_metric=f"{kind}/global_step")
        self._run.define_metric("val/stage")
        self._run.define_metric("val/*", step_metric="val/stage")

    def stage(self, stage: int, name: str, rows: list[dict], summary: dict) -> None:
        if self._run is None:
            self._open()
        by_x: dict[tuple[str, int], dict] = {}  # one wandb.log per (axis, x): a row's fields together
        for tag, v, x in stage_scalars(stage, rows, summary):
            axis = tag.split("/", 1)[0]
            axis_key = "val/stage" if axis == "val" else f"{axis}/global_step"
            by_x.setdefault((axis_key, x), {axis_key: x})[tag] = v
        for entry in by_x.values():
            self._run.log(entry)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class Trackers:
    """Every sink a training run writes to (TensorBoard always, W&B when ``wandb_project`` is set)."""

    def __init__(self, out_dir: Path, wandb_project: str = "", config: dict | None = None):
        check_wandb(wandb_project)
        self.sinks = [EventLog(Path(out_dir) / "tensorboard")]
        if wandb_project:
            self.sinks.append(WandbLog(wandb_project, Path(out_dir) / "wandb", config))

    def stage(self, stage: int, name: str, rows: list[dict], summary: dict) -> None:
        for s in self.sinks:
            s.stage(stage, name, rows, summary)

    def close(self) -> None:
        for s in self.sinks:
            s.close()

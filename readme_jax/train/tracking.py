"""Training curves as TensorBoard event files (``<train dir>/tensorboard``), beside the JSONL.

tensorboardX writes the event format without TensorFlow. Written once per finished stage (its
per-step rows and its validation summary), so a resumed run never writes a step twice. Where
tensorboardX is not installed (a bare accelerator image) the JSONL stays the only record.
"""

from __future__ import annotations

from pathlib import Path

try:
    from tensorboardX import SummaryWriter
except ImportError:  # optional at run time: the JSONL metrics do not depend on it
    SummaryWriter = None


class EventLog:
    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._writer = None  # opened on the first stage, closed by close()

    @property
    def enabled(self) -> bool:
        return SummaryWriter is not None

    def stage(self, stage: int, name: str, rows: list[dict], summary: dict) -> None:
        """One finished stage: every numeric field of its step rows under ``router/`` or ``experts/``
        (x = optimizer micro-step counted across rounds), and its validation summary under
        ``val/`` (x = stage index)."""
        if SummaryWriter is None:
            return
        if self._writer is None:
            self._writer = SummaryWriter(str(self.log_dir))
        for r in rows:
            kind = r.get("stage", "train")
            x = r.get("global_step", 0)
            for k, v in r.items():
                if k not in ("round", "stage", "step", "micro", "micro_step", "global_step") and \
                        isinstance(v, (int, float)):
                    self._writer.add_scalar(f"{kind}/{k}", v, x)
        for key in ("val_ppl", "router_accuracy", "locality"):
            for d, v in (summary.get(key) or {}).items():
                self._writer.add_scalar(f"val/{key}/{d}", v, stage + 1)
        for key in ("locality_mean", "router_accuracy_mean", "final_loss", "gap_mean", "teacher_domain_agreement"):
            if isinstance(summary.get(key), (int, float)):
                self._writer.add_scalar(f"val/{key}", summary[key], stage + 1)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

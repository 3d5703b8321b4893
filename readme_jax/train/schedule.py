"""Learning-rate schedules and optimizers for the alternating rounds (optax).

Within a stage of round k the rate follows a (warmup then) cosine from ``lr * decay**k`` to 0
over the stage's optimizer steps; every round restarts the cosine at a peak ``decay`` times the
last round's (paper: x0.8). Gradient accumulation is ``optax.MultiSteps``. The rate is evaluated
on the host and passed into the jitted step, so all rounds share one compiled step.
"""

from __future__ import annotations


import optax

from readme_jax.config import StageConfig


def round_peak_lr(base_lr: float, round_idx: int, decay: float) -> float:
    return base_lr * decay**round_idx


def stage_schedule(stage: StageConfig, round_idx: int, decay: float) -> optax.Schedule:
    peak = round_peak_lr(stage.lr, round_idx, decay)
    steps = max(stage.steps, 1)
    if stage.warmup_steps:
        return optax.warmup_cosine_decay_schedule(0.0, peak, stage.warmup_steps, steps, end_value=0.0)
    return optax.cosine_decay_schedule(peak, steps, alpha=0.0)


def lr_at(stage: StageConfig, round_idx: int, decay: float, opt_step: int) -> float:
    """The learning rate of optimizer step ``opt_step`` of a stage in round ``round_idx``."""
    return float(stage_schedule(stage, round_idx, decay)(opt_step))


def make_optimizer(stage: StageConfig, weight_decay: float, clip_norm: float) -> optax.GradientTransformation:
    """AdamW direction with unit learning rate; the step multiplies by the scheduled rate.

    Passing the rate as a step argument (from :func:`lr_at`) keeps one compiled step for every
    round: ``lr * adamw(lr=1)`` is AdamW at ``lr`` (weight decay is decoupled and scaled too).
    With ``grad_accum > 1`` the transformation is ``optax.MultiSteps``, whose non-final
    micro-steps emit zero updates.
    """
    parts = []
    if clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(1.0, b1=0.9, b2=0.95, weight_decay=weight_decay))
    tx = optax.chain(*parts)
    if stage.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=stage.grad_accum)
    return tx

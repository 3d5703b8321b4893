"""Recovery loss of expert tuning (and of the pruned twin's): learn from the dense source model.

The dense model the experts were cut from is always at hand, so tuning can match its next-token
distribution instead of (or beside) the one-hot next token of the text (Minitron, Muralidharan et
al. 2024: logit distillation from the unpruned teacher recovers pruned models with far fewer tokens).

``train.expert_loss``:

* ``lm`` — cross-entropy on the text's next token (the paper's expert tuning);
* ``kl`` — forward KL(teacher || student) over the full vocabulary, per token, averaged;
* ``kl+lm`` — ``lm_weight * lm + (1 - lm_weight) * kl``.

The teacher's logits are computed inside the jitted step from the dense params (a forward without
gradient), so nothing is cached and every batch gets exact full-vocabulary targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from readme_jax.config import EXPERT_LOSSES, ModelConfig
from readme_jax.model import decoder



def kl_to_teacher(student_logits_BTV, teacher_logits_BTV, temperature: float = 1.0):
    """Per-token forward KL(softmax(teacher / t) || softmax(student / t)) in float32, ``[B, T]``.

    Scaled by ``t**2`` (Hinton et al.) so the gradient's size does not depend on the temperature.
    """
    t = float(temperature)
    ls = jax.nn.log_softmax(student_logits_BTV.astype(jnp.float32) / t, axis=-1)
    lt = jax.nn.log_softmax(teacher_logits_BTV.astype(jnp.float32) / t, axis=-1)
    return jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1) * (t * t)


def teacher_logits(teacher_params: dict, teacher_cfg: ModelConfig, inputs_BT):
    """The dense teacher's float32 logits ``[B, T, V]`` (no gradient flows into the teacher)."""
    logits, _, _ = decoder.forward(jax.lax.stop_gradient(teacher_params), teacher_cfg, inputs_BT)
    return jax.lax.stop_gradient(logits)


def recovery_loss(logits_BTV, targets_BT, teacher_BTV, kind: str, lm_weight: float, temperature: float):
    """``(loss, metrics)`` of one batch: ``metrics`` has ``lm`` (the text's cross-entropy, always) and, with
    a teacher, ``kl``; ``kind`` picks what the gradient follows (module docstring)."""
    lm = decoder.token_nll(logits_BTV, targets_BT).mean()
    if kind == "lm":
        return lm, {"lm": lm}
    kl = kl_to_teacher(logits_BTV, teacher_BTV, temperature).mean()
    if kind == "kl":
        return kl, {"lm": lm, "kl": kl}
    if kind == "kl+lm":
        return lm_weight * lm + (1.0 - lm_weight) * kl, {"lm": lm, "kl": kl}
    raise ValueError(f"unknown expert loss {kind!r}; expected one of {EXPERT_LOSSES}")

"""Jitted training steps on plain param dicts: router distillation and LM tuning with frozen parts.

Freezing is structural: the frozen parameters are an argument the gradient is not taken with
respect to, so they cannot change (tested bitwise).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from readme_jax.config import ModelConfig
from readme_jax.model import decoder
from readme_jax.model.readme_model import ReadMEModel
from readme_jax.model.router import route_ids, router_logits
from readme_jax.train.distill import router_loss
from readme_jax.train.recovery import recovery_loss, teacher_logits

FROZEN_TOP_KEYS_NO_EMBED = ("embed", "lm_head")


def frozen_keys(train_embeddings: bool) -> tuple[str, ...]:
    """Top-level keys LM tuning leaves untouched: the token embedding / LM head unless asked to train them."""
    return () if train_embeddings else FROZEN_TOP_KEYS_NO_EMBED


def split_params(params: dict, frozen_keys) -> tuple[dict, dict]:
    """Split a param dict at the top level into (trainable, frozen)."""
    trainable = {k: v for k, v in params.items() if k not in frozen_keys}
    frozen = {k: v for k, v in params.items() if k in frozen_keys}
    return trainable, frozen


def merge_params(trainable: dict, frozen: dict) -> dict:
    return {**frozen, **trainable}


def make_router_step(model: ReadMEModel, tx: optax.GradientTransformation, loss_kind: str):
    """``step(router_params, opt_state, tokens_BT, target_BTE, lr) -> (router_params, opt_state, metrics)``
    for the router of ``model`` (its config and MLP kind; its params are the argument)."""
    router_cfg, mlp = model.router_cfg, model.router_mlp  # static parts only: no arrays captured

    @jax.jit
    def step(params, opt_state, tokens_BT, target_BTE, lr):
        def loss_fn(p):
            logits, _ = router_logits(p, router_cfg, tokens_BT, mlp=mlp)
            return router_loss(logits, target_BTE, loss_kind), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates))
        agree = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(target_BTE, -1))
        return params, opt_state, {"loss": loss, "agreement": agree, "grad_norm": optax.global_norm(grads)}

    return step


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What an LM step learns from (train/recovery.py): ``kind`` lm | kl | kl+lm; with a teacher loss,
    ``teacher_cfg`` is the dense teacher's config and the step takes its params as ``teacher_params``."""

    kind: str = "lm"
    lm_weight: float = 0.5
    temperature: float = 1.0
    teacher_cfg: ModelConfig | None = None

    @property
    def uses_teacher(self) -> bool:
        return self.kind != "lm"


LM_ONLY = LossSpec()


def make_lm_step(cfg: ModelConfig, ffn, ctx_fn: Callable | None, tx: optax.GradientTransformation, *,
                 remat: bool = False, loss: LossSpec = LM_ONLY):
    """LM-tuning step: ``step(trainable, frozen, opt_state, ctx_params, blocks_BT1, lr, teacher_params=None)``.

    ``ctx_fn(ctx_params, inputs_BT)`` gives the FFN context (Read-ME: routes from the frozen
    router); ``ctx_params`` are never differentiated. ``remat``: recompute each decoder layer in
    the backward pass (``decoder.forward(remat=True)``, ``train.remat: layer``). ``loss``: the text's
    cross-entropy, or distillation from the dense teacher whose params are ``teacher_params``
    (train/recovery.py). Metrics: ``loss``, ``grad_norm``, ``lm`` and, with a teacher, ``kl``.
    """
    if loss.uses_teacher and loss.teacher_cfg is None:
        raise ValueError(f"expert loss {loss.kind!r} needs the teacher's config (LossSpec.teacher_cfg)")

    def step(trainable, frozen, opt_state, ctx_params, blocks_BT1, lr, teacher_params=None):
        inputs, targets = blocks_BT1[:, :-1], blocks_BT1[:, 1:]
        ctx = None if ctx_fn is None else jax.lax.stop_gradient(ctx_fn(ctx_params, inputs))
        teacher = teacher_logits(teacher_params, loss.teacher_cfg, inputs) if loss.uses_teacher else None

        def loss_fn(tr):
            logits, _, _ = decoder.forward(merge_params(tr, frozen), cfg, inputs, ffn=ffn, ffn_ctx=ctx, remat=remat)
            return recovery_loss(logits, targets, teacher, loss.kind, loss.lm_weight, loss.temperature)

        (value, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, jax.tree.map(lambda u: lr * u, updates))
        return trainable, opt_state, {"loss": value, "grad_norm": optax.global_norm(grads), **parts}

    return jax.jit(step)


def accumulated_step(step_fn, trainable, frozen, opt_state, ctx_params, batch_BT1, grad_accum: int, lr,
                     teacher_params=None):
    """One optimizer step of an LM step as ``grad_accum`` micro-batches of ``batch_BT1``.

    Returns ``(trainable, opt_state, [metrics of each micro-step as floats])``.
    """
    micro = batch_BT1.shape[0] // grad_accum
    ms = []
    for j in range(grad_accum):
        trainable, opt_state, m = step_fn(trainable, frozen, opt_state, ctx_params,
                                          jnp.asarray(batch_BT1[j * micro:(j + 1) * micro]), lr, teacher_params)
        ms.append({k: float(v) for k, v in m.items()})
    return trainable, opt_state, ms


def router_route_fn(model: ReadMEModel):
    """``(router_params, inputs_BT) -> route_BT`` with ``model``'s router, for use as an LM step's ``ctx_fn``."""

    router_cfg, mlp = model.router_cfg, model.router_mlp  # static parts only: no arrays captured

    def fn(router_params, inputs_BT):
        return route_ids(router_logits(router_params, router_cfg, inputs_BT, mlp=mlp)[0])

    return fn

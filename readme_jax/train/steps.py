"""Jitted training steps on plain param dicts: router distillation and LM tuning with frozen parts.

Freezing is structural: the frozen parameters are an argument the gradient is not taken with
respect to, so they cannot change (tested bitwise).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from readme_jax.config import ModelConfig
from readme_jax.model import decoder
from readme_jax.model.readme_model import ReadMEModel
from readme_jax.model.router import route_ids, router_logits
from readme_jax.train.distill import router_loss

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


def make_lm_step(cfg: ModelConfig, ffn, ctx_fn: Callable | None, tx: optax.GradientTransformation, *,
                 remat: bool = False):
    """LM-loss step: ``step(trainable, frozen, opt_state, ctx_params, blocks_BT1, lr)``.

    ``ctx_fn(ctx_params, inputs_BT)`` gives the FFN context (Read-ME: routes from the frozen
    router); ``ctx_params`` are never differentiated. ``remat``: recompute each decoder layer in
    the backward pass (``decoder.forward(remat=True)``, ``train.remat: layer``).
    """

    def step(trainable, frozen, opt_state, ctx_params, blocks_BT1, lr):
        inputs, targets = blocks_BT1[:, :-1], blocks_BT1[:, 1:]
        ctx = None if ctx_fn is None else jax.lax.stop_gradient(ctx_fn(ctx_params, inputs))

        def loss_fn(tr):
            logits, _, _ = decoder.forward(merge_params(tr, frozen), cfg, inputs, ffn=ffn, ffn_ctx=ctx, remat=remat)
            return decoder.token_nll(logits, targets).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, jax.tree.map(lambda u: lr * u, updates))
        return trainable, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return jax.jit(step)


def accumulated_step(step_fn, trainable, frozen, opt_state, ctx_params, batch_BT1, grad_accum: int, lr):
    """One optimizer step of an LM step as ``grad_accum`` micro-batches of ``batch_BT1``.

    Returns ``(trainable, opt_state, [metrics of each micro-step as floats])``.
    """
    micro = batch_BT1.shape[0] // grad_accum
    ms = []
    for j in range(grad_accum):
        trainable, opt_state, m = step_fn(trainable, frozen, opt_state, ctx_params,
                                          jnp.asarray(batch_BT1[j * micro:(j + 1) * micro]), lr)
        ms.append({k: float(v) for k, v in m.items()})
    return trainable, opt_state, ms


def router_route_fn(model: ReadMEModel):
    """``(router_params, inputs_BT) -> route_BT`` with ``model``'s router, for use as an LM step's ``ctx_fn``."""

    router_cfg, mlp = model.router_cfg, model.router_mlp  # static parts only: no arrays captured

    def fn(router_params, inputs_BT):
        return route_ids(router_logits(router_params, router_cfg, inputs_BT, mlp=mlp)[0])

    return fn

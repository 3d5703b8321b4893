"""The Read-ME MoE backbone and the conventional layer-wise-routed baseline built from the same experts.

Attention, norms and embeddings are the dense model's; each layer's FFN is E experts stacked as
``wg, wu: [L, E, D, F]``, ``wd: [L, E, F, D]``, and every routed FFN call goes through the one entry
point :func:`readme_jax.ops.expert_ffn.expert_ffn`. With the ``split`` layout the layer also holds
the shared part ``shared_wg, shared_wu: [L, D, P]``, ``shared_wd: [L, P, D]`` (the channels every
expert keeps, stored once) and F = R is the expert-specific width; every token adds the shared
part's output (:func:`shared_ffn`).

- :class:`MoEBackbone` takes route ids ``[B, T]`` (from the decoupled router) and uses the SAME
  expert for a token in every layer; top-1, no gate scaling (Read-ME).
- :class:`LayerwiseMoE` is the conventional MoE: a router per layer reading that layer's hidden
  state, top-1 with the softmax gate probability scaling the expert's output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from readme_jax.config import ModelConfig
from readme_jax.errors import ConfigError
from readme_jax.model import decoder, layers
from readme_jax.model.llama import DecoderModule
from readme_jax.model.router import route_ids
from readme_jax.ops.expert_ffn import expert_ffn


def expert_shapes(cfg: ModelConfig, n_experts: int, expert_dim: int, shared_dim: int = 0) -> dict:
    """FFN param shapes: experts of width ``expert_dim``, plus a shared part of ``shared_dim`` when > 0."""
    L, D, E, Fe = cfg.n_layers, cfg.d_model, n_experts, expert_dim
    out = {"wg": (L, E, D, Fe), "wu": (L, E, D, Fe), "wd": (L, E, Fe, D)}
    if shared_dim:
        out.update(shared_wg=(L, D, shared_dim), shared_wu=(L, D, shared_dim), shared_wd=(L, shared_dim, D))
    return out


SHARED_KEYS = ("shared_wg", "shared_wu", "shared_wd")


def has_shared(lp: dict) -> bool:
    """Whether a layer's params hold the shared (always-on) part of the split layout."""
    return "shared_wg" in lp


def shared_ffn(lp: dict, h_BTD, y_BTD):
    """``y`` plus the shared part's SwiGLU output on ``h`` (``y`` unchanged without a shared part)."""
    if not has_shared(lp):
        return y_BTD
    with jax.named_scope("shared_ffn"):
        s = layers.swiglu(h_BTD, lp["shared_wg"], lp["shared_wu"], lp["shared_wd"])
    return (y_BTD.astype(jnp.float32) + s.astype(jnp.float32)).astype(y_BTD.dtype)


def routed_ffn(impl: str):
    """FFN for decoder.forward: ``ctx`` is the route ``[B, T]``, the same for every layer."""

    def ffn(lp, h_BTD, route_BT):
        B, T, D = h_BTD.shape
        with jax.named_scope("expert_ffn"):
            y = expert_ffn(h_BTD.reshape(B * T, D), route_BT.reshape(B * T), lp["wg"], lp["wu"], lp["wd"],
                           impl=impl)
        return shared_ffn(lp, h_BTD, y.reshape(B, T, D)), None

    return ffn


def cond_sum_experts(y_ND, x_ND, route_N, experts):
    """``y`` plus, for each ``(e, (wg, wu, wd))`` of ``experts``, :func:`expert_rows` of expert e,
    computed only when some row routes to e (``lax.cond``; ``e`` may be traced). The experts run
    are those present, their number a runtime value."""
    for e, w in experts:
        def run(y, e=e, w=w):
            return y + expert_rows(x_ND, route_N, e, *w)

        y_ND = jax.lax.cond(jnp.any(route_N == e), run, lambda y: y, y_ND)
    return y_ND


def expert_rows(x_ND, local_N, k, wg, wu, wd):
    """One expert's SwiGLU (``wg, wu: [D, F]``, ``wd: [F, D]``) on the rows with ``local == k``,
    0 elsewhere, in float32: it runs on every row and keeps its own."""
    return expert_ffn(x_ND, jnp.where(local_N == k, 0, -1), wg[None], wu[None], wd[None],
                      impl="reference").astype(jnp.float32)


def layerwise_ffn(impl: str):
    """FFN of the conventional MoE: per-layer top-1 router with softmax gate; aux = router logits."""

    def ffn(lp, h_BTD, ctx):
        del ctx
        B, T, D = h_BTD.shape
        logits = jnp.dot(h_BTD, lp["gate"], preferred_element_type=jnp.float32)  # [B,T,E]
        route = route_ids(logits)
        prob = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), route[..., None], axis=-1)
        y = expert_ffn(h_BTD.reshape(B * T, D), route.reshape(B * T), lp["wg"], lp["wu"], lp["wd"], impl=impl)
        return shared_ffn(lp, h_BTD, y.reshape(B, T, D) * prob.astype(y.dtype)), logits

    return ffn


class MoEBackbone(DecoderModule):
    """Read-ME backbone: dense attention + stacked experts, routed by precomputed route ids."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, n_experts: int, expert_dim: int, impl: str = "xla",
                 shared_dim: int = 0):
        if n_experts < 1 or expert_dim < 1 or shared_dim < 0:
            raise ConfigError(f"MoE needs n_experts >= 1, expert_dim >= 1 and shared_dim >= 0, got {n_experts}, "
                              f"{expert_dim}, {shared_dim}")
        self.n_experts = n_experts
        self.expert_dim = expert_dim
        self.shared_dim = shared_dim
        self.impl = impl
        super().__init__(cfg, rngs=rngs)

    def ffn_shapes(self) -> dict:
        return expert_shapes(self.cfg, self.n_experts, self.expert_dim, self.shared_dim)

    def layer_ffn(self):
        return routed_ffn(self.impl)

    def __call__(self, tokens_BT, positions_BT=None, cache=None, *, route_BT=None, ffn_ctx=None):
        if route_BT is None:
            route_BT = ffn_ctx
        if route_BT is None:
            raise ConfigError("MoEBackbone needs route_BT (one expert id per token)")
        return super().__call__(tokens_BT, positions_BT, cache, ffn_ctx=route_BT)


class LayerwiseMoE(MoEBackbone):
    """Conventional MoE baseline over the same experts: a [D, E] gate per layer, top-1, softmax gate."""

    def ffn_shapes(self) -> dict:
        out = super().ffn_shapes()
        out["gate"] = (self.cfg.n_layers, self.cfg.d_model, self.n_experts)
        return out

    def layer_ffn(self):
        return layerwise_ffn(self.impl)

    def __call__(self, tokens_BT, positions_BT=None, cache=None, **_):
        out, cache, _ = decoder.forward(self.arrays(), self.cfg, tokens_BT, positions_BT, cache, ffn=self.layer_ffn())
        return out, cache

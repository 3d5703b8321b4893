"""Read-ME = decoupled router + MoE backbone.

The router reads token ids and gives one expert id per token *before* the backbone runs; the
backbone uses that id in every layer. Both have their own KV caches, so decoding computes the
next token's route the moment it is sampled (route lookahead for the serving scheduler).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from flax import nnx

from readme_jax.model import decoder
from readme_jax.model.moe import MoEBackbone, routed_ffn
from readme_jax.model.router import Router, route_ids, router_logits


class ReadMEOut(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    route: jax.Array  # [B, T] int32
    router_logits: jax.Array  # [B, T, E] float32
    cache: decoder.KVCache | None
    router_cache: decoder.KVCache | None


class ReadME(nnx.Module):
    def __init__(self, router: Router, backbone: MoEBackbone):
        if router.n_experts != backbone.n_experts:
            raise ValueError(f"router has {router.n_experts} experts, backbone {backbone.n_experts}")
        self.router = router
        self.backbone = backbone

    def __call__(self, tokens_BT, positions_BT=None, cache=None, router_cache=None, route_BT=None) -> ReadMEOut:
        return readme_forward(self.router.arrays(), self.router.cfg, self.router.ffn_fn(),
                              self.backbone.arrays(), self.backbone.cfg, self.backbone.impl,
                              tokens_BT, positions_BT, cache, router_cache, route_BT)


def readme_forward(router_params, router_cfg, router_ffn, backbone_params, backbone_cfg, impl,
                   tokens_BT, positions_BT=None, cache=None, router_cache=None, route_BT=None) -> ReadMEOut:
    """Pure Read-ME forward; ``route_BT`` overrides the router's choice (oracle/forced routing)."""
    rl, router_cache = router_logits(router_params, router_cfg, tokens_BT, positions_BT, router_cache, router_ffn)
    route = route_ids(rl) if route_BT is None else route_BT
    logits, cache, _ = decoder.forward(backbone_params, backbone_cfg, tokens_BT, positions_BT, cache,
                                       ffn=routed_ffn(impl), ffn_ctx=route)
    return ReadMEOut(logits, route, rl, cache, router_cache)

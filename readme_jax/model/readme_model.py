"""The Read-ME model as one value: router + MoE backbone + expert layout (a JAX pytree).

:class:`ReadMEModel` is what training takes and returns, what evaluation and serving read, what
export writes and what ``readme_jax.load`` gives back. Its arrays (``router_params``,
``backbone_params``) are pytree leaves; its configs and layout are static, so a model passes
through ``jax.jit`` as an ordinary argument. :class:`DenseModel` is the dense twin (the source
model or the pruned baseline) for A/B comparisons.

The router reads token ids and gives one expert id per token *before* the backbone runs; the
backbone uses that id in every layer. Both have their own KV caches, so decoding computes the
next token's route the moment it is sampled (route lookahead for the serving scheduler).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.config import ModelConfig, RouterMlp
from readme_jax.errors import ConfigError
from readme_jax.model import decoder
from readme_jax.model.moe import has_shared, routed_ffn
from readme_jax.model.router import route_ids, router_logits

_STATIC = {"static": True}


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """How the backbone's FFN is cut into experts: ``n_experts`` experts of ``expert_dim`` own
    channels each, plus (split layout) ``shared_dim`` channels every token uses, stored once."""

    n_experts: int
    expert_dim: int
    shared_dim: int = 0
    domains: tuple[str, ...] = ()  # expert i was made from domain i's calibration data

    @property
    def kind(self) -> str:
        return "split" if self.shared_dim else "fixed"

    @classmethod
    def of(cls, backbone_params: dict, domains=()) -> "ExpertLayout":
        """The layout a backbone's params have (``layers.wg [L,E,D,R]``, optional ``shared_wg [L,D,P]``)."""
        lay = backbone_params["layers"]
        wg = lay["wg"]
        if wg.ndim != 4:
            raise ConfigError(f"MoE backbone layers.wg must be [L, E, D, R], got {tuple(wg.shape)}")
        shared = int(lay["shared_wg"].shape[-1]) if has_shared(lay) else 0
        return cls(int(wg.shape[1]), int(wg.shape[-1]), shared, tuple(domains))


class ReadMEOut(NamedTuple):
    logits: jax.Array  # [B, T, V] float32
    route: jax.Array  # [B, T] int32
    router_logits: jax.Array  # [B, T, E] float32
    cache: decoder.KVCache | None
    router_cache: decoder.KVCache | None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity (engines cache compilations per model)
class ReadMEModel:
    """Router (params, decoder config, MLP kind) + MoE backbone (params, config) + expert layout."""

    router_params: dict
    backbone_params: dict
    router_cfg: ModelConfig = dataclasses.field(metadata=_STATIC)
    backbone_cfg: ModelConfig = dataclasses.field(metadata=_STATIC)
    layout: ExpertLayout = dataclasses.field(metadata=_STATIC)
    router_mlp: RouterMlp = dataclasses.field(default="swiglu", metadata=_STATIC)

    is_moe = True

    @property
    def n_experts(self) -> int:
        return self.layout.n_experts

    def replace(self, **changes) -> "ReadMEModel":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ math (pure, jit-friendly)

    def router_logits(self, tokens_BT, positions_BT=None, router_cache=None):
        """``(logits [B,T,E] float32, router_cache)``."""
        return router_logits(self.router_params, self.router_cfg, tokens_BT, positions_BT, router_cache,
                             mlp=self.router_mlp)

    def routes(self, tokens_BT, positions_BT=None, router_cache=None):
        """Top-1 route ids ``[B, T]`` int32 (and the router cache): one expert per token for every layer."""
        logits, router_cache = self.router_logits(tokens_BT, positions_BT, router_cache)
        return route_ids(logits), router_cache

    def __call__(self, tokens_BT, positions_BT=None, cache=None, router_cache=None, route_BT=None, *,
                 impl: str = "xla") -> ReadMEOut:
        """Forward; ``route_BT`` overrides the router's choice (oracle/forced routing)."""
        rl, router_cache = self.router_logits(tokens_BT, positions_BT, router_cache)
        route = route_ids(rl) if route_BT is None else route_BT
        logits, cache, _ = decoder.forward(self.backbone_params, self.backbone_cfg, tokens_BT, positions_BT, cache,
                                           ffn=routed_ffn(impl), ffn_ctx=route)
        return ReadMEOut(logits, route, rl, cache, router_cache)

    # ------------------------------------------------------------------ checks and sizes

    def validate(self, name: str = "Read-ME model") -> "ReadMEModel":
        """Shapes agree (backbone experts, router head, vocabularies); returns self. Loaders call this."""
        lay = self.backbone_params.get("layers", {}) if isinstance(self.backbone_params, dict) else {}
        wg = lay.get("wg")
        L, E, D = self.backbone_cfg.n_layers, self.n_experts, self.backbone_cfg.d_model
        if wg is None or wg.ndim != 4 or tuple(wg.shape[:3]) != (L, E, D) or wg.shape[3] != self.layout.expert_dim:
            raise ConfigError(f"{name}: backbone layers.wg must be [L={L}, E={E}, D={D}, "
                              f"R={self.layout.expert_dim}], got {None if wg is None else tuple(wg.shape)}")
        if bool(self.layout.shared_dim) != has_shared(lay):
            raise ConfigError(f"{name}: layout says shared_dim={self.layout.shared_dim} but the backbone "
                              f"{'has' if has_shared(lay) else 'has no'} shared_* tensors")
        head = self.router_params.get("head") if isinstance(self.router_params, dict) else None
        if head is None or tuple(head.shape) != (self.router_cfg.d_model, E):
            raise ConfigError(f"{name}: router head must be [{self.router_cfg.d_model}, {E}], "
                              f"got {None if head is None else tuple(head.shape)}")
        if self.router_cfg.vocab_size != self.backbone_cfg.vocab_size:
            raise ConfigError(f"{name}: router vocab {self.router_cfg.vocab_size} != backbone vocab "
                              f"{self.backbone_cfg.vocab_size}")
        if self.layout.domains and len(self.layout.domains) != E:
            raise ConfigError(f"{name}: {len(self.layout.domains)} domains for {E} experts")
        return self

    def expert_bytes(self) -> int:
        """Bytes of one whole expert (its wg, wu, wd slices in every layer); the shared part is not per expert."""
        lay = self.backbone_params["layers"]
        total = sum(int(np.prod(lay[k].shape)) * jnp.dtype(lay[k].dtype).itemsize for k in ("wg", "wu", "wd"))
        return total // self.n_experts

    @classmethod
    def from_modules(cls, router, backbone, domains=()) -> "ReadMEModel":
        """From nnx modules: a ``Router`` and a ``MoEBackbone``."""
        if router.n_experts != backbone.n_experts:
            raise ConfigError(f"router has {router.n_experts} experts, backbone {backbone.n_experts}")
        params = backbone.arrays()
        return cls(router.arrays(), params, router.cfg, backbone.cfg, ExpertLayout.of(params, domains),
                   router.mlp).validate()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class DenseModel:
    """A dense decoder (params ``layers.wg [L,D,F]``, config): the source model or the pruned twin."""

    params: dict
    cfg: ModelConfig = dataclasses.field(metadata=_STATIC)

    is_moe = False
    n_experts = 1

    def validate(self, name: str = "dense model") -> "DenseModel":
        wg = self.params.get("layers", {}).get("wg") if isinstance(self.params, dict) else None
        want = (self.cfg.n_layers, self.cfg.d_model, self.cfg.ffn_dim)
        if wg is None or tuple(wg.shape) != want:
            raise ConfigError(f"{name}: layers.wg must be [L, D, F] = {want}, "
                              f"got {None if wg is None else tuple(wg.shape)}")
        return self

    @classmethod
    def from_module(cls, model) -> "DenseModel":
        """From a dense nnx ``Llama``."""
        return cls(model.arrays(), model.cfg).validate()

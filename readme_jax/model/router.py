"""Read-ME's pre-gating router: a small causal transformer over token ids -> expert logits.

It is decoupled from the backbone: it reads the same token ids, never the backbone's hidden
states, so the route of token t (which depends only on tokens <= t) is known before the
backbone runs, and one route id serves every backbone layer.

The router is the shared decoder (``decoder.forward``) with its own small config and a head
to E logits instead of the vocabulary; so it gets RoPE, RMSNorm and its own KV cache for free
(incremental routing equals full recomputation, tested).

Variants (RouterConfig):
- ``mlp="swiglu"`` (the paper) or ``"silu_bias"`` (the reference code: Linear+bias, SiLU,
  Linear+bias);
- ``score_scale="sqrt"`` (1/sqrt(head_dim), the paper) or ``"none"`` (the reference code).
- Embedding init ``"backbone"``: the first ``width`` columns of the backbone's token embedding
  (``width <= D``), or the embedding times a fixed random orthonormal ``[D, width]`` projection
  when ``width > D``; ``"random"``: normal(0, 0.02).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from readme_jax.config import ModelConfig, RouterConfig, RouterMlp, choices
from readme_jax.errors import ConfigError
from readme_jax.model import decoder
from readme_jax.model.llama import DecoderModule


def router_model_config(rc: RouterConfig, vocab_size: int, max_seq_len: int, dtype: str = "float32") -> ModelConfig:
    """The decoder config of a router (tied 'embedding' head is unused: the router has its own head)."""
    return ModelConfig(vocab_size=vocab_size, d_model=rc.width, n_layers=rc.n_layers, n_heads=rc.n_heads,
                       n_kv_heads=rc.n_heads, head_dim=rc.width // rc.n_heads, ffn_dim=rc.ffn_dim,
                       rope_theta=rc.rope_theta, tie_embeddings=True, max_seq_len=max_seq_len,
                       dtype=dtype, param_dtype="float32",
                       attn_scale=None if rc.score_scale == "sqrt" else 1.0)


def silu_bias_mlp(lp: dict, h_BTD, ctx):
    """The reference code's router MLP: silu(h W1 + b1) W2 + b2."""
    del ctx
    a = jnp.dot(h_BTD, lp["w1"], preferred_element_type=jnp.float32) + lp["bias1"]
    y = jnp.dot(jax.nn.silu(a).astype(h_BTD.dtype), lp["w2"], preferred_element_type=jnp.float32) + lp["bias2"]
    return y.astype(h_BTD.dtype), None


class Router(DecoderModule):
    """Causal transformer over token ids; ``__call__`` gives expert logits ``[B, T, E]``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, n_experts: int, mlp: str = "swiglu"):
        if n_experts < 1:
            raise ConfigError(f"router needs n_experts >= 1, got {n_experts}")
        self.n_experts = n_experts
        self.mlp = mlp
        super().__init__(cfg, rngs=rngs)
        self.head = nnx.Param(jax.random.normal(rngs.params(), (cfg.d_model, n_experts), jnp.float32)
                              * cfg.d_model**-0.5)

    def ffn_shapes(self) -> dict:
        L, W, F = self.cfg.n_layers, self.cfg.d_model, self.cfg.ffn_dim
        if self.mlp == "swiglu":
            return {"wg": (L, W, F), "wu": (L, W, F), "wd": (L, F, W)}
        return {"w1": (L, W, F), "bias1": (L, F), "w2": (L, F, W), "bias2": (L, W)}

    def param_shapes(self) -> dict:
        out = super().param_shapes()
        out["head"] = (self.cfg.d_model, self.n_experts)
        return out

    def layer_ffn(self):
        return router_ffn(self.mlp)

    def __call__(self, tokens_BT, positions_BT=None, cache=None, *, ffn_ctx=None):
        return router_logits(self.arrays(), self.cfg, tokens_BT, positions_BT, cache, mlp=self.mlp)


def router_ffn(mlp: RouterMlp):
    """The router layer's MLP for ``RouterConfig.mlp``: SwiGLU (the paper) or Linear+bias/SiLU (reference code)."""
    if mlp == "swiglu":
        return decoder.dense_ffn
    if mlp == "silu_bias":
        return silu_bias_mlp
    raise ConfigError(f"router mlp must be one of {choices(RouterMlp)}, got {mlp!r}")


def router_logits(params: dict, cfg: ModelConfig, tokens_BT, positions_BT=None, cache=None,
                  mlp: RouterMlp = "swiglu"):
    """Pure router forward: ``(logits_BTE float32, cache)``."""
    with jax.named_scope("router"):
        h, cache, _ = decoder.forward(params, cfg, tokens_BT, positions_BT, cache, ffn=router_ffn(mlp), logits=False)
        return jnp.dot(h.astype(jnp.float32), params["head"].astype(jnp.float32)), cache


def make_router(rc: RouterConfig, n_experts: int, vocab_size: int, max_seq_len: int,
                backbone_embed_VD=None, dtype: str = "float32") -> Router:
    """Build a router; with ``embed_init='backbone'`` its embedding comes from the backbone's."""
    cfg = router_model_config(rc, vocab_size, max_seq_len, dtype)
    router = Router(cfg, rngs=nnx.Rngs(rc.seed), n_experts=n_experts, mlp=rc.mlp)
    if rc.embed_init == "backbone":
        if backbone_embed_VD is None:
            raise ConfigError("router.embed_init='backbone' needs the backbone's embedding")
        emb = np.asarray(backbone_embed_VD, np.float32)
        if emb.shape[0] != vocab_size:
            raise ConfigError(f"backbone embedding has {emb.shape[0]} rows, router vocab is {vocab_size}")
        D = emb.shape[1]
        if rc.width <= D:
            new = emb[:, : rc.width]
        else:
            q, _ = np.linalg.qr(np.random.default_rng(rc.seed).standard_normal((rc.width, D)))
            new = emb @ q.T  # [V, width], orthonormal rows of q.T keep the embedding's geometry
        router.embed.set_value(jnp.asarray(new, jnp.float32))
    return router


def route_ids(logits_BTE):
    """Top-1 route: one expert id per token, used in every backbone layer."""
    return jnp.argmax(logits_BTE, axis=-1).astype(jnp.int32)

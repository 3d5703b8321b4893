"""The Llama decoder stack as one pure function with a pluggable FFN, plus its KV cache.

The dense model (``llama.py``) and the Read-ME MoE backbone (``moe.py``) share everything but
the FFN, so both call :func:`forward` with their own ``ffn(layer_params, h_BTD, ctx)``.

Params are a plain dict::

    {"embed": [V,D], "final_norm": [D], "lm_head": [D,V] (untied only),
     "layers": {"attn_norm": [L,D], "wq": [L,D,H*hd], "wk": [L,D,K*hd], "wv": [L,D,K*hd],
                "wo": [L,H*hd,D], "ffn_norm": [L,D], ...FFN weights with a leading L...}}

Layers run under ``lax.scan`` over the leading L axis (one compiled layer body).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from readme_jax.config import ModelConfig
from readme_jax.model import layers

class KVCache(NamedTuple):
    """Keys/values for every layer: ``k, v: [L, B, S, K, hd]``; slot s holds position s."""

    k: jax.Array
    v: jax.Array


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def dense_ffn(lp: dict, h_BTD, ctx: Any):
    """Dense SwiGLU with the layer's ``wg, wu: [D,F]``, ``wd: [F,D]``; no aux output."""
    del ctx
    return layers.swiglu(h_BTD, lp["wg"], lp["wu"], lp["wd"]), None


FFN = Callable[[dict, jax.Array, Any], tuple[jax.Array, Any]]


def forward(params: dict, cfg: ModelConfig, tokens_BT, positions_BT=None, cache: KVCache | None = None,
            *, ffn: FFN = dense_ffn, ffn_ctx: Any = None, logits: bool = True, remat: bool = False):
    """Run the decoder.

    ``remat=True`` wraps the scanned layer in ``jax.checkpoint`` with ``nothing_saveable``: under
    differentiation only each layer's input (the scan carry) is kept and the layer is recomputed in the
    backward pass. Same values and gradients; less memory, one more forward of the layers.

    Returns ``(out, cache, aux)``: ``out`` is float32 logits ``[B,T,V]`` (or the final hidden
    states ``[B,T,D]`` when ``logits=False``), the updated cache (None without one), and the
    FFN's per-layer aux outputs stacked over L (None for the dense FFN).
    """
    dt = jnp.dtype(cfg.dtype)
    B, T = tokens_BT.shape
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    params = jax.tree.map(lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    x = params["embed"][tokens_BT]
    cos, sin = layers.rope_cos_sin(positions_BT, cfg.head_dim, cfg.rope_theta, cfg.rope_llama3)

    def layer(x_BTD, xs):
        with jax.named_scope("decoder_layer"):
            lp, ck, cv = xs
            x_BTD, ck, cv = attention_residual(lp, cfg, x_BTD, cos, sin, positions_BT, ck, cv)
            h = layers.rms_norm(x_BTD, lp["ffn_norm"], cfg.norm_eps)
            with jax.named_scope("ffn"):
                y, aux = ffn(lp, h, ffn_ctx)
            return x_BTD + y.astype(dt), (ck, cv, aux)

    if remat:  # prevent_cse=False: inside scan the recomputation cannot be merged away (jax.checkpoint docs)
        layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    ck, cv = (None, None) if cache is None else (cache.k, cache.v)
    x, (ck, cv, aux) = jax.lax.scan(layer, x, (params["layers"], ck, cv))
    x = layers.rms_norm(x, params["final_norm"], cfg.norm_eps)
    new_cache = None if cache is None else KVCache(ck, cv)
    if not logits:
        return x, new_cache, aux
    return logits_of_hidden(params, cfg, x), new_cache, aux


def attention_residual(lp: dict, cfg: ModelConfig, x_BTD, cos, sin, positions_BT, ck=None, cv=None):
    """One layer's first half: ``x + attention(rms_norm(x))`` (the FFN's residual input), with the layer's
    KV cache slices ``ck, cv: [B, S, K, hd]`` updated when given. Returns ``(x, ck, cv)``."""
    B, T, _ = x_BTD.shape
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    h = layers.rms_norm(x_BTD, lp["attn_norm"], cfg.norm_eps)
    q = layers.apply_rope((h @ lp["wq"]).reshape(B, T, H, hd), cos, sin)
    k = layers.apply_rope((h @ lp["wk"]).reshape(B, T, K, hd), cos, sin)
    v = (h @ lp["wv"]).reshape(B, T, K, hd)
    if ck is None:
        a = layers.attend(q, k, v, positions_BT, positions_BT, cfg.attn_scale)
    else:
        ck = layers.write_cache(ck, k, positions_BT)
        cv = layers.write_cache(cv, v, positions_BT)
        kpos = jnp.broadcast_to(jnp.arange(ck.shape[1], dtype=jnp.int32), (B, ck.shape[1]))
        a = layers.attend(q, ck, cv, positions_BT, kpos, cfg.attn_scale)
    return x_BTD + (a @ lp["wo"]).astype(x_BTD.dtype), ck, cv


def logits_of_hidden(params: dict, cfg: ModelConfig, x_BTD):
    """Project final hidden states to float32 logits (tied or untied head)."""
    head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    return jnp.dot(x_BTD.astype(head.dtype), head, preferred_element_type=jnp.float32)


def token_nll(logits_BTV, targets_BT):
    """Per-token negative log likelihood in float32."""
    logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]

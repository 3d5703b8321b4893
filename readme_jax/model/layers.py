"""Pure functions for the Llama math: RMSNorm, RoPE, grouped-query attention, SwiGLU.

No parameters live here; modules in ``llama.py``/``moe.py`` hold them and call these.
Shape suffixes: B batch, T query tokens, S key slots, D model, H heads, K kv heads,
G = H // K heads per kv head, hd head dim, F FFN width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rms_norm(x, w, eps):
    """Llama RMSNorm (statistics in float32, result in x's dtype)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, llama3=None) -> np.ndarray:
    """Inverse frequencies ``[hd/2]`` (float32); ``llama3`` = (factor, low, high, original context):
    Llama 3.1's scaling keeps high frequencies, divides low ones by ``factor`` and blends between."""
    inv = 1.0 / (np.float64(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if llama3 is not None:
        factor, low, high, old_ctx = (float(v) for v in llama3)
        wavelen = 2 * np.pi / inv
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv = np.where(medium, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv.astype(np.float32)


def rope_cos_sin(positions_BT, head_dim: int, theta: float, llama3=None):
    """cos/sin tables [B, T, hd] for the Hugging Face rotate-half convention."""
    inv_freq = jnp.asarray(rope_inv_freq(head_dim, theta, llama3))
    freqs = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B,T,hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BTNh, cos_BTh, sin_BTh):
    """Rotate-half RoPE on [B, T, N, hd] with tables [B, T, hd]."""
    half = x_BTNh.shape[-1] // 2
    x32 = x_BTNh.astype(jnp.float32)
    rot = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos_BTh[:, :, None, :] + rot * sin_BTh[:, :, None, :]
    return out.astype(x_BTNh.dtype)


def attend(q_BTHh, k_BSKh, v_BSKh, qpos_BT, kpos_BS, scale: float | None = None):
    """Causal grouped-query attention.

    Query t of row b sees key slot s iff ``kpos[b, s] <= qpos[b, t]`` (and kpos >= 0), so the
    same function serves a full forward (kpos = positions) and a KV cache (kpos = slot index,
    stale slots beyond the current position are masked out).
    """
    B, T, H, hd = q_BTHh.shape
    K = k_BSKh.shape[2]
    G = H // K
    if scale is None:
        scale = hd**-0.5
    q = q_BTHh.reshape(B, T, K, G, hd)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k_BSKh, preferred_element_type=jnp.float32) * scale
    mask = (kpos_BS[:, None, :] <= qpos_BT[:, :, None]) & (kpos_BS[:, None, :] >= 0)  # [B,T,S]
    s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v_BSKh.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v_BSKh, preferred_element_type=jnp.float32)
    return o.reshape(B, T, H * hd).astype(q_BTHh.dtype)


def swiglu(x_TD, wg_DF, wu_DF, wd_FD):
    """Dense SwiGLU FFN: (silu(x Wg) * (x Wu)) Wd."""
    h = ffn_hidden(x_TD, wg_DF, wu_DF)
    return jnp.dot(h, wd_FD, preferred_element_type=jnp.float32).astype(x_TD.dtype)


def ffn_hidden(x, wg, wu):
    """The input of the down projection, silu(x Wg) * (x Wu) (what Read-ME calibrates on)."""
    g = jnp.dot(x, wg, preferred_element_type=jnp.float32)
    u = jnp.dot(x, wu, preferred_element_type=jnp.float32)
    return (jax.nn.silu(g) * u).astype(x.dtype)


def write_cache(cache_BSKh, new_BTKh, positions_BT):
    """Scatter new keys/values into cache slots given by their positions (out of range dropped)."""
    B = cache_BSKh.shape[0]
    b = jnp.arange(B)[:, None]
    return cache_BSKh.at[b, positions_BT].set(new_BTKh.astype(cache_BSKh.dtype), mode="drop")

"""Token sampling: greedy, temperature, top-k and top-p (nucleus), per row, inside jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits_BV, key, temperature_B, top_p_B, top_k_B=None):
    """Sample one token per row. ``temperature <= 0`` means greedy for that row.

    top-k keeps the ``top_k`` most likely tokens (``top_k <= 0``: no limit); top-p then keeps the
    smallest set of most likely tokens whose probability reaches ``top_p`` (the most likely token
    is always kept).
    """
    logits = logits_BV.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    t = jnp.maximum(temperature_B, 1e-6)[:, None]
    scaled = logits / t
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each sorted token
    keep_sorted = before < top_p_B[:, None]
    if top_k_B is not None:
        rank = jnp.arange(keep_sorted.shape[-1])[None]
        keep_sorted &= (top_k_B[:, None] <= 0) | (rank < top_k_B[:, None])
    keep_sorted = keep_sorted.at[:, 0].set(True)
    masked_sorted = jnp.where(keep_sorted, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, masked_sorted, axis=-1)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(temperature_B <= 0, greedy, sampled).astype(jnp.int32)

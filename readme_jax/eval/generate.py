"""Greedy generation for a decoder through its KV cache (one jitted prefill, one jitted step)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from readme_jax.config import ModelConfig
from readme_jax.model import decoder


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _step(params, cfg: ModelConfig, tokens_BT, positions_BT, cache):
    logits, cache, _ = decoder.forward(params, cfg, tokens_BT, positions_BT, cache)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def greedy_generate(params, cfg: ModelConfig, prompt_ids: list[int], max_new_tokens: int,
                    eos_id: int | None = None) -> list[int]:
    """Greedy continuation of one prompt with the dense decoder; returns the new token ids."""
    if not prompt_ids:
        raise ValueError("greedy_generate needs a non-empty prompt")
    T = len(prompt_ids)
    max_len = T + max_new_tokens
    cache = decoder.init_cache(cfg, 1, max_len)
    tok = jnp.asarray([prompt_ids], jnp.int32)
    nxt, cache = _step(params, cfg, tok, jnp.arange(T, dtype=jnp.int32)[None], cache)
    out = []
    for i in range(max_new_tokens):
        t = int(nxt[0])
        out.append(t)
        if eos_id is not None and t == eos_id:
            break
        if i + 1 == max_new_tokens:
            break
        nxt, cache = _step(params, cfg, nxt[:, None], jnp.full((1, 1), T + i, jnp.int32), cache)
    return out

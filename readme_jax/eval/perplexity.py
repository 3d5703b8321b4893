"""Perplexity on packed token blocks, with the NLL reduced inside jit (logits never leave the device)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from readme_jax.config import ModelConfig
from readme_jax.model import decoder

NllFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]  # tokens [B, T+1] -> (sum nll, n tokens)


def block_nll(params, cfg: ModelConfig, blocks_BT1, ffn=decoder.dense_ffn, ffn_ctx=None):
    """``(sum of token NLLs, token count)`` of packed blocks ``[B, T+1]`` (inputs, shifted targets)."""
    inputs, targets = blocks_BT1[:, :-1], blocks_BT1[:, 1:]
    logits, _, _ = decoder.forward(params, cfg, inputs, ffn=ffn, ffn_ctx=ffn_ctx)
    nll = decoder.token_nll(logits, targets)
    return nll.sum(), jnp.asarray(nll.size, jnp.float32)


_dense_block_nll = jax.jit(block_nll, static_argnames=("cfg",))


def nll_fn_for(params, cfg: ModelConfig) -> NllFn:
    """``tokens_BT1 -> (sum_nll, count)`` for a dense decoder (jitted once per config and shape)."""
    return lambda blocks: _dense_block_nll(params, cfg, blocks)


def mean_nll(nll_fn: NllFn, blocks_NT1: np.ndarray, batch_size: int = 4, desc: str | None = None,
             progress: bool = True) -> float:
    """Mean per-token NLL over ``blocks`` (``[N, T+1]`` int32), batched, with a progress bar."""
    blocks_NT1 = np.asarray(blocks_NT1, np.int32)
    if blocks_NT1.ndim != 2 or blocks_NT1.shape[0] == 0 or blocks_NT1.shape[1] < 2:
        raise ValueError(f"expected token blocks [N>0, T+1>=2], got shape {blocks_NT1.shape}")
    total, count = 0.0, 0.0
    starts = range(0, blocks_NT1.shape[0], batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress or desc is None, leave=False):
        tot, cnt = nll_fn(blocks_NT1[s:s + batch_size])  # a short last batch compiles once more
        total += float(tot)
        count += float(cnt)
    return total / count

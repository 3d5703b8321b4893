"""Perplexity on packed token blocks, with the NLL reduced inside jit (logits never leave the device).

One reduction, two views: ``block_nll_sums`` gives each block's summed NLL and token count
(float64, ``[N]`` each); ``mean_nll`` is the token-weighted mean over all blocks and
``per_block_nll`` each block's own mean (the unit the bootstrap in ``eval.spread`` resamples).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from readme_jax.config import ModelConfig
from readme_jax.model import decoder

NllFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]  # tokens [B, T+1] -> (nll sum [B], n tokens [B])


def block_nll(params, cfg: ModelConfig, blocks_BT1, ffn=decoder.dense_ffn, ffn_ctx=None):
    """``(sum of token NLLs [B], token count [B])`` of packed blocks ``[B, T+1]`` (inputs, shifted targets)."""
    inputs, targets = blocks_BT1[:, :-1], blocks_BT1[:, 1:]
    logits, _, _ = decoder.forward(params, cfg, inputs, ffn=ffn, ffn_ctx=ffn_ctx)
    nll_BT = decoder.token_nll(logits, targets)
    return nll_BT.sum(-1), jnp.full(nll_BT.shape[:1], nll_BT.shape[1], jnp.float32)


_dense_block_nll = jax.jit(block_nll, static_argnames=("cfg",))


def nll_fn_for(params, cfg: ModelConfig) -> NllFn:
    """``tokens_BT1 -> (nll sum [B], count [B])`` for a dense decoder (jitted once per config and shape)."""
    return lambda blocks: _dense_block_nll(params, cfg, blocks)


def block_nll_sums(nll_fn: NllFn, blocks_NT1: np.ndarray, batch_size: int = 4, desc: str | None = None,
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(nll sum, token count)`` of every block (``[N]`` float64 each), batched, with a progress bar."""
    blocks_NT1 = np.asarray(blocks_NT1, np.int32)
    if blocks_NT1.ndim != 2 or blocks_NT1.shape[0] == 0 or blocks_NT1.shape[1] < 2:
        raise ValueError(f"expected token blocks [N>0, T+1>=2], got shape {blocks_NT1.shape}")
    sums, counts = [], []
    starts = range(0, blocks_NT1.shape[0], batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress or desc is None, leave=False):
        tot, cnt = nll_fn(blocks_NT1[s:s + batch_size])  # a short last batch compiles once more
        sums.append(np.asarray(tot, np.float64))
        counts.append(np.asarray(cnt, np.float64))
    return np.concatenate(sums), np.concatenate(counts)


def mean_nll(nll_fn: NllFn, blocks_NT1: np.ndarray, batch_size: int = 4, desc: str | None = None,
             progress: bool = True) -> float:
    """Mean per-token NLL over ``blocks`` (``[N, T+1]`` int32)."""
    sums, counts = block_nll_sums(nll_fn, blocks_NT1, batch_size, desc, progress)
    return float(sums.sum() / counts.sum())


def per_block_nll(nll_fn: NllFn, blocks_NT1: np.ndarray, batch_size: int = 4, desc: str | None = None,
                  progress: bool = True) -> np.ndarray:
    """Mean per-token NLL of each block, ``[N]`` float64 (blocks have equal length, so their mean is
    ``mean_nll``)."""
    sums, counts = block_nll_sums(nll_fn, blocks_NT1, batch_size, desc, progress)
    return sums / counts


def dense_block_nll(params, cfg, blocks: dict, batch_size: int, progress: bool, label: str) -> dict:
    """Per-block mean NLL (``[N]`` float64) per domain of a dense decoder."""
    fn = nll_fn_for(params, cfg)
    return {d: per_block_nll(fn, b, batch_size, desc=f"{label} {d}" if progress else None)
            for d, b in blocks.items()}


def domain_ppl(nll_blocks: dict) -> dict:
    """Perplexity per domain from per-block NLLs (equal-length blocks: the block mean is the token mean)."""
    return {d: math.exp(float(np.mean(v))) for d, v in nll_blocks.items()}

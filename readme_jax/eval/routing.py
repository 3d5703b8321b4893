"""Evaluation of a Read-ME model: per-domain perplexity (mean or per block) under a route source, routing
accuracy against the domain label, locality, expert load."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.eval.perplexity import block_nll, mean_nll, per_block_nll
from readme_jax.model.moe import routed_ffn
from readme_jax.model.readme_model import ReadMEModel


@jax.jit
def _routes(model: ReadMEModel, tokens_BT):
    return model.routes(tokens_BT)[0]


def routes_for(model: ReadMEModel, blocks_NT1, batch_size: int = 8):
    """The router's route ids ``[N, T]`` for the inputs of each block (jitted once per shape, batched)."""
    blocks = np.asarray(blocks_NT1)[:, :-1]
    return np.concatenate([np.asarray(_routes(model, blocks[s:s + batch_size]))
                           for s in range(0, len(blocks), batch_size)])


def _moe_nll(backbone_params, cfg, impl, blocks_BT1, route_BT):
    return block_nll(backbone_params, cfg, blocks_BT1, routed_ffn(impl), route_BT)


@functools.partial(jax.jit, static_argnames=("impl",))
def _readme_nll(model: ReadMEModel, blocks_BT1, *, impl):
    route = model.routes(blocks_BT1[:, :-1])[0]
    return _moe_nll(model.backbone_params, model.backbone_cfg, impl, blocks_BT1, route)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
def _fixed_nll(backbone_params, blocks_BT1, expert, *, cfg, impl):
    route = jnp.full((blocks_BT1.shape[0], blocks_BT1.shape[1] - 1), expert, jnp.int32)
    return _moe_nll(backbone_params, cfg, impl, blocks_BT1, route)


def _fixed_nll_fn(backbone_params, cfg, impl, expert: int):
    return lambda blocks: _fixed_nll(backbone_params, blocks, expert, cfg=cfg, impl=impl)


def readme_domain_nll(model: ReadMEModel, impl: str, val_blocks: dict[str, np.ndarray], batch_size: int = 4,
                      progress: bool = False) -> dict:
    """Mean NLL per domain with routes from the router."""
    fn = functools.partial(_readme_nll, model, impl=impl)
    return {d: mean_nll(fn, b, batch_size, desc=f"ppl {d}" if progress else None) for d, b in val_blocks.items()}


def readme_domain_block_nll(model: ReadMEModel, impl: str, val_blocks: dict[str, np.ndarray], batch_size: int = 4,
                            progress: bool = False) -> dict[str, np.ndarray]:
    """Per-block mean NLL (``[N]`` float64) per domain with routes from the router."""
    fn = functools.partial(_readme_nll, model, impl=impl)
    return {d: per_block_nll(fn, b, batch_size, desc=f"ppl {d}" if progress else None)
            for d, b in val_blocks.items()}


def fixed_route_nll(backbone_params, cfg, impl, blocks_NT1, expert: int, batch_size: int = 4,
                    desc: str | None = None) -> float:
    """Mean NLL with every token sent to one expert (oracle or forced-wrong routing)."""
    return mean_nll(_fixed_nll_fn(backbone_params, cfg, impl, expert), blocks_NT1, batch_size, desc=desc)


def fixed_route_block_nll(backbone_params, cfg, impl, blocks_NT1, expert: int, batch_size: int = 4,
                          desc: str | None = None) -> np.ndarray:
    """Per-block mean NLL (``[N]`` float64) with every token sent to one expert."""
    return per_block_nll(_fixed_nll_fn(backbone_params, cfg, impl, expert), blocks_NT1, batch_size, desc=desc)


def route_accuracy(route_NT: np.ndarray, expert: int) -> float:
    """Fraction of tokens routed to ``expert`` (the block's domain's own expert)."""
    return float(np.mean(np.asarray(route_NT) == expert))


def locality(route_NT: np.ndarray) -> float:
    """Fraction of consecutive token pairs that keep the same expert (paper: 2921/4096 ~ 0.713)."""
    r = np.asarray(route_NT)
    if r.shape[-1] < 2:
        return float("nan")
    return float(np.mean(r[:, 1:] == r[:, :-1]))


def expert_load(route_NT: np.ndarray, n_experts: int) -> np.ndarray:
    """Fraction of tokens routed to each expert."""
    counts = np.bincount(np.asarray(route_NT).reshape(-1), minlength=n_experts)[:n_experts]
    return counts / max(counts.sum(), 1)

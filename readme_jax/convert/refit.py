"""Least-squares refit of the kept channels' down projections, layer by layer (``convert.refit``).

Cutting FFN channels loses what they added to the layer's output; the down-projection rows of the
channels that stay can take much of it back. The refit walks the layers in order with the calibration
tokens flowing through the model as refit so far (each group of tokens through its own expert: group e
is domain e, routed to expert e as at calibration), and at each layer solves one ridge least-squares
problem for every kept channel's down-projection row at once:

    min over W_0, W_1..W_E of   sum_e  1/n_e || H_e[:, S_0] W_0 + H_e[:, S_e] W_e - H_e Wd ||^2
                                 + ridge * mean(diag) * ||W||^2

where ``H_e = silu(x Wg) * (x Wu)`` are ALL the dense channels of group e's tokens at this layer (the
kept channels' gate and up columns are the dense ones, unchanged), ``S_0`` the shared channels (one
``W_0`` for every expert: the shared part stays stored once), ``S_e`` expert e's own channels, and
``H_e Wd`` what the dense FFN outputs on the same input. The pruned twin is the same problem with one
shared set and no experts, over every domain's tokens, so both models get the same treatment.
Layer l's solution moves the tokens on to layer l+1 (the refit model's own stream), so later layers
correct for earlier cuts (the sequential calibration of SparseGPT/GPTQ-style pruning).

Normal equations are accumulated in float32 on device per group and solved in float64 on the host;
the system has ``|S_0| + sum_e |S_e|`` unknown rows per output dimension (about 2,500 for SmolLM2 at
r = 0.6 with 8 experts), a fraction of a second per layer.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from readme_jax.config import ModelConfig
from readme_jax.errors import ConfigError, ShapeError
from readme_jax.model import decoder, layers


def _valid(idx) -> np.ndarray:
    idx = np.asarray(idx)
    return idx[idx >= 0]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _layer_inputs(lp, x_BTD, *, cfg: ModelConfig):
    """``(x after attention, all dense FFN channels [B*T, F] float32, the dense FFN output [B*T, D])``."""
    B, T, _ = x_BTD.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cos, sin = layers.rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, cfg.rope_llama3)
    x1, _, _ = decoder.attention_residual(lp, cfg, x_BTD, cos, sin, pos)
    h = layers.rms_norm(x1, lp["ffn_norm"], cfg.norm_eps)
    hid = layers.ffn_hidden(h, lp["wg"], lp["wu"]).astype(jnp.float32).reshape(B * T, -1)
    y = jnp.dot(hid, lp["wd"].astype(jnp.float32))
    return x1, hid, y


@jax.jit
def _normal_blocks(hid_NF, y_ND, idx_K):
    """``(H_S^T H_S, H_S^T y)`` for the channels ``idx`` (float32; -1 entries give zero rows/columns)."""
    ok = (idx_K >= 0).astype(jnp.float32)
    hs = jnp.take(hid_NF, jnp.maximum(idx_K, 0), axis=1) * ok
    return hs.T @ hs, hs.T @ y_ND


@jax.jit
def _apply(x1_BTD, hid_NF, idx_K, w_KD):
    ok = (idx_K >= 0).astype(jnp.float32)
    hs = jnp.take(hid_NF, jnp.maximum(idx_K, 0), axis=1) * ok
    return x1_BTD + (hs @ w_KD).reshape(x1_BTD.shape).astype(x1_BTD.dtype)


def solve_blocks(A: np.ndarray, B: np.ndarray, off: np.ndarray) -> np.ndarray:
    """``A^-1 B`` for the refit's normal equations, whose expert blocks ``off[e+1]:off[e+2]`` touch only the
    shared block ``0:off[1]`` and themselves: the shared rows by their Schur complement
    ``A_00 - sum_e A_0e A_ee^-1 A_e0``, then each expert's rows on its own (a few expert-sized solves
    instead of one solve of the whole system)."""
    n0 = int(off[1])
    blocks = [slice(int(off[i]), int(off[i + 1])) for i in range(1, len(off) - 1)]
    if not blocks:
        return np.linalg.solve(A, B)
    S, r = A[:n0, :n0].copy(), B[:n0].copy()
    inv_parts = []
    for b in blocks:
        X = np.linalg.solve(A[b, b], np.concatenate([A[b, :n0], B[b]], axis=1))  # [A_ee^-1 A_e0, A_ee^-1 B_e]
        S -= A[:n0, b] @ X[:, :n0]
        r -= A[:n0, b] @ X[:, n0:]
        inv_parts.append(X)
    W = np.zeros_like(B)
    W[:n0] = np.linalg.solve(S, r) if n0 else 0.0
    for b, X in zip(blocks, inv_parts):
        W[b] = X[:, n0:] - X[:, :n0] @ W[:n0]
    return W


def refit_down_projections(dense_params: dict, cfg: ModelConfig, groups: Sequence[np.ndarray],
                           shared_index_LP: np.ndarray | None, expert_index_LER: np.ndarray | None,
                           ridge: float = 1e-4, progress: bool = False) -> dict:
    """Refit the down projections of a cut FFN (module docstring); returns float32 numpy arrays.

    ``groups[e]``: int token blocks ``[n_e, T]`` of group e (routed to expert e; with no experts every
    group uses the shared channels only). ``shared_index_LP``: dense channel of each shared column
    (-1 = padding) or None; ``expert_index_LER``: of each expert's own column, or None. Returns
    ``{"shared_wd": [L, P, D]}`` and/or ``{"wd": [L, E, R, D]}``, padding rows zero.
    """
    L, D = cfg.n_layers, cfg.d_model
    if shared_index_LP is None and expert_index_LER is None:
        raise ShapeError("refit_down_projections: give the shared and/or the experts' channel indices")
    E = 0 if expert_index_LER is None else int(np.shape(expert_index_LER)[1])
    if E and len(groups) != E:
        raise ShapeError(f"refit_down_projections: {len(groups)} token groups for {E} experts")
    if not groups or any(np.ndim(g) != 2 or np.size(g) == 0 for g in groups):
        raise ShapeError("refit_down_projections: every group needs int token blocks [n, T] with n, T >= 1")
    if not ridge > 0:
        raise ConfigError(f"convert.refit_ridge must be > 0, got {ridge}")
    dt = jnp.dtype(cfg.dtype)
    params = jax.tree.map(lambda a: jnp.asarray(a, dt) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
                          else jnp.asarray(a), dense_params)
    xs = [params["embed"][jnp.asarray(g, jnp.int32)] for g in groups]
    out_shared = None if shared_index_LP is None else np.zeros((*np.shape(shared_index_LP), D), np.float32)
    out_exp = None if expert_index_LER is None else np.zeros((*np.shape(expert_index_LER), D), np.float32)
    for l in tqdm(range(L), desc="refit down projections", disable=not progress, leave=False):
        lp = jax.tree.map(lambda a: a[l], params["layers"])
        s0 = _valid(shared_index_LP[l]) if shared_index_LP is not None else np.zeros(0, np.int64)
        se = [_valid(expert_index_LER[l, e]) for e in range(E)]
        sizes = [len(s0)] + [len(x) for x in se]
        off = np.cumsum([0] + sizes)
        A = np.zeros((off[-1], off[-1]))
        B = np.zeros((off[-1], D))
        staged = []
        for e, x in enumerate(xs):
            x1, hid, y = _layer_inputs(lp, x, cfg=cfg)
            n = hid.shape[0]
            ex = se[e] if E else np.zeros(0, np.int64)
            idx = np.concatenate([s0, ex]).astype(np.int32)
            gram, rhs = (np.asarray(a, np.float64) / n for a in _normal_blocks(hid, y, jnp.asarray(idx)))
            pos = np.concatenate([np.arange(off[0], off[1]), np.arange(off[e + 1], off[e + 2]) if E else []]).astype(int)
            A[np.ix_(pos, pos)] += gram
            B[pos] += rhs
            staged.append((x1, hid, idx, pos))
        reg = ridge * max(float(np.mean(np.diag(A))), 1e-30)
        W = solve_blocks(A + reg * np.eye(len(A)), B, off)
        for e, (x1, hid, idx, pos) in enumerate(staged):
            xs[e] = _apply(x1, hid, jnp.asarray(idx), jnp.asarray(W[pos], jnp.float32))
        if out_shared is not None:
            out_shared[l, :len(s0)] = W[:len(s0)]
        for e in range(E):
            out_exp[l, e, :len(se[e])] = W[off[e + 1]:off[e + 2]]
    out = {}
    if out_shared is not None:
        out["shared_wd"] = out_shared
    if out_exp is not None:
        out["wd"] = out_exp
    return out

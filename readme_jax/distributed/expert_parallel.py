"""The Read-ME MoE FFN with experts spread over the mesh's ``expert`` axis (``jax.shard_map``).

:func:`expert_parallel_ffn` returns ``ffn(lp, h_BTD, route_BT) -> (y_BTD, dropped)`` for
``decoder.forward`` (the signature of ``moe.routed_ffn``). Inside, every device holds
``E / n_expert`` experts (and ``F / n_model`` of their columns) and the tokens of its batch shard
(B over ``(data, expert)``); per data group the expert axis exchanges tokens in one of two ways:

- ``"psum"``: all-gather the group's tokens over ``expert``; each device runs its own experts
  on the tokens routed to them (others get local ids out of range, which ``expert_ffn`` drops
  as exact zeros); ``psum_scatter`` sums the partial outputs (one non-zero term per token) and
  hands each device its own rows back. Dropless; exact.
- ``"all_to_all"``: each device packs its tokens into ``n_expert`` buckets of ``C`` rows (one
  per destination shard), one ``all_to_all`` sends them, the destination runs its experts, a
  second ``all_to_all`` returns the outputs. ``capacity_factor=0`` gives ``C`` = tokens per
  device (dropless); otherwise ``C = ceil(capacity_factor * tokens / n_expert)`` and tokens
  past a bucket's capacity skip the FFN (output 0, so only the residual carries them).

``ragged_all_to_all`` (variable-size buckets) is not used: it is UNIMPLEMENTED on XLA:CPU.
The ``model`` axis splits each expert's F columns; partial outputs are summed with ``psum``.
``dropped`` is the number of tokens that skipped the FFN in the layer (global count; 0 for psum).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from readme_jax.config import MESH_FFN_COMMS
from readme_jax.distributed.mesh import BATCH_AXES, check_mesh
from readme_jax.errors import ConfigError, ShapeError
from readme_jax.model.moe import shared_ffn
from readme_jax.ops.expert_ffn import expert_ffn

TOKENS = P(BATCH_AXES)
W_IN = P("expert", None, "model")  # wg, wu: [E, D, F] in one layer
W_OUT = P("expert", "model", None)  # wd: [E, F, D]


def bucket_capacity(n_tokens: int, n_shards: int, capacity_factor: float) -> int:
    """Rows per destination bucket: all tokens when ``capacity_factor == 0`` (dropless)."""
    if capacity_factor == 0:
        return n_tokens
    return max(1, min(n_tokens, math.ceil(capacity_factor * n_tokens / n_shards)))


def _local_ffn(x_ND, local_N, wg, wu, wd, impl, impl_kw):
    """This shard's experts on rows ``x_ND``; ids outside ``[0, E_local)`` give 0 rows."""
    y = expert_ffn(x_ND, local_N, wg, wu, wd, impl=impl, **impl_kw)
    return lax.psum(y, "model")  # F split over model: sum partial down-projections


def _psum_body(x_BTD, r_BT, wg, wu, wd, *, impl, impl_kw):
    e_loc = wg.shape[0]
    base = lax.axis_index("expert") * e_loc
    xg = lax.all_gather(x_BTD, "expert", axis=0, tiled=True)  # the data group's tokens
    rg = lax.all_gather(r_BT, "expert", axis=0, tiled=True)
    D = xg.shape[-1]
    y = _local_ffn(xg.reshape(-1, D), (rg - base).reshape(-1), wg, wu, wd, impl, impl_kw)
    y = lax.psum_scatter(y.reshape(xg.shape), "expert", scatter_dimension=0, tiled=True)
    return y, jnp.zeros((), jnp.int32)


def dispatch_plan(r_N, e_loc: int, n_shards: int, capacity: int):
    """Where each token goes: ``(slot_N, keep_N, ids_S)`` with ``S = n_shards * capacity``.

    Token t goes to shard ``r // e_loc`` at row ``slot`` of the send buffer (bucket-major); ``keep``
    is False for ids outside ``[0, e_loc * n_shards)`` and past-capacity tokens. ``ids_S`` are the
    local expert ids the receiver uses (``e_loc``, i.e. out of range, for empty rows).
    """
    valid = (r_N >= 0) & (r_N < e_loc * n_shards)
    dest = jnp.where(valid, r_N // e_loc, 0)
    onehot = jax.nn.one_hot(dest, n_shards, dtype=jnp.int32) * valid[:, None]
    pos = jnp.take_along_axis(jnp.cumsum(onehot, axis=0), dest[:, None], axis=1)[:, 0] - 1
    keep = valid & (pos < capacity)
    S = n_shards * capacity
    slot = jnp.where(keep, dest * capacity + pos, S)  # S: out of bounds, dropped by the scatters
    ids = jnp.full((S,), e_loc, jnp.int32).at[slot].set((r_N - dest * e_loc).astype(jnp.int32), mode="drop")
    return slot, keep, ids


def _a2a_body(x_BTD, r_BT, wg, wu, wd, *, impl, impl_kw, capacity_factor):
    e_loc, n_sh = wg.shape[0], lax.axis_size("expert")
    B, T, D = x_BTD.shape
    x = x_BTD.reshape(B * T, D)
    r = r_BT.reshape(B * T)
    cap = bucket_capacity(B * T, n_sh, capacity_factor)
    slot, keep, ids = dispatch_plan(r, e_loc, n_sh, cap)
    send = jnp.zeros((n_sh * cap, D), x.dtype).at[slot].set(x, mode="drop")
    recv = lax.all_to_all(send, "expert", 0, 0, tiled=True)
    recv_ids = lax.all_to_all(ids, "expert", 0, 0, tiled=True)
    y_recv = _local_ffn(recv, recv_ids, wg, wu, wd, impl, impl_kw)
    back = lax.all_to_all(y_recv, "expert", 0, 0, tiled=True)
    y = jnp.where(keep[:, None], jnp.take(back, jnp.minimum(slot, n_sh * cap - 1), axis=0), 0)
    valid = (r >= 0) & (r < e_loc * n_sh)
    dropped = lax.psum(jnp.sum(valid & ~keep).astype(jnp.int32), BATCH_AXES)
    return y.reshape(B, T, D), dropped


def expert_parallel_ffn(mesh: Mesh, *, impl: str = "xla", comm: str = "psum", capacity_factor: float = 0.0,
                        **impl_kw):
    """FFN for ``decoder.forward`` with experts sharded over ``mesh``'s expert axis.

    Layer weights ``wg, wu: [E, D, F]``, ``wd: [E, F, D]`` need E divisible by the expert axis
    (``pad_experts``) and F by the model axis; ``h_BTD`` needs B divisible by ``data * expert``.
    Returns ``ffn(lp, h_BTD, route_BT) -> (y_BTD, dropped)``; ``impl``/``impl_kw`` go to
    ``expert_ffn`` on each shard.
    """
    check_mesh(mesh)
    if comm not in MESH_FFN_COMMS:
        raise ConfigError(f"expert_parallel_ffn: comm must be one of {MESH_FFN_COMMS}, got {comm!r}")
    if not capacity_factor >= 0:
        raise ConfigError(f"expert_parallel_ffn: capacity_factor must be >= 0 (0 = dropless), got {capacity_factor}")
    n_b = mesh.shape["data"] * mesh.shape["expert"]
    n_e, n_m = mesh.shape["expert"], mesh.shape["model"]
    if comm == "psum":
        body = lambda *a: _psum_body(*a, impl=impl, impl_kw=impl_kw)  # noqa: E731
    else:
        body = lambda *a: _a2a_body(*a, impl=impl, impl_kw=impl_kw, capacity_factor=capacity_factor)  # noqa: E731
    sharded = jax.shard_map(body, mesh=mesh, in_specs=(TOKENS, TOKENS, W_IN, W_IN, W_OUT),
                            out_specs=(TOKENS, P()))

    def ffn(lp, h_BTD, route_BT):
        wg, wu, wd = lp["wg"], lp["wu"], lp["wd"]
        E, D, F = wg.shape
        where = f"expert_parallel_ffn (mesh {dict(mesh.shape)})"
        if E % n_e:
            raise ShapeError(f"{where}: {E} experts cannot be split over expert axis of size {n_e}; "
                             f"pad with readme_jax.distributed.pad_experts(params, {n_e})")
        if F % n_m:
            raise ShapeError(f"{where}: expert width F={F} is not divisible by model axis of size {n_m}")
        if h_BTD.shape[0] % n_b:
            raise ShapeError(f"{where}: batch B={h_BTD.shape[0]} must be a multiple of data x expert = {n_b}")
        if tuple(route_BT.shape) != tuple(h_BTD.shape[:2]):
            raise ShapeError(f"{where}: route shape {tuple(route_BT.shape)} does not match tokens "
                             f"{tuple(h_BTD.shape[:2])}")
        y, dropped = sharded(h_BTD, route_BT.astype(jnp.int32), wg, wu, wd)
        return shared_ffn(lp, h_BTD, y), dropped  # the split layout's shared part: replicated, every token

    return ffn

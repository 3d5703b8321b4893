"""The device mesh (data, expert, model) and where every array lives on it.

Placement is decided by a leaf's path and rank, so one rule covers params, gradients and
optimizer states (optax keeps the params' dict keys inside its states):

- expert weights ``.../wg, wu: [L, E, D, F]`` and ``.../wd: [L, E, F, D]`` (rank 4): E over
  ``expert``, F over ``model``; replicated over ``data``;
- everything else (attention, norms, embeddings, LM head, the router, scalars): replicated;
- a batch ``[B, ...]``: B over ``(data, expert)``, so attention never repeats work on the
  expert axis; the expert-parallel FFN moves tokens to their experts and back.

E must be a multiple of the expert axis: :func:`pad_experts` appends zero "dummy" experts that
the router never picks (their gradients are exactly 0, so they stay 0 under AdamW).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from readme_jax.config import MeshConfig
from readme_jax.errors import ConfigError, ShapeError

AXES = ("data", "expert", "model")
BATCH_AXES = ("data", "expert")
EXPERT_SPECS = {  # expert weights [L, E, ., .]
    "wg": P(None, "expert", None, "model"),
    "wu": P(None, "expert", None, "model"),
    "wd": P(None, "expert", "model", None),
}


# --------------------------------------------------------------------------- mesh


def mesh_shape(mc: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """``(data, expert, model)`` sizes for ``n_devices``; ``data=-1`` takes the rest."""
    em = mc.expert * mc.model
    if mc.data == -1:
        if n_devices % em:
            raise ConfigError(f"mesh: {n_devices} devices cannot be split into expert={mc.expert} x "
                              f"model={mc.model} (= {em}) groups; expected a device count divisible by {em}")
        return n_devices // em, mc.expert, mc.model
    if mc.data * em != n_devices:
        raise ConfigError(f"mesh: data={mc.data} x expert={mc.expert} x model={mc.model} = {mc.data * em} "
                          f"devices, but {n_devices} devices are given (set mesh.data=-1 to use them all)")
    return mc.data, mc.expert, mc.model


def make_mesh(mc: MeshConfig, devices: Sequence | None = None) -> Mesh:
    """A ``(data, expert, model)`` mesh with Auto axis types over ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mc, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def check_mesh(mesh: Mesh) -> None:
    if tuple(mesh.axis_names) != AXES:
        raise ConfigError(f"expected a mesh with axes {AXES} (readme_jax.distributed.make_mesh), "
                          f"got axes {tuple(mesh.axis_names)}")


def batch_shards(mesh: Mesh) -> int:
    """How many pieces a batch is cut into: ``data * expert``."""
    return mesh.shape["data"] * mesh.shape["expert"]


# --------------------------------------------------------------------------- placement


def _leaf_name(path) -> str | None:
    last = path[-1] if path else None
    return getattr(last, "key", None) if isinstance(last, jax.tree_util.DictKey) else None


def spec_for(path, leaf) -> P:
    """PartitionSpec of one leaf by the placement rule (module docstring)."""
    name = _leaf_name(path)
    if name in EXPERT_SPECS and np.ndim(leaf) == 4:
        return EXPERT_SPECS[name]
    return P()


def param_specs(tree):
    """The PartitionSpec tree of ``tree`` (params, grads or an optax state)."""
    return jax.tree_util.tree_map_with_path(spec_for, tree)


def param_shardings(tree, mesh: Mesh):
    """NamedShardings of ``tree`` on ``mesh``; checks that expert dims divide their axes."""
    check_mesh(mesh)

    def one(path, leaf):
        spec = spec_for(path, leaf)
        for dim, axis in enumerate(spec):
            if axis is not None and np.shape(leaf)[dim] % mesh.shape[axis]:
                what = "experts" if axis == "expert" else "expert columns (F)"
                hint = " (readme_jax.distributed.pad_experts pads with dummy experts)" if axis == "expert" else ""
                raise ShapeError(f"{jax.tree_util.keystr(path)}: shape {tuple(np.shape(leaf))} has "
                                 f"{np.shape(leaf)[dim]} {what} on dim {dim}, not divisible by mesh axis "
                                 f"'{axis}' of size {mesh.shape[axis]}{hint}")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _put(x, sharding: NamedSharding):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=sharding)(x)  # global already: reshard on devices
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # every process holds the same full value: each keeps its own pieces
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_tree(tree, mesh: Mesh, shardings=None):
    """Place a tree (host or device arrays, same value on every process) by the placement rule."""
    shardings = param_shardings(tree, mesh) if shardings is None else shardings
    return jax.tree.map(_put, tree, shardings)


def shard_batch(blocks_B, mesh: Mesh, *, process_local: bool = False):
    """A batch with B over ``(data, expert)``.

    ``process_local=False``: every process passes the whole global batch (same on all).
    ``process_local=True``: each process passes only the rows its devices own (multi-host data
    loading); with :func:`make_mesh` these are a contiguous block, process 0's first.
    """
    n = batch_shards(mesh)
    sh = batch_sharding(mesh)
    if process_local:
        return jax.make_array_from_process_local_data(sh, np.asarray(blocks_B))
    if np.shape(blocks_B)[0] % n:
        raise ShapeError(f"batch of {np.shape(blocks_B)[0]} rows cannot be split over data x expert = {n} "
                         f"devices of mesh {dict(mesh.shape)}; expected a multiple of {n}")
    return _put(blocks_B, sh)


def gather_tree(tree):
    """Full host (numpy) values of a tree of possibly sharded, possibly multi-process arrays."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


# --------------------------------------------------------------------------- dummy experts


def padded_experts(n_experts: int, multiple: int) -> int:
    return int(math.ceil(n_experts / multiple) * multiple)


def _map_experts(tree, fn):
    def one(path, leaf):
        if _leaf_name(path) in EXPERT_SPECS and np.ndim(leaf) == 4:
            return fn(leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(one, tree)


def expert_count(tree) -> int:
    """E of the expert weights in ``tree`` (ShapeError when there are none or they disagree)."""
    found = set()
    _map_experts(tree, lambda a: found.add(np.shape(a)[1]))
    if len(found) != 1:
        raise ShapeError(f"expected expert weights wg/wu/wd [L, E, ., .] with one E, found E values {sorted(found)}")
    return found.pop()


def pad_experts(tree, multiple: int):
    """Append zero experts so E becomes a multiple of ``multiple`` (e.g. the expert axis size)."""
    if multiple < 1:
        raise ConfigError(f"pad_experts: multiple must be >= 1, got {multiple}")
    E = expert_count(tree)
    extra = padded_experts(E, multiple) - E
    if not extra:
        return tree
    widths = ((0, 0), (0, extra), (0, 0), (0, 0))  # host arrays stay on the host (no device copy of them all)
    return _map_experts(tree, lambda a: np.pad(a, widths) if isinstance(a, np.ndarray) else jnp.pad(a, widths))


def unpad_experts(tree, n_experts: int):
    """Drop the dummy experts: keep the first ``n_experts``."""
    E = expert_count(tree)
    if n_experts > E:
        raise ShapeError(f"unpad_experts: asked for {n_experts} experts but the tree holds only {E}")
    return _map_experts(tree, lambda a: a[:, :n_experts])

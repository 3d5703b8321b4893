"""Orbax checkpoints of sharded params that restore onto any mesh (8 devices -> 4 -> 1).

Same layout as ``checkpoints.orbax_io`` (``dir/params/`` + ``dir/meta.json``), so
``orbax_io.restore_params`` also reads one onto a single device. Each process writes only the
shards it holds; ``meta.json`` records the logical expert count (dummy experts excluded).

Restoring reads every array straight into the target mesh's placement (each device reads only
its own slice). When the stored E is not a multiple of the new expert axis, the expert weights
are read with E unsplit, trimmed to the logical experts, re-padded and re-placed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from readme_jax.checkpoints.orbax_io import META_FILE, PARAMS_DIR, open_checkpoint
from readme_jax.distributed.mesh import (expert_count, pad_experts, param_shardings, shard_tree, spec_for,
                                         unpad_experts)
from readme_jax.errors import CheckpointError, ShapeError

SHARDED_KEY = "expert_sharding"


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def save_sharded(path, tree: dict, meta: dict | None = None, *, n_experts: int | None = None,
                 overwrite: bool = False) -> Path:
    """Save a (sharded) param tree; every process must call it. ``n_experts``: the logical E
    (default: all stored experts are real)."""
    d = Path(path).absolute()
    if (d / PARAMS_DIR).exists():
        if not overwrite:
            raise CheckpointError(f"{d / PARAMS_DIR} already exists; pass overwrite=True to replace it")
        if jax.process_index() == 0:
            shutil.rmtree(d / PARAMS_DIR)
        _barrier("readme_jax_ckpt_rm")
    try:
        stored = expert_count(tree)
    except ShapeError:
        stored = None
    info = {"n_experts": n_experts if n_experts is not None else stored, "n_experts_stored": stored}
    try:
        meta_text = json.dumps({**(meta or {}), SHARDED_KEY: info}, indent=2, sort_keys=True)
    except TypeError as e:
        raise CheckpointError(f"meta for {d} is not JSON-serializable: {e}") from None
    d.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(d / PARAMS_DIR, tree)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        (d / META_FILE).write_text(meta_text)
    _barrier("readme_jax_ckpt_saved")
    return d


def _restore_spec(path, shape_leaf, mesh: Mesh) -> P:
    spec = spec_for(path, shape_leaf)
    # a dim that does not divide its mesh axis is read unsplit (fixed after restore)
    return P(*(a if a is None or shape_leaf.shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(spec)))


def restore_sharded(path, mesh: Mesh) -> tuple[dict, dict]:
    """Read a checkpoint onto ``mesh``: ``(tree, meta)`` with E padded to the expert axis."""
    d, meta, ckptr, tree = open_checkpoint(path, local=False)
    shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
    target = jax.tree_util.tree_map_with_path(
        lambda p, s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, _restore_spec(p, s, mesh))),
        shapes)
    arrays = ckptr.restore(d / PARAMS_DIR, target)
    info = meta.get(SHARDED_KEY) or {}
    n_e = mesh.shape["expert"]
    try:
        stored = expert_count(arrays)
    except ShapeError:
        return arrays, meta  # no expert weights: nothing to re-pad
    if stored % n_e:
        logical = info.get("n_experts") or stored
        arrays = pad_experts(unpad_experts(arrays, logical), n_e)
        arrays = shard_tree(arrays, mesh, param_shardings(arrays, mesh))
    return arrays, meta


def logical_experts(meta: dict, default: int | None = None) -> int | None:
    """The real (non-dummy) expert count recorded by :func:`save_sharded`."""
    return (meta.get(SHARDED_KEY) or {}).get("n_experts", default)


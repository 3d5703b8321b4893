"""Our own checkpoint format: an orbax PyTree checkpoint of the arrays plus ``meta.json``.

Layout of a directory written by :func:`save_params`::

    dir/params/      orbax StandardCheckpointHandler output (the nested dict of arrays)
    dir/meta.json    JSON metadata (e.g. {"model_config": {...}, "kind": "llama", ...})
    dir/tokenizer.json, tokenizer_config.json   (optional, when a tokenizer is given)
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from readme_jax.errors import CheckpointError
from readme_jax.fsutil import atomic_dir

PARAMS_DIR = "params"
META_FILE = "meta.json"


def process_local_options() -> ocp.options.MultiprocessingOptions:
    """orbax options for a checkpoint this process writes or reads alone (its arrays live on its own
    devices): no barrier with the other processes of a multi-process job, which may be busy elsewhere
    (in the main job only process 0 runs the stages). One process: orbax's defaults."""
    if jax.process_count() == 1:
        return ocp.options.MultiprocessingOptions()
    i = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=i, active_processes={i},
                                              barrier_sync_key_prefix=f"readme_jax_process{i}")


def local_checkpointer() -> ocp.StandardCheckpointer:
    """A StandardCheckpointer for :func:`process_local_options` (every save and restore here but
    ``distributed/checkpoint.py``'s, which all processes call together)."""
    return ocp.StandardCheckpointer(multiprocessing_options=process_local_options())


def local_manager_options(max_to_keep: int) -> ocp.CheckpointManagerOptions:
    """CheckpointManager options for :func:`process_local_options`; under several processes orbax
    does not create the root folder itself (the caller does)."""
    multi = jax.process_count() > 1
    return ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, multiprocessing_options=process_local_options(),
                                        create=not multi)


def savable(tree):
    """``tree`` as orbax saves it from this process alone: unchanged with one process; with several,
    on the host (orbax refuses process-local jax arrays in a multi-process job, numpy it takes)."""
    return tree if jax.process_count() == 1 else jax.device_get(tree)


def is_orbax_dir(path) -> bool:
    d = Path(path)
    return (d / PARAMS_DIR).is_dir() and (d / META_FILE).is_file()


def save_params(path, arrays: dict, meta: dict, tokenizer=None, overwrite: bool = False) -> Path:
    """Write ``arrays`` with orbax and ``meta`` as JSON (and the tokenizer when given).

    The folder is written whole or not at all: into a sibling temp folder, renamed into place at the
    end (a kill mid-write leaves the old folder, or none, never a half-written one).
    """
    d = Path(path).absolute()
    if d.exists() and (not d.is_dir() or any(d.iterdir())) and not overwrite:
        raise CheckpointError(f"{d} already exists; pass overwrite=True to replace it")
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"meta for {d} is not JSON-serializable: {e}") from None
    with atomic_dir(d, overwrite=True) as tmp:
        ckptr = local_checkpointer()
        ckptr.save(tmp / PARAMS_DIR, savable(arrays))
        ckptr.wait_until_finished()
        (tmp / META_FILE).write_text(meta_text)
        if tokenizer is not None:
            tokenizer.save_hf(tmp)
    return d


def open_checkpoint(path, local: bool = True):
    """``(dir, meta, checkpointer, tree_metadata)`` of a readme-jax orbax checkpoint (validated).
    ``local=False``: a checkpointer every process of the job calls together (sharded restore)."""
    d = Path(path).absolute()
    if not is_orbax_dir(d):
        raise CheckpointError(f"{d}: not a readme-jax orbax checkpoint (expected {PARAMS_DIR}/ and {META_FILE})")
    try:
        meta = json.loads((d / META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{d / META_FILE}: invalid JSON ({e})") from None
    ckptr = local_checkpointer() if local else ocp.StandardCheckpointer()
    try:
        item = ckptr.metadata(d / PARAMS_DIR).item_metadata
        if item is None:
            raise ValueError("no item metadata")
        tree = item.tree
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{d / PARAMS_DIR}: the orbax checkpoint's metadata cannot be read "
                              f"({type(e).__name__}); it is incomplete or corrupt") from None
    return d, meta, ckptr, tree


def read_meta(path) -> dict:
    """The ``meta.json`` of a readme-jax orbax checkpoint, without reading its arrays."""
    d = Path(path)
    if not is_orbax_dir(d):
        raise CheckpointError(f"{d}: not a readme-jax orbax checkpoint (expected {PARAMS_DIR}/ and {META_FILE})")
    try:
        return json.loads((d / META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{d / META_FILE}: invalid JSON ({e})") from None


def restore_params(path) -> tuple[dict, dict]:
    """Read back ``(arrays, meta)``; arrays are jax arrays on this process's first device."""
    d, meta, ckptr, tree = open_checkpoint(path)
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree)
    try:
        arrays = ckptr.restore(d / PARAMS_DIR, target)
    except (OSError, ValueError, KeyError) as e:  # files missing or damaged under params/
        raise CheckpointError(f"{d / PARAMS_DIR}: the orbax checkpoint cannot be read "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              "it is incomplete or corrupt") from None
    return arrays, meta

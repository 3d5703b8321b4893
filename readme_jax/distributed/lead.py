"""Work done by process 0 alone while the other processes of a multi-process job wait for it.

Used by the main job's CLI commands under a multi-process launch (docs/DISTRIBUTED.md): process 0
runs the stages and writes every file; the others block until process 0 posts the outcome in the
``jax.distributed`` coordination service's key-value store (no device collective, so the wait has
no collective timeout and lasts as long as process 0's work), then return or raise process 0's
error. A file process 0 wrote before posting is complete when the others read it (shared output
folder required).
"""

from __future__ import annotations

import itertools
from typing import Callable, TypeVar

import jax

from readme_jax.errors import ReadmeError

T = TypeVar("T")
WAIT_CHUNK_MS = 3_600_000  # one hour per blocking get; the wait repeats until process 0 posts
_ids = itertools.count()


class LeadFailed(ReadmeError):
    """Process 0 failed the work the other processes were waiting for."""


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def is_lead() -> bool:
    """True on process 0 (and in a single-process run): the process that writes files."""
    return jax.process_index() == 0


def _client():
    from jax._src import distributed  # local import: jax's coordination client has no public accessor (jax 0.10)

    client = distributed.global_state.client
    if client is None:
        raise ReadmeError("multi-process run without a jax.distributed client (initialize_from_env not called)")
    return client


def _get(client, key: str) -> str:
    while True:
        try:
            return client.blocking_key_value_get(key, WAIT_CHUNK_MS)
        except Exception as e:  # jax raises its own XlaRuntimeError on timeout; retry only on that
            if "DEADLINE_EXCEEDED" not in str(e) and "imed out" not in str(e):
                raise


def lead_only(name: str, fn: Callable[[], T], others: Callable[[], T] | None = None) -> T | None:
    """Run ``fn`` on process 0; the other processes wait for it to finish, then return ``others()``
    (None without it) or raise :class:`LeadFailed` with process 0's error. Every process must call
    it with the same ``name``, in the same order. Single-process: just ``fn()``."""
    if not is_multiprocess():
        return fn()
    key = f"readme_jax/lead/{next(_ids)}/{name}"
    if is_lead():
        try:
            out = fn()
        except BaseException as e:
            _client().key_value_set(key, f"error: {type(e).__name__}: {' '.join(str(e).split())}"[:2000])
            raise
        _client().key_value_set(key, "ok")
        return out
    got = _get(_client(), key)
    if got != "ok":
        raise LeadFailed(f"process 0 failed {name!r} ({got.removeprefix('error: ')}); see its log")
    return None if others is None else others()

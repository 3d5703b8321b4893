"""Start JAX's distributed runtime from the environment (explicit coordinator, SLURM or TPU pod).

``READMEJAX_LAUNCH`` picks the method (default ``auto``):

- ``explicit``: ``READMEJAX_COORDINATOR`` (host:port of process 0), ``READMEJAX_NUM_PROCESSES``,
  ``READMEJAX_PROCESS_ID`` and optionally ``READMEJAX_LOCAL_DEVICE_IDS`` (e.g. ``0,1``);
  ``launch/local_multiprocess.sh`` sets these.
- ``slurm``: ``jax.distributed.initialize()`` reads SLURM_* itself (coordinator = first node of
  the step, one process per task, each task gets local device ``SLURM_LOCALID``);
  ``launch/slurm_train.sbatch``.
- ``tpu``: ``jax.distributed.initialize()`` reads the TPU VM metadata; ``launch/tpu_pod.sh``.
- ``single``: one process, nothing to start.

``auto`` chooses explicit when ``READMEJAX_COORDINATOR`` is set, else slurm inside a SLURM step
with more than one task, else tpu when ``TPU_WORKER_HOSTNAMES`` lists several hosts, else single.
Every process then sees the global device list; ``make_mesh`` spans all of them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax

from readme_jax.errors import ConfigError

METHODS = ("auto", "explicit", "slurm", "tpu", "single")
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """How this process joins the job: ``method`` and the ``jax.distributed.initialize`` kwargs."""

    method: str
    kwargs: dict


def _int(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name)
    if raw is None:
        raise ConfigError(f"{name} is not set; the explicit launch needs READMEJAX_COORDINATOR, "
                          f"READMEJAX_NUM_PROCESSES and READMEJAX_PROCESS_ID")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def _explicit(env: Mapping[str, str]) -> LaunchSpec:
    coord = env.get("READMEJAX_COORDINATOR", "")
    host, _, port = coord.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"READMEJAX_COORDINATOR must be host:port (process 0's address), got {coord!r}")
    n = _int(env, "READMEJAX_NUM_PROCESSES")
    pid = _int(env, "READMEJAX_PROCESS_ID")
    if n < 1 or not 0 <= pid < n:
        raise ConfigError(f"READMEJAX_PROCESS_ID must be in [0, READMEJAX_NUM_PROCESSES={n}), got {pid}")
    kwargs = {"coordinator_address": coord, "num_processes": n, "process_id": pid}
    ids = env.get("READMEJAX_LOCAL_DEVICE_IDS")
    if ids:
        try:
            kwargs["local_device_ids"] = [int(i) for i in ids.split(",")]
        except ValueError:
            raise ConfigError(f"READMEJAX_LOCAL_DEVICE_IDS must be comma-separated integers, got {ids!r}") from None
    return LaunchSpec("explicit", kwargs)


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchSpec:
    """Decide, from environment variables only, how to start (module docstring)."""
    env = os.environ if env is None else env
    method = env.get("READMEJAX_LAUNCH", "auto")
    if method not in METHODS:
        raise ConfigError(f"READMEJAX_LAUNCH must be one of {METHODS}, got {method!r}")
    if method == "auto":
        if env.get("READMEJAX_COORDINATOR"):
            method = "explicit"
        elif all(v in env for v in SLURM_VARS) and int(env.get("SLURM_NTASKS", "1")) > 1:
            method = "slurm"
        elif len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
            method = "tpu"
        else:
            method = "single"
    if method == "explicit":
        return _explicit(env)
    if method == "slurm":
        missing = [v for v in SLURM_VARS if v not in env]
        if missing:
            raise ConfigError(f"READMEJAX_LAUNCH=slurm but {', '.join(missing)} not set: run inside `srun`")
        return LaunchSpec("slurm", {"cluster_detection_method": "slurm"})
    if method == "tpu":
        return LaunchSpec("tpu", {})
    return LaunchSpec("single", {})


def initialize_from_env(env: Mapping[str, str] | None = None) -> dict:
    """Join the distributed job described by the environment; returns a summary dict.

    Must run before any other JAX call. With ``single`` nothing is started.
    """
    spec = detect_launch(env)
    if spec.method != "single":
        jax.distributed.initialize(**spec.kwargs)
    return {"method": spec.method, "process_id": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "global_devices": jax.device_count(),
            "platform": jax.default_backend()}

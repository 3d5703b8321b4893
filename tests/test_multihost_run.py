"""`readme-jax run` as a 2-process JAX job on one machine (explicit launch, CPU): process 0 runs the
stages and writes, process 1 waits and writes nothing; the results equal a 1-process run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from readme_jax.checkpoints.orbax_io import restore_params

STAGES = "stages=[dense_eval,refactor,train]"
# Process 1 runs the CLI under an audit hook that records every write-like call under the output
# folder (Python-level file opens for writing, mkdir, rename, replace, remove, rmtree).
AUDITED = r"""
import json, os, sys
OUT = os.path.abspath(os.environ["AUDIT_OUT"]); LOG = os.environ["AUDIT_LOG"]; seen = []
WRITE_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "os.symlink",
                "os.truncate", "os.link"}
def under(p):
    try:
        return os.path.abspath(os.fsdecode(p)).startswith(OUT)
    except TypeError:
        return False
def hook(event, args):
    if event == "open" and under(args[0]):
        mode, flags = args[1], args[2]
        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & writes):
            seen.append([event, os.fsdecode(args[0])])
    elif event in WRITE_EVENTS and args and under(args[0]):
        seen.append([event, os.fsdecode(args[0])])
sys.addaudithook(hook)
from readme_jax.cli import main
rc = main(sys.argv[1:])
with open(LOG, "w") as f:
    json.dump(seen, f)
sys.exit(rc)  # a normal exit: jax.distributed's shutdown barrier needs every process
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_args(out, cache_dir, *extra):
    return ["run", "--config", "tiny_test", "--no-progress", f"output_dir={out}", f"data.cache_dir={cache_dir}",
            STAGES, *extra]


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("READMEJAX_", "SLURM_", "TPU_"))}
    env["JAX_PLATFORMS"] = "cpu"
    env.update(kw)
    return env


def _two_process_run(out, cache_dir, tmp_path, *extra):
    port, audit = _free_port(), tmp_path / "proc1_writes.json"
    base = dict(READMEJAX_LAUNCH="explicit", READMEJAX_COORDINATOR=f"127.0.0.1:{port}", READMEJAX_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, "-m", "readme_jax.cli", *_cli_args(out, cache_dir, *extra)],
                              env=_env(**base, READMEJAX_PROCESS_ID="0"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True),
             subprocess.Popen([sys.executable, "-c", AUDITED, *_cli_args(out, cache_dir, *extra)],
                              env=_env(**base, READMEJAX_PROCESS_ID="1", AUDIT_OUT=str(out), AUDIT_LOG=str(audit)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=900)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], logs, (json.loads(audit.read_text()) if audit.is_file() else None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    single = tmp_path_factory.mktemp("single")
    r = subprocess.run([sys.executable, "-m", "readme_jax.cli", *_cli_args(single, cache_dir)], env=_env(),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tmp = tmp_path_factory.mktemp("multi")
    multi = tmp / "out"
    rcs, logs, writes = _two_process_run(multi, cache_dir, tmp)
    assert rcs == [0, 0], "\n----\n".join(log[-3000:] for log in logs)
    return single, multi, logs, writes


def _orbax_arrays(root: Path) -> dict:
    got = {}
    for params in sorted(root.rglob("params")):
        arrays, _ = restore_params(params.parent)
        for k, v in _flat(arrays):
            got[f"{params.parent.relative_to(root)}/{k}"] = np.asarray(v)
    return got


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}{k}/")
    else:
        yield prefix.rstrip("/"), tree


def test_two_processes_equal_one(runs):
    single, multi, logs, _ = runs
    a = json.loads((single / "dense_eval" / "dense_eval.json").read_text())
    b = json.loads((multi / "dense_eval" / "dense_eval.json").read_text())
    assert a == b  # the NLLs, perplexities and completion, exactly
    with np.load(single / "refactor" / "experts.npz") as za, np.load(multi / "refactor" / "experts.npz") as zb:
        assert za.files == zb.files
        for k in za.files:
            np.testing.assert_array_equal(za[k], zb[k])
    ta, tb = _orbax_arrays(single / "train" / "final"), _orbax_arrays(multi / "train" / "final")
    assert ta.keys() == tb.keys() and any(k.startswith("router") for k in ta) and any("backbone" in k for k in ta)
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], rtol=0, atol=1e-6, err_msg=k)
    for stage in ("dense_eval", "refactor", "train"):
        assert (multi / stage / "done.json").is_file()


def test_process_one_writes_nothing_and_says_so(runs):
    _, multi, logs, writes = runs
    assert writes == [], writes[:10]
    assert "process 1 of 2: process 0 runs the stages" in logs[1]
    assert "== dense_eval" in logs[0] and "== dense_eval" not in logs[1]
    assert json.loads((multi / ".lock").read_text())["command"]  # the lock was taken, by process 0


def test_multiprocess_refuses_train_on_a_mesh(tmp_path, cache_dir):
    rcs, logs, _ = _two_process_run(tmp_path / "out", cache_dir, tmp_path, "mesh.expert=2")
    assert rcs == [2, 2], logs
    for log in logs:
        assert "stage 'train' with a mesh: section is not supported under a multi-process launch" in log
    assert not (tmp_path / "out").exists()


def test_process_zero_failure_reaches_the_others(tmp_path, cache_dir):
    blocker = tmp_path / "file"  # output_dir under a plain file: process 0's prepare fails
    blocker.write_text("x")
    rcs, logs, writes = _two_process_run(blocker / "out", cache_dir, tmp_path)
    assert rcs == [2, 2], logs
    assert "is not writable" in logs[0]
    assert "process 0 failed 'run' (ConfigError: output_dir" in logs[1] and "is not writable" in logs[1]
    assert writes == []

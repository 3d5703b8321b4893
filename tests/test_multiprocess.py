"""Multi-process JAX: environment detection, the local launcher, and a 2-process training step.

``launch/local_multiprocess.sh`` starts 2 processes x 4 CPU devices that join one job through
``jax.distributed.initialize`` on 127.0.0.1 (gloo CPU collectives, the jax 0.10 default), run one
expert-parallel step of ``readme_jax.train.sharded_demo`` on a (data=2, expert=4) mesh spanning
both processes and save a sharded checkpoint. This process (1 device) recomputes the step
unsharded and reads the checkpoint back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from readme_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "local_multiprocess.sh"
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


# --------------------------------------------------------------------------- detection (no processes)


def test_detect_launch_from_environment():
    from readme_jax.distributed.multihost import detect_launch

    explicit = {"READMEJAX_COORDINATOR": "10.0.0.1:1234", "READMEJAX_NUM_PROCESSES": "4",
                "READMEJAX_PROCESS_ID": "3", "READMEJAX_LOCAL_DEVICE_IDS": "0,1"}
    spec = detect_launch(explicit)
    assert spec.method == "explicit"
    assert spec.kwargs == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
                           "local_device_ids": [0, 1]}
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16", "SLURM_PROCID": "5",
             "SLURM_LOCALID": "5"}
    assert detect_launch(slurm).method == "slurm"
    assert detect_launch(slurm).kwargs == {"cluster_detection_method": "slurm"}
    assert detect_launch({**slurm, "SLURM_NTASKS": "1"}).method == "single"  # a one-task allocation
    assert detect_launch({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}).method == "tpu"
    assert detect_launch({"TPU_WORKER_HOSTNAMES": "t0"}).method == "single"
    assert detect_launch({}).method == "single"
    assert detect_launch({**slurm, **explicit}).method == "explicit"  # an explicit coordinator wins
    assert detect_launch({"READMEJAX_LAUNCH": "tpu"}).method == "tpu"


@pytest.mark.parametrize("env,match", [
    ({"READMEJAX_COORDINATOR": "hostonly", "READMEJAX_NUM_PROCESSES": "2", "READMEJAX_PROCESS_ID": "0"},
     "READMEJAX_COORDINATOR must be host:port"),
    ({"READMEJAX_COORDINATOR": "h:1", "READMEJAX_PROCESS_ID": "0"}, "READMEJAX_NUM_PROCESSES is not set"),
    ({"READMEJAX_COORDINATOR": "h:1", "READMEJAX_NUM_PROCESSES": "two", "READMEJAX_PROCESS_ID": "0"},
     "READMEJAX_NUM_PROCESSES must be an integer, got 'two'"),
    ({"READMEJAX_COORDINATOR": "h:1", "READMEJAX_NUM_PROCESSES": "2", "READMEJAX_PROCESS_ID": "2"},
     r"READMEJAX_PROCESS_ID must be in \[0, READMEJAX_NUM_PROCESSES=2\), got 2"),
    ({"READMEJAX_COORDINATOR": "h:1", "READMEJAX_NUM_PROCESSES": "2", "READMEJAX_PROCESS_ID": "0",
      "READMEJAX_LOCAL_DEVICE_IDS": "0;1"}, "comma-separated integers"),
    ({"READMEJAX_LAUNCH": "slurm", "SLURM_JOB_ID": "1"}, "SLURM_STEP_NODELIST, SLURM_NTASKS"),
    ({"READMEJAX_LAUNCH": "mpi"}, "READMEJAX_LAUNCH must be one of"),
])
def test_detect_launch_errors(env, match):
    from readme_jax.distributed.multihost import detect_launch

    with pytest.raises(ConfigError, match=match):
        detect_launch(env)


# --------------------------------------------------------------------------- the launcher


def _launch(args, *cmd, timeout=300, extra_env=None):
    env = dict(os.environ, PYTHON=sys.executable, XLA_FLAGS=FAST_COMPILE, **(extra_env or {}))
    return subprocess.run(["bash", str(LAUNCHER), *args, "--", *cmd], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_launcher_sets_env_and_stops_the_others_when_one_fails(tmp_path):
    probe = ("import os, sys, time, json; i = int(os.environ['READMEJAX_PROCESS_ID']); D = sys.argv[1]; "
             "env = {k: v for k, v in os.environ.items() if k.startswith(('READMEJAX_', 'XLA_FLAGS', 'JAX_PLATFORMS'))}; "
             "open(os.path.join(D, 'p%d.json' % i), 'w').write(json.dumps(env)); "
             "[time.sleep(0.05) for _ in range(400) if sum(f.endswith('.json') for f in os.listdir(D)) < 3]; "
             "sys.exit(3) if i == 1 else time.sleep(120)")
    t0 = time.time()
    r = _launch(["-n", "3", "-d", "2", "-p", "23456", "-l", str(tmp_path / "logs")], sys.executable, "-c", probe,
                str(tmp_path))
    assert r.returncode == 3, r.stderr
    assert time.time() - t0 < 60  # process 0 and 2 (sleeping 120 s) were stopped
    assert "process 1 exited with status 3; stopping the others" in r.stderr
    for i in range(3):
        env = json.loads((tmp_path / f"p{i}.json").read_text())
        assert env["READMEJAX_PROCESS_ID"] == str(i) and env["READMEJAX_NUM_PROCESSES"] == "3"
        assert env["READMEJAX_COORDINATOR"] == "127.0.0.1:23456" and env["READMEJAX_LAUNCH"] == "explicit"
        assert env["JAX_PLATFORMS"] == "cpu" and "--xla_force_host_platform_device_count=2" in env["XLA_FLAGS"]


def test_launcher_rejects_bad_options():
    r = _launch(["-n", "0"], "true")
    assert r.returncode == 2 and "-n and -d must be positive integers" in r.stderr


# --------------------------------------------------------------------------- 2 processes, one step


def _flat(tree) -> dict:
    import jax

    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_two_process_training_step_equals_single_process(tmp_path):
    out = tmp_path / "run"
    r = _launch(["-n", "2", "-d", "4", "-l", str(tmp_path / "logs"), "-t", "400"], sys.executable, "-m",
                "readme_jax.train.sharded_demo", "--out", str(out), "--expert", "4", "--ckpt", "--process-local-data",
                timeout=450)
    if r.returncode != 0 and "gloo" in (r.stdout + r.stderr).lower() and "unimplemented" in (r.stdout + r.stderr).lower():
        pytest.skip(f"CPU multi-process collectives unavailable in this jax: {r.stderr[-500:]}")
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    res = json.loads((out / "result.json").read_text())
    assert res["method"] == "explicit" and res["process_count"] == 2 and res["global_devices"] == 8
    assert res["local_devices"] == 4 and res["mesh"] == {"data": 2, "expert": 4, "model": 1}
    # every one of the 8 devices, in both processes, holds 2 of the 8 (6 real + 2 dummy) experts
    assert len(res["wg_shards"]) == 8 and all(s == [2, 2, 32, 16] for s in res["wg_shards"].values())
    got = dict(np.load(out / "result.npz"))

    import jax

    from readme_jax.config import MeshConfig
    from readme_jax.distributed import checkpoint as ckpt
    from readme_jax.train.sharded_demo import DEMO_LR, demo_optimizer, demo_problem
    from readme_jax.distributed.mesh import gather_tree, make_mesh, unpad_experts
    from readme_jax.model.moe import routed_ffn
    from readme_jax.train import steps

    prob = demo_problem()  # the demo's defaults: seed 0, 6 experts, batch 8, 16 tokens
    tx = demo_optimizer()
    tr, fr = steps.split_params(prob["backbone"], steps.FROZEN_TOP_KEYS_NO_EMBED)
    step = steps.make_lm_step(prob["cfg"], routed_ffn("xla"),
                              steps.router_route_fn(prob["model"]), tx)
    new_tr, _, m = step(tr, fr, tx.init(tr), prob["router"], prob["blocks"], DEMO_LR)
    assert abs(res["losses"][0] - float(m["loss"])) / float(m["loss"]) < 1e-5
    want = _flat(steps.merge_params(new_tr, fr))
    assert set(got) == set(want)
    for k in want:
        rel = np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k])
        assert rel < 1e-5, (k, rel)
    assert np.abs(got["layers/wg"] - prob["backbone"]["layers"]["wg"]).max() > 0  # the step did change experts

    # the checkpoint the two processes wrote, read back here on one device
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    tree, meta = ckpt.restore_sharded(out / "ckpt", mesh)
    back = _flat(unpad_experts(gather_tree(tree), ckpt.logical_experts(meta)))
    assert meta["kind"] == "readme_backbone" and ckpt.logical_experts(meta) == 6
    for k in got:
        np.testing.assert_array_equal(back[k], got[k])


# --------------------------------------------------------------------------- cluster scripts, with stand-ins

PROBE = """
import json, sys
from readme_jax.distributed import initialize_from_env
info = initialize_from_env()
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from readme_jax.config import MeshConfig
from readme_jax.distributed import make_mesh
mesh = make_mesh(MeshConfig(expert=jax.device_count()))
full = np.arange(jax.device_count() * 3, dtype=np.float32)
a = jax.make_array_from_callback(full.shape, NamedSharding(mesh, P("expert")), lambda i: full[i])
info["sum"] = float(jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(a))
if info["process_id"] == 0:
    open(sys.argv[1], "w").write(json.dumps(info))
"""

FAKE_SRUN = """#!/usr/bin/env bash
# stand-in for srun: start 2 tasks of "$@" on this machine with the variables a SLURM step sets
while [[ "$1" == --* ]]; do echo "srun option $1" >> "$SRUN_LOG"; shift; done
pids=()
for i in 0 1; do
  SLURM_JOB_ID=$FAKE_JOB SLURM_STEP_NODELIST=localhost SLURM_NTASKS=2 SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""


def test_slurm_script_joins_tasks_through_jax_slurm_detection(tmp_path):
    (tmp_path / "srun").write_text(FAKE_SRUN)
    (tmp_path / "srun").chmod(0o755)
    (tmp_path / "probe.py").write_text(PROBE)
    env = dict(os.environ, SRUN=str(tmp_path / "srun"), SRUN_LOG=str(tmp_path / "srun.log"),
               FAKE_JOB=str(np.random.default_rng().integers(1, 1 << 20)), SLURM_SUBMIT_DIR=str(ROOT),
               JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}")
    r = subprocess.run(["bash", str(ROOT / "launch" / "slurm_train.sbatch"), sys.executable, str(tmp_path / "probe.py"),
                        str(tmp_path / "out.json")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "out.json").read_text())
    assert info["method"] == "slurm" and info["process_count"] == 2 and info["global_devices"] == 8
    assert info["sum"] == float(np.arange(24).sum())  # a reduction across both processes
    assert "srun option --gpu-bind=none" in (tmp_path / "srun.log").read_text()


def test_tpu_pod_script_runs_the_command_on_every_worker(tmp_path):
    fake = tmp_path / "gcloud"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$GCLOUD_LOG"\n')
    fake.chmod(0o755)
    env = dict(os.environ, GCLOUD=str(fake), GCLOUD_LOG=str(tmp_path / "args"), TPU_NAME="pod1", ZONE="z1",
               PROJECT="p1")
    r = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), "run", "python", "-m", "x.y", "--out", "a b"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:9] == ["compute", "tpus", "tpu-vm", "ssh", "pod1", "--zone", "z1", "--project", "p1"]
    assert "--worker=all" in args
    assert args[-1] == ("cd readme-jax && . .venv/bin/activate && bash launch/python_check.sh python3 >/dev/null && "
                        r"READMEJAX_LAUNCH=tpu python -m x.y --out a\ b ")
    r = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), "main", "--config", "tiny_test", "train.rounds=1"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "args").read_text().splitlines()[-1].endswith(
        "&& READMEJAX_LAUNCH=tpu python3 -m readme_jax.cli run --no-progress --config tiny_test train.rounds=1 ")
    r = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), "setup"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    setup = (tmp_path / "args").read_text().splitlines()[-1]
    assert "PY=$(bash launch/python_check.sh '') && $PY -m venv .venv" in setup and ".[tpu]" in setup
    r = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), "deploy"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "unknown action 'deploy'" in r.stderr
    r = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh")], env={**env, "TPU_NAME": ""},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "set TPU_NAME" in r.stderr


def test_python_check_finds_311_or_says_how_to_get_it(tmp_path):
    check = ROOT / "launch" / "python_check.sh"
    r = subprocess.run(["bash", str(check), sys.executable], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == subprocess.run(
        ["bash", "-c", f"command -v {sys.executable}"], capture_output=True, text=True).stdout.strip()
    old = tmp_path / "python3"  # a stock TPU VM's python3: 3.10
    old.write_text('#!/usr/bin/env bash\nif [[ "$2" == *print* ]]; then echo 3.10; else exit 1; fi\n')
    old.chmod(0o755)
    r = subprocess.run(["bash", str(check), str(old)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert f"needs Python >= 3.11; found: {old} (3.10)" in r.stderr
    assert "uv python install 3.11" in r.stderr and "deadsnakes" in r.stderr


def test_slurm_script_runs_the_main_job(tmp_path):
    """`sbatch launch/slurm_train.sbatch main ...` with a stand-in srun: 2 tasks join through SLURM
    detection, process 0 runs the stage, both exit 0."""
    (tmp_path / "srun").write_text(FAKE_SRUN)
    (tmp_path / "srun").chmod(0o755)
    env = dict(os.environ, SRUN=str(tmp_path / "srun"), SRUN_LOG=str(tmp_path / "srun.log"), PYTHON=sys.executable,
               FAKE_JOB=str(np.random.default_rng().integers(1, 1 << 20)), SLURM_SUBMIT_DIR=str(ROOT),
               JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}")
    env.pop("VENV", None)
    out = tmp_path / "run"
    r = subprocess.run(["bash", str(ROOT / "launch" / "slurm_train.sbatch"), "main", "--config", "tiny_test",
                        f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", "stages=[dense_eval]"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"{sys.executable} -m readme_jax.cli run --no-progress --config tiny_test" in r.stdout
    for i in (0, 1):
        assert f"readme-jax: process {i} of 2 (slurm launch" in r.stderr
    assert r.stdout.count("== dense_eval") == 2, r.stdout  # "== dense_eval" and "== dense_eval: N s", process 0 only
    assert r.stdout.count(": process 0 runs the stages") == 2 and (out / "dense_eval" / "done.json").is_file()

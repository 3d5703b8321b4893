"""Runs you can trust: stage fingerprints (no silent reuse), strict and complete artifacts, the
output-folder lock, links that leave the folder, one-line errors and Ctrl-C (docs/RELIABILITY.md)."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from readme_jax import cli
from readme_jax.config import ConvertConfig
from readme_jax.errors import ConfigError, NumericsError
from readme_jax.fsutil import DirLock, atomic_dir, escaping_links
from readme_jax.workflow import run as run_mod
from readme_jax.workflow import stages
from readme_jax.workflow.workspace import Workspace

from conftest import tiny_run_config

ROOT = Path(__file__).resolve().parents[1]
FEW = ["dense_eval", "refactor", "train", "baseline"]


def _cfg(out, cache_dir, *extra):
    return tiny_run_config(out, cache_dir, *extra)


def _stages(names):
    return "stages=[" + ",".join(names) + "]"


@pytest.fixture(scope="module")
def tiny_run(finished_run):
    return finished_run[0]


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out, symlinks=True)
    return out


def _run(out, cache_dir, names, *extra, recompute=False):
    log = []
    run_mod.run(_cfg(out, cache_dir, _stages(names), *extra), progress=False, log=log.append, recompute=recompute)
    return log


# ------------------------------------------------------------------ fingerprints


def test_every_stage_has_dependencies_and_a_function():
    assert set(stages.STAGE_ORDER) == set(run_mod.STAGE_FNS)

    def reads(stage, key):
        return any(key == k or key.startswith(k + ".") for k in stages.stage_keys(stage))

    assert reads("train", "convert.r") and reads("train", "convert.layout") and reads("train", "router.width")
    assert reads("baseline", "convert.r") and not reads("baseline", "convert.layout")  # pruned ignores layout
    assert not reads("final_eval", "serve.n_slots") and reads("serve_bench", "serve.n_slots")
    assert not reads("train", "eval.blocks_per_domain") and reads("final_eval", "eval.blocks_per_domain")
    assert not reads("train", "eval.sampling") and reads("final_eval", "eval.sampling")
    # the pruned twin is cut from the calibration statistics: every calibration setting reaches the baseline
    calib = [f"convert.{f.name}" for f in dataclasses.fields(ConvertConfig) if f.name not in ("layout", "shared_fraction")]
    assert all(reads("baseline", k) for k in calib) and not reads("baseline", "convert.shared_fraction")
    assert stages.downstream("refactor") == ("refactor_eval", "train", "baseline", "final_eval", "chat_eval",
                                             "serve_bench", "report")
    assert {"refactor", "train", "chat_eval"} <= set(stages.downstream("chat_data"))  # the chat domain is an expert


def test_changed_settings_are_refused_naming_the_keys(run_copy, cache_dir):
    before = (run_copy / "config.json").read_bytes()
    with pytest.raises(ConfigError, match=r"convert\.r: 0\.5 -> 0\.25.*--recompute") as e:
        _run(run_copy, cache_dir, ["dense_eval"], "convert.r=0.25")
    for stage in ("refactor", "train", "baseline"):
        assert stage in str(e.value)
    assert "dense_eval (" not in str(e.value)  # dense_eval does not read convert.*
    assert (run_copy / "config.json").read_bytes() == before  # never rewritten to what did not run
    # the same settings: everything reused
    log = _run(run_copy, cache_dir, FEW)
    assert all(any(line.startswith(f"== {s}: done already") for line in log) for s in FEW), log


def test_recompute_redoes_stale_stages_and_records_new_settings(run_copy, cache_dir):
    log = _run(run_copy, cache_dir, ["refactor"], "convert.r=0.25", recompute=True)
    assert any(line.startswith("recomputing train: convert.r: 0.5 -> 0.25") for line in log), log
    assert not (run_copy / "train" / "done.json").exists()  # stale downstream: invalidated, not reused
    assert (run_copy / "dense_eval" / "done.json").exists()  # unaffected: kept
    info = json.loads((run_copy / "refactor" / "done.json").read_text())
    assert info["settings"]["convert.r"] == 0.25
    assert json.loads((run_copy / "config.json").read_text())["convert"]["r"] == 0.25


def test_folder_from_an_older_version_is_refused(run_copy, cache_dir):
    p = run_copy / "baseline" / "done.json"
    info = json.loads(p.read_text())
    del info["fingerprint"], info["settings"]
    p.write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="baseline .no fingerprint"):
        _run(run_copy, cache_dir, ["dense_eval"])


# ------------------------------------------------------------------ artifacts


def test_damaged_stages_are_recomputed_not_trusted(run_copy, cache_dir):
    """A truncated, NaN-holding or empty done.json, or outputs missing under a valid one: the stage
    counts as not done and is recomputed (reason logged), never trusted or a traceback."""
    damaged = {"final_eval": "empty", "baseline": "missing", "dense_eval": "truncated", "refactor": "corrupt_npz",
               "refactor_eval": "nan"}  # listed out of order: run() runs them in dependency order
    for stage, how in damaged.items():
        p = run_copy / stage / "done.json"
        if how == "truncated":
            p.write_text(p.read_text()[:40])
        elif how == "nan":
            p.write_text(p.read_text().replace('"ppl":', '"bad": NaN, "ppl":', 1))
        elif how == "empty":
            p.write_text("")
        elif how == "corrupt_npz":
            (run_copy / stage / "experts.npz").write_bytes(b"PK\x03\x04 garbage")
        else:
            shutil.rmtree(run_copy / stage / "pruned_tuned" / "params")
    log = _run(run_copy, cache_dir, list(damaged))
    for stage in damaged:
        assert any(f"{stage}/done.json" in line and "recomputed" in line for line in log), (stage, log)
        assert f"== {stage}" in log
        assert json.loads((run_copy / stage / "done.json").read_text())["fingerprint"]
    ran = [line[3:] for line in log if line.startswith("== ") and not line.endswith((" s", "skipped"))]
    assert ran == ["dense_eval", "refactor", "refactor_eval", "baseline", "final_eval"], ran  # chat_data: reused
    assert "pruned_dense_tuned" in json.loads((run_copy / "final_eval" / "done.json").read_text())["ppl"]


def test_nan_results_are_refused_and_the_stage_is_not_marked_done(tmp_path, cache_dir):
    ws = Workspace(_cfg(tmp_path / "o", cache_dir)).prepare()
    try:
        ws.stage_dir("dense_eval")
        with pytest.raises(NumericsError, match=r"ppl\.code"):
            ws.mark_done("dense_eval", {"ppl": {"code": float("nan"), "pydoc": 3.0}}, 1.0)
        assert not ws.is_done("dense_eval")
        ws.mark_done("dense_eval", {"ppl": {"code": np.float32(2.0)}}, 1.0)
        assert ws.is_done("dense_eval") and ws.done_info("dense_eval")["ppl"]["code"] == 2.0
    finally:
        ws.release()


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OSError):
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise OSError(28, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    with pytest.raises(ConfigError, match="already exists"):
        with atomic_dir(target):
            pass


# ------------------------------------------------------------------ lock and links


def test_second_run_on_a_locked_folder_is_refused(run_copy, cache_dir):
    with DirLock(run_copy):
        with pytest.raises(ConfigError, match=r"in use by another readme-jax run \(pid \d+"):
            _run(run_copy, cache_dir, ["dense_eval"])
    _run(run_copy, cache_dir, ["dense_eval"])  # released: runs


def test_lock_held_by_another_process(run_copy, cache_dir):
    code = (f"import time; from readme_jax.fsutil import DirLock; l = DirLock({str(run_copy)!r}).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"pid {p.pid}"):
            _run(run_copy, cache_dir, ["dense_eval"])
    finally:
        p.kill()
        p.wait()
    _run(run_copy, cache_dir, ["dense_eval"])  # the OS dropped the dead holder's lock


@pytest.mark.parametrize("what", ["config.json", "stage_dir", "nested"])
def test_links_leaving_the_folder_are_refused(run_copy, cache_dir, tmp_path, what):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    if what == "config.json":
        (run_copy / "config.json").unlink()
        (run_copy / "config.json").symlink_to(outside / "keep.txt")
    elif what == "stage_dir":
        shutil.copytree(run_copy / "baseline", outside / "baseline")
        shutil.rmtree(run_copy / "baseline")
        (run_copy / "baseline").symlink_to(outside / "baseline")
    else:
        (run_copy / "refactor" / "moe" / "evil").symlink_to(outside)
    with pytest.raises(ConfigError, match="symbolic link .* outside"):
        _run(run_copy, cache_dir, ["baseline"], "train.experts.lr=0.002", recompute=True)
    assert (outside / "keep.txt").read_text() == "mine"
    if what == "stage_dir":
        assert (outside / "baseline" / "pruned_tuned" / "params").is_dir()


def test_escaping_links_lists_only_links_that_leave(tmp_path):
    root = tmp_path / "r"
    (root / "a").mkdir(parents=True)
    (root / "inside").symlink_to(root / "a")
    (root / "a" / "out").symlink_to(tmp_path)
    (root / "dangling").symlink_to(root / "nope")
    got = sorted(p.name for p, _ in escaping_links(root))
    assert got == ["dangling", "out"]


# ------------------------------------------------------------------ errors and Ctrl-C


def test_errors_are_one_line_and_debug_shows_the_traceback(run_copy, cache_dir, tmp_path, capsys):
    argv = ["eval-dense", "--config", "tiny_test", "--no-progress", f"output_dir={run_copy}",
            f"data.cache_dir={cache_dir}", "--json", str(tmp_path)]  # --json names a folder
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("readme-jax: error: Is a directory") and "\n" not in err and "Traceback" not in err
    assert cli.main(argv + ["--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert cli.main(["run", "--config", "tiny_test", "--force", "nope", f"output_dir={run_copy}"]) == 2
    assert "--force: unknown stage(s) ['nope']" in capsys.readouterr().err


def test_ctrl_c_exits_130_with_a_resume_hint(tmp_path, cache_dir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "readme_jax.cli", "run", "--config", "tiny_test", "--no-progress",
           f"output_dir={tmp_path / 'o'}", f"data.cache_dir={cache_dir}", _stages(["dense_eval", "refactor"])]
    # a child of a non-interactive shell's background job starts with SIGINT ignored: restore the default
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    deadline = time.time() + 240
    for line in p.stdout:  # interrupt once a stage is running
        seen.append(line)
        if line.startswith("== ") or time.time() > deadline:
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, seen, err[-2000:])
    assert err.strip().splitlines()[-1] == "readme-jax: interrupted; rerunning the same command resumes"
    assert "Traceback" not in err


def test_lengths_beyond_the_models_context_are_refused(run_copy, cache_dir):
    with pytest.raises(ConfigError, match=r"eval\.seq_len=4096 exceeds the model's context of 512 tokens"):
        _run(run_copy, cache_dir, ["dense_eval"], "eval.seq_len=4096", recompute=True)


def test_kill_9_mid_training_then_rerun_gives_the_same_model(tiny_run, tmp_path, cache_dir):
    """SIGKILL during the train stage (step checkpoints on), rerun: train/final equals the
    uninterrupted run's bit for bit."""
    from readme_jax.checkpoints import restore_params

    out = tmp_path / "k"
    shutil.copytree(tiny_run, out, symlinks=True)
    for stage in ("train", "baseline"):
        shutil.rmtree(out / stage)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "readme_jax.cli", "run", "--config", "tiny_test", "--no-progress",
           f"output_dir={out}", f"data.cache_dir={cache_dir}", _stages(FEW), "train.checkpoint_every=1"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in p.stdout:  # kill once a step checkpoint inside a stage exists
        if (out / "train" / "ckpt_mid" / "meta.json").exists() or line.startswith("== baseline"):
            break
    p.kill()
    p.wait()
    assert not (out / "train" / "done.json").exists()
    _run(out, cache_dir, FEW, "train.checkpoint_every=1")
    for part in ("backbone", "router"):
        a, _ = restore_params(tiny_run / "train" / "final" / part)
        b, _ = restore_params(out / "train" / "final" / part)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_unfinished_stage_from_other_settings_is_not_resumed(run_copy, cache_dir):
    """A stage killed mid-way leaves resume state (training checkpoints): a rerun with other settings
    must not continue from it."""
    (run_copy / "train" / "done.json").unlink()  # as if killed during training
    assert (run_copy / "train" / "ckpt").is_dir() and (run_copy / "train" / "started.json").is_file()
    with pytest.raises(ConfigError, match=r"train \(unfinished, train\.router\.lr: 0\.001 -> 0\.002"):
        _run(run_copy, cache_dir, ["train"], "train.router.lr=0.002")
    log = _run(run_copy, cache_dir, ["train"], "train.router.lr=0.002", recompute=True)
    assert not any(line.startswith("resuming") for line in log), log  # started from scratch
    assert (run_copy / "train" / "done.json").is_file()


def _artifacts(out) -> dict:
    """Every array of the run's checkpoints and every number its stages recorded (timings excluded)."""
    from readme_jax.checkpoints import restore_params

    got = {}
    for ck in ("refactor/moe", "refactor/pruned", "train/final/backbone", "train/final/router",
               "baseline/pruned_tuned"):
        arrays, _ = restore_params(out / ck)
        for i, leaf in enumerate(jax.tree.leaves(arrays)):
            got[f"{ck}:{i}"] = np.asarray(leaf)
    for stage in ("dense_eval", "refactor_eval", "final_eval"):
        info = json.loads((out / stage / "done.json").read_text())
        got[stage] = json.dumps({k: v for k, v in info.items() if k not in ("seconds", "finished")}, sort_keys=True)
    return got


@pytest.mark.slow
def test_kill_9_at_random_points_then_rerun_gives_the_same_artifacts(tiny_run, tmp_path, cache_dir):
    """SIGKILL at random moments of the tiny run (any stage, mid-stage included, step checkpoints on),
    rerun after each kill: every checkpoint array and recorded number equals the uninterrupted run's."""
    stages = ["dense_eval", "refactor", "refactor_eval", "train", "baseline", "final_eval"]
    seed = int(np.random.randint(1 << 20))
    rng = np.random.default_rng(seed)
    out = tmp_path / "k"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "readme_jax.cli", "run", "--config", "tiny_test", "--no-progress",
           f"output_dir={out}", f"data.cache_dir={cache_dir}", _stages(stages), "train.checkpoint_every=1"]
    kills = []
    for _ in range(4):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        delay = float(rng.uniform(5, 40))
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            kills.append(round(delay, 1))
    _run(out, cache_dir, stages, "train.checkpoint_every=1")
    ref, got = _artifacts(tiny_run), _artifacts(out)
    assert set(ref) == set(got)
    for k in ref:
        if isinstance(ref[k], str):
            assert got[k] == ref[k], (k, seed, kills)
        else:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{k} (seed {seed}, kills at {kills} s)")

"""The prepared device check (launch/device_check.sh) runs end to end as a CPU dry run.

The dry run (``--quick``: tiny shapes, interpret mode) goes through the shell script, with the
packages the lent GPU image lacks (grain, gguf, tensorboardX) blocked at import, as that image
would. Its numbers are not results; the test checks the report's shape and the correctness rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING_ON_DEVICE = ("grain", "gguf", "tensorboardX")

BLOCKER = f"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {MISSING_ON_DEVICE!r}:
            raise ImportError("blocked as on the device image: " + name)
sys.meta_path.insert(0, _Block())
"""


def _env(site: Path) -> dict:
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)  # loaded at interpreter start
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable,
                PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))


def test_module_imports_without_packages_the_device_lacks(tmp_path):
    code = ("import sys, readme_jax.bench.device_check; "
            f"bad = [m for m in sys.modules if m.split('.')[0] in {MISSING_ON_DEVICE!r} "
            "or m.startswith(('readme_jax.serve', 'readme_jax.checkpoints', 'readme_jax.data'))]; "
            "print('loaded:', bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path / "site"),
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_package_root_still_gives_every_public_name():
    import readme_jax  # its names load lazily; each must still resolve

    missing = [n for n in readme_jax.__all__ if getattr(readme_jax, n, None) is None]
    assert not missing and readme_jax.load.__name__ == "load_readme"
    assert readme_jax.checkpoints.load_model is readme_jax.load_model  # subpackages by attribute
    with pytest.raises(AttributeError):
        readme_jax.no_such_name


def test_blocker_blocks(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import gguf"], env=_env(tmp_path / "site"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "blocked as on the device image" in r.stderr


def test_time_budget_skips_and_records(tmp_path):
    from readme_jax.bench import device_check

    assert device_check.main(["--quick", "--budget-s", "0", "--out", str(tmp_path)]) == 1
    res = json.loads((tmp_path / "device_check.json").read_text())
    assert res["peaks"] is None and res["perf"] == [] and res["all_correct"] is False
    assert any(s.startswith("peaks") for s in res["skipped"])


def test_a_failing_task_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    from readme_jax.bench import device_check

    def boom(quick):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(device_check, "measure_peaks", boom)
    assert device_check.main(["--quick", "--out", str(tmp_path)]) == 1
    res = json.loads((tmp_path / "device_check.json").read_text())
    assert res["errors"] == [{"task": "peaks", "error": "RuntimeError: planted failure"}]
    assert res["skipped"] and "## Errors" in (tmp_path / "device_check.md").read_text()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device_check")
    out = tmp / "out"
    r = subprocess.run(["bash", str(ROOT / "launch/device_check.sh"), str(out), "--quick"],
                       env=_env(tmp / "site"), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return out, json.loads((out / "device_check.json").read_text())


def test_dry_run_report(dry_run):
    out, res = dry_run
    for key in ("device", "platform", "dry_run", "jax", "date", "peaks", "correctness", "perf",
                "sweep", "skipped", "errors", "all_correct", "wall_s", "budget_s"):
        assert key in res, key
    assert res["platform"] == "cpu" and res["dry_run"] is True and "not results" in res["note"]
    assert res["peaks"]["copy_GBps"] > 0 and res["peaks"]["matmul_TFLOPs"] > 0
    assert res["skipped"] == [] and res["errors"] == [] and res["wall_s"] < res["budget_s"]
    md = (out / "device_check.md").read_text()
    assert "NOT results" in md and "## Correctness" in md and "## Block-size sweep" in md
    assert (out / "device_check.log").stat().st_size > 0


def test_dry_run_correctness_passes(dry_run):
    _, res = dry_run
    rows = res["correctness"]
    assert res["all_correct"] is True and rows and all(r["pass"] for r in rows)
    checks = {(r["dtype"], r["check"]) for r in rows}
    assert checks == {(d, c) for d in ("bf16", "f32")
                      for c in ("fwd", "grad dx", "grad dwg", "grad dwu", "grad dwd")}
    assert all(r["dropped_tokens"] > 0 and r["empty_experts"] for r in rows)
    assert all(r["dropped_rows_zero"] for r in rows if "dropped_rows_zero" in r)


def test_dry_run_perf_and_sweep(dry_run):
    _, res = dry_run
    for dt in ("bf16", "f32"):
        for T in (8, 64):
            got = {r["method"] for r in res["perf"] if (r["dtype"], r["T"]) == (dt, T)}
            assert got == {"pallas", "ragged_dot x3", "xla"}, (dt, T, got)
    for r in res["perf"]:
        assert r["weight_sets"] >= 4 and r["ms"] > 0 and r["rel_diff_vs_xla"] < 2e-2
        assert 0 < r["frac_copy_bw"] and 0 < r["frac_matmul"] and r["x_vs_ragged"] > 0
    for T in (8, 64):
        blocks = {(r["block_sizes"]["tm"], r["block_sizes"]["bf"]) for r in res["sweep"] if r["T"] == T}
        assert len(blocks) >= 2, (T, blocks)

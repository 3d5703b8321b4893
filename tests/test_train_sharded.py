"""The Trainer's expert tuning on a (data, expert) mesh of 4 CPU devices equals one device.

XLA's device-count flag must be set before JAX starts, so the check runs in a subprocess
(``python tests/test_train_sharded.py worker OUT.json``) and the test asserts on what it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()


def _worker(out_path: str) -> None:
    import tempfile

    import jax

    sys.path.insert(0, str(HERE.parent))
    from test_train import F, SyntheticData, _setup

    from readme_jax.config import MeshConfig, StageConfig, TrainConfig
    from readme_jax.model.readme_model import ReadMEModel
    from readme_jax.train.loop import Trainer

    assert jax.device_count() == 4, jax.devices()
    cfg, backbone, router, ci = _setup(int(np.random.randint(1000)))  # E = 3: padded to 4 on the expert axis
    w0 = ReadMEModel.from_modules(router, backbone)
    tc = TrainConfig(rounds=1, router=StageConfig(steps=1, batch_size=4, lr=1e-3, seq_len=12),
                     experts=StageConfig(steps=2, batch_size=4, lr=1e-3, seq_len=12))
    results = {}
    for name, mesh in (("single", None), ("mesh", MeshConfig(data=2, expert=2))):
        with tempfile.TemporaryDirectory() as d:
            t = Trainer(tc, ci, F, SyntheticData(cfg.vocab_size), d,
                        progress=False, eval_batch_size=2, log=lambda s: None, mesh_cfg=mesh)
            after_router, _ = t._router_stage(0, w0)
            w, rows = t._expert_stage(0, after_router)
            results[name] = (w, [r["loss"] for r in rows], t._expert_pad)
    (ws, ls, _), (wm, lm, pad) = results["single"], results["mesh"]
    rel = max(float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) /
                    max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))
              for a, b in zip(jax.tree.leaves(wm.backbone_params), jax.tree.leaves(ws.backbone_params)))
    shapes_equal = all(np.shape(a) == np.shape(b) for a, b in zip(jax.tree.leaves(wm.backbone_params),
                                                                   jax.tree.leaves(ws.backbone_params)))
    Path(out_path).write_text(json.dumps({"rel": rel, "loss_single": ls, "loss_mesh": lm, "pad": pad,
                                          "shapes_equal": shapes_equal}))


def test_expert_tuning_on_a_mesh_equals_single_device(tmp_path):
    out = tmp_path / "r.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, str(HERE), "worker", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["pad"] == 2 and r["shapes_equal"]
    np.testing.assert_allclose(r["loss_mesh"], r["loss_single"], rtol=1e-5)
    assert r["rel"] < 1e-5, r


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(sys.argv[2])

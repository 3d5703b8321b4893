"""impl="pallas" inside ``jax.shard_map``: the expert-parallel FFN on 8 CPU devices (interpret
mode) against impl="xla" and a float64 numpy loop, on every mesh and exchange mode of
tests/test_sharding.py, forward and gradients; and the same shard_map program cross-lowered for
cuda and tpu (the kernels' ``out_shape`` must carry the inputs' manual-axis type there too).

Like tests/test_sharding.py, the 8-device part runs this file as a script in a subprocess with
``--xla_force_host_platform_device_count=8`` and asserts on the numbers it writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from test_expert_ffn import np_ffn, np_grads
from test_sharding import MESHES, N_DEVICES, device_worker_reports

B, T, D, E, FE = 8, 2, 8, 8, 16  # tiny: the interpreter is slow
CAPACITY = ((2, 4, 1), 1.0)  # all_to_all with a capacity (tokens past a bucket skip the FFN)
LOWER = [("psum", "gpu", "cuda"), ("all_to_all", "gpu", "cuda"), ("psum", "tpu", "tpu"),
         ("all_to_all", "tpu", "tpu")]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _worker(out_path: str) -> None:
    import re

    import jax
    import jax.numpy as jnp

    from readme_jax.config import MeshConfig
    from readme_jax.distributed.expert_parallel import expert_parallel_ffn
    from readme_jax.distributed.mesh import make_mesh

    assert jax.device_count() == N_DEVICES, jax.devices()
    seed = int(np.random.SeedSequence().entropy % (1 << 31))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    r = rng.integers(0, E, (B, T)).astype(np.int32)
    r[0, 0] = -1  # dropped in every impl
    gy = rng.standard_normal((B, T, D)).astype(np.float32)
    lp = {k: (rng.standard_normal((E,) + s) / np.sqrt(s[0])).astype(np.float32)
          for k, s in (("wg", (D, FE)), ("wu", (D, FE)), ("wd", (FE, D)))}
    want_y = np_ffn(x.reshape(-1, D), r.reshape(-1), lp["wg"], lp["wu"], lp["wd"])
    want_g = dict(zip(("x", "wg", "wu", "wd"), np_grads(x.reshape(-1, D), r.reshape(-1), lp["wg"], lp["wu"],
                                                        lp["wd"], gy.reshape(-1, D))))
    rep: dict = {"seed": seed}

    def run(mesh, impl, comm, cf=0.0):
        kw = {"interpret": True} if impl == "pallas" else {}
        ffn = expert_parallel_ffn(mesh, impl=impl, comm=comm, capacity_factor=cf, **kw)

        def loss(lp, x):
            y, dropped = ffn(lp, x, jnp.asarray(r))
            return jnp.sum(y * gy), (y, dropped)

        (_, (y, dropped)), (glp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(lp, x)
        return np.asarray(y), int(dropped), {"x": np.asarray(gx), **{k: np.asarray(v) for k, v in glp.items()}}

    for (d, e, m), comm in MESHES:
        mesh = make_mesh(MeshConfig(data=d, expert=e, model=m))
        y, dropped, g = run(mesh, "pallas", comm)
        y_x, _, g_x = run(mesh, "xla", comm)
        rep[f"{(d, e, m)}-{comm}"] = {
            "y_vs_numpy": _rel(y.reshape(-1, D), want_y), "y_vs_xla": _rel(y, y_x), "dropped": dropped,
            "grads_vs_numpy": {k: _rel(g[k].reshape(want_g[k].shape), want_g[k]) for k in want_g},
            "grads_vs_xla": {k: _rel(g[k], g_x[k]) for k in g_x},
        }

    (d, e, m), cf = CAPACITY
    mesh = make_mesh(MeshConfig(data=d, expert=e, model=m))
    y, dropped, g = run(mesh, "pallas", "all_to_all", cf)
    y_x, dropped_x, g_x = run(mesh, "xla", "all_to_all", cf)
    rep["capacity"] = {"y_vs_xla": _rel(y, y_x), "dropped": dropped, "dropped_xla": dropped_x,
                       "grads_vs_xla": {k: _rel(g[k], g_x[k]) for k in g_x}}

    # cross-lowering: Pallas->Triton and Pallas->Mosaic inside shard_map, forward and backward
    mesh = make_mesh(MeshConfig(data=2, expert=2, model=2))
    S, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
    Dl, Fl = 128, 256
    lps = {"wg": S((E, Dl, Fl), bf16), "wu": S((E, Dl, Fl), bf16), "wd": S((E, Fl, Dl), bf16)}
    for comm, backend, platform in LOWER:
        ffn = expert_parallel_ffn(mesh, impl="pallas", comm=comm, backend=backend, interpret=False)

        def lsum(lp, x, r):
            return jnp.sum(ffn(lp, x, r)[0].astype(jnp.float32))

        calls = []
        for f in (lsum, jax.grad(lsum, argnums=(0, 1))):
            text = jax.jit(f).trace(lps, S((B, 16, Dl), bf16), S((B, 16), jnp.int32)).lower(
                lowering_platforms=(platform,)).as_text()
            calls.append(sorted(set(re.findall(r"custom_call @([\w$.]+)", text))))
        rep[f"lower-{comm}-{platform}"] = calls
    Path(out_path).write_text(json.dumps(rep, indent=1))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return device_worker_reports(__file__, [None], tmp_path_factory, timeout=900)


@pytest.mark.parametrize("shape,comm", MESHES, ids=[f"{s}-{c}" for s, c in MESHES])
def test_pallas_in_shard_map_equals_xla_and_numpy(report, shape, comm):
    r = report[f"{tuple(shape)}-{comm}"]
    assert r["y_vs_numpy"] < 1e-5 and r["y_vs_xla"] < 1e-5, (report["seed"], r)
    assert max(r["grads_vs_numpy"].values()) < 1e-5, (report["seed"], r["grads_vs_numpy"])
    assert max(r["grads_vs_xla"].values()) < 1e-5, (report["seed"], r["grads_vs_xla"])
    assert len(r["grads_vs_xla"]) == 4 and r["dropped"] == 0


def test_pallas_in_shard_map_with_capacity_equals_xla(report):
    r = report["capacity"]
    assert r["dropped"] == r["dropped_xla"]
    assert r["y_vs_xla"] < 1e-5 and max(r["grads_vs_xla"].values()) < 1e-5, (report["seed"], r)


@pytest.mark.parametrize("comm,backend,platform", LOWER)
def test_shard_map_program_lowers_for_accelerators(report, comm, backend, platform):
    call = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    fwd, bwd = report[f"lower-{comm}-{platform}"]
    assert call in fwd and call in bwd


def test_gpu_kernel_interpreted_inside_shard_map_is_refused():
    """jax's default interpreter cannot run under shard_map's manual-axis check; say so clearly."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from readme_jax.errors import ShapeError
    from readme_jax.ops import expert_ffn

    mesh = jax.make_mesh((1,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
    x, e = jnp.ones((4, D)), jnp.zeros((4,), jnp.int32)
    w, wd = jnp.ones((2, D, FE)), jnp.ones((2, FE, D))
    f = jax.shard_map(lambda x, e: expert_ffn(x, e, w, w, wd, impl="pallas", kernel="gpu", interpret=True),
                      mesh=mesh, in_specs=(P("expert"), P("expert")), out_specs=P("expert"))
    with pytest.raises(ShapeError, match="GPU kernel cannot be interpreted inside jax.shard_map"):
        jax.jit(f)(x, e)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(sys.argv[2])

"""Serving on a mesh (``EngineConfig.mesh``, serve/engine/placement.py): experts sharded over 8 CPU devices.

The engine generates greedily for several requests of mixed lengths (prompts in chunks, mixed with
decodes) on meshes (data, expert, model) = (1, 4, 1) and (2, 2, 2); its tokens and routes must equal
the single-device engine's. Also checked: the expert weights are sharded over ``expert`` (each
device holds its own padded experts), the rest and the KV caches are replicated, and the compiled
steps move no weights (all-reduces only: no all-gather, all-to-all or collective-permute).
Combinations that cannot run on a mesh are refused.

Like tests/test_sharding.py, the 8-device part runs this file as a script in a subprocess with
``--xla_force_host_platform_device_count=8`` and asserts on what it writes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from test_sharding import N_DEVICES, device_worker_reports

E = 3  # not a multiple of 2 or 4: the meshes get a dummy expert
MESHES = [(1, 4, 1), (2, 2, 2)]
LENGTHS = [(3, 6), (9, 4), (14, 8), (5, 5), (1, 7)]  # (prompt, new tokens): more requests than slots
BUDGET = 8  # smaller than the longest prompt, so prompts are chunked and mixed with decodes
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def _engine_cfg():
    from readme_jax.serve.engine import EngineConfig

    return EngineConfig(n_slots=4, max_len=24, token_budget=BUDGET, min_window=24)


def _collectives(hlo: str) -> dict:
    return {c: len(re.findall(rf" {c}(-start)?\(", hlo)) for c in COLLECTIVES}


def _worker(parts: str, out_path: str) -> None:
    """``parts``: "+"-joined "single" (the one-device engine) and mesh shapes like "1,4,1"."""
    rep: dict = {}
    for part in parts.split("+"):
        rep.update(_part(part))
    Path(out_path).write_text(json.dumps(rep, indent=1))


def _part(part: str) -> dict:
    import jax

    from conftest import tiny_readme
    from readme_jax.config import MeshConfig
    from readme_jax.serve.engine import Engine, generate

    assert jax.device_count() == N_DEVICES, jax.devices()
    moe = tiny_readme(E, backbone_seed=11, router_seed=5)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, moe.backbone_cfg.vocab_size, p).tolist() for p, _ in LENGTHS]
    max_new = [n for _, n in LENGTHS]
    base = _engine_cfg()

    def spec(a):  # donated caches are gone after the call: keep shapes and shardings to lower again
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) if isinstance(a, jax.Array) else a

    class Recorded:  # the engine's step, its calls' shapes kept (a decode-only and a chunked step)
        def __init__(self, fn, store):
            self.fn, self.store = fn, store

        def __call__(self, *args, **kw):
            name = "decode" if not kw["prompts"] else "chunks"
            self.store.setdefault(name, (jax.tree.map(spec, args), kw))
            return self.fn(*args, **kw)

        def lower(self, *args, **kw):
            return self.fn.lower(*args, **kw)

    def run(cfg, hlo_of=None):
        eng = Engine(moe, cfg)
        calls: dict = {}
        if hlo_of is not None:
            eng._step = Recorded(eng._step, calls)
        out = generate(eng, prompts, max_new, token_budget=BUDGET)
        for name, (args, kw) in calls.items():
            hlo_of[name] = _collectives(eng._step.fn.lower(*args, **kw).compile().as_text())
        return out, [eng.routes(i).tolist() for i in range(len(prompts))], eng

    rep: dict = {}
    if part == "single":
        out, routes, _ = run(base)
        rep["single"] = {"tokens": out, "routes": routes}
    else:
        shape = tuple(int(x) for x in part.split(","))
        d, e, m = shape
        r = rep[str(shape)] = {"hlo": {}}
        out, routes, eng = run(dataclasses.replace(base, mesh=MeshConfig(data=d, expert=e, model=m)), r["hlo"])
        r["out"] = {"tokens": out, "routes": routes}
        wg = eng.params["layers"]["wg"]
        mesh = eng.placement.mesh
        placed = {}  # device id -> (expert range, F range) it holds, checked against the padded host value
        full = np.pad(np.asarray(moe.backbone_params["layers"]["wg"]), ((0, 0), (0, wg.shape[1] - E), (0, 0), (0, 0)))
        ok = True
        for sh in wg.addressable_shards:
            ok &= bool(np.array_equal(np.asarray(sh.data), full[sh.index]))
            placed[sh.device.id] = [sh.index[1].start or 0, sh.index[3].start or 0]
        r["wg"] = {"spec": [str(x) for x in wg.sharding.spec], "shape": list(wg.shape), "values_ok": ok,
                   "shard_shapes": sorted({tuple(sh.data.shape) for sh in wg.addressable_shards}),
                   "n_placed": len(placed), "distinct": len({tuple(v) for v in placed.values()}),
                   "mesh": dict(mesh.shape)}
        r["replicated"] = {
            "wq": eng.params["layers"]["wq"].sharding.is_fully_replicated,
            "router": all(a.sharding.is_fully_replicated for a in jax.tree.leaves(eng.rparams)),
            "cache": all(a.sharding.is_fully_replicated for a in (*eng.cache, *eng.rcache)),
            "cache_devices": len(eng.cache.k.sharding.device_set),
        }
    return rep


# =========================================================================== pytest side


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The single-device engine and both meshes in one 8-device subprocess (on the 2-core CPU, concurrent
    subprocesses took longer in wall time: compilation dominates and they compete for the cores)."""
    part = "+".join(["single"] + [",".join(map(str, s)) for s in MESHES])
    return device_worker_reports(__file__, [part], tmp_path_factory)


@pytest.mark.parametrize("shape", MESHES, ids=[str(s) for s in MESHES])
def test_engine_on_mesh_equals_single_device(report, shape):
    got, want = report[str(shape)]["out"], report["single"]
    assert [len(t) for t in want["tokens"]] == [n for _, n in LENGTHS]
    assert got["tokens"] == want["tokens"]
    assert got["routes"] == want["routes"]
    assert max(max(r) for r in got["routes"]) < E  # the dummy expert is never routed to


@pytest.mark.parametrize("shape", MESHES, ids=[str(s) for s in MESHES])
def test_expert_weights_sharded_rest_replicated(report, shape):
    d, e, m = shape
    r = report[str(shape)]
    wg = r["wg"]
    assert wg["mesh"] == {"data": d, "expert": e, "model": m}
    assert wg["spec"] == ["None", "expert", "None", "model"]
    e_pad = -(-E // e) * e
    L, D, Fe = wg["shape"][0], wg["shape"][2], wg["shape"][3]
    assert wg["shape"][1] == e_pad
    assert wg["shard_shapes"] == [[L, e_pad // e, D, Fe // m]]  # each device: its experts' columns only
    n = d * e * m  # EngineConfig.mesh with data >= 1 takes the first data x expert x model devices
    assert wg["n_placed"] == n and wg["distinct"] == e * m and wg["values_ok"]
    assert r["replicated"] == {"wq": True, "router": True, "cache": True, "cache_devices": n}


@pytest.mark.parametrize("shape", MESHES, ids=[str(s) for s in MESHES])
def test_sharded_steps_move_no_weights(report, shape):
    """Every compiled step (with prompt chunks, decode-only) communicates by all-reduces only (the FFN's psum)."""
    hlo = report[str(shape)]["hlo"]
    assert set(hlo) == {"chunks", "decode"}
    for name, counts in hlo.items():
        assert counts["all-reduce"] >= 1, (name, counts)
        assert all(counts[c] == 0 for c in COLLECTIVES if c != "all-reduce"), (name, counts)


def test_refused_on_a_mesh():
    """In this (one-device) process: what cannot run on a mesh is a ConfigError at construction."""
    from conftest import tiny_readme
    from readme_jax.config import EngineConfig, MeshConfig
    from readme_jax.errors import ConfigError
    from readme_jax.serve.engine import Engine
    from readme_jax.serve.engine.expert_store import ExpertStore

    moe = tiny_readme(E, backbone_seed=11, router_seed=5)
    cfg = dataclasses.replace(_engine_cfg(), mesh=MeshConfig(data=1, expert=1))
    with pytest.raises(ConfigError, match="expert store .* cannot be combined with engine.mesh"):
        Engine(moe, cfg, store=ExpertStore(moe, 2))
    with pytest.raises(ConfigError, match="but only 1 are visible"):
        Engine(moe, dataclasses.replace(cfg, mesh=MeshConfig(data=1, expert=N_DEVICES)))
    with pytest.raises(ConfigError, match="engine.mesh must be"):
        EngineConfig(mesh={"expert": 2})


def test_engine_takes_a_jax_mesh():
    """``EngineConfig.mesh`` may be a jax Mesh (axes data, expert, model); here one device, no call compiled."""
    import jax

    from conftest import tiny_readme
    from readme_jax.distributed.mesh import AXES, EXPERT_SPECS
    from readme_jax.serve.engine import Engine
    from readme_jax.serve.engine.placement import sharded_experts_ffn

    mesh = jax.make_mesh((1, 1, 1), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    eng = Engine(tiny_readme(E, backbone_seed=11, router_seed=5), dataclasses.replace(_engine_cfg(), mesh=mesh))
    assert eng.placement.mesh is mesh
    want = jax.sharding.NamedSharding(mesh, EXPERT_SPECS["wd"])  # one device: placed arrays may keep their own type
    assert eng.params["layers"]["wd"].sharding.is_equivalent_to(want, 4)
    assert eng.placement.ffn is sharded_experts_ffn(mesh)


def test_serve_config_mesh_section():
    from readme_jax.config import MeshConfig, ServeBenchConfig, from_dict
    from readme_jax.errors import ConfigError

    assert from_dict(ServeBenchConfig, {"mesh": {"expert": 2}}, "serve.").mesh == MeshConfig(expert=2)
    assert ServeBenchConfig().mesh is None
    with pytest.raises(ConfigError, match="serve.mesh must be"):
        ServeBenchConfig(mesh=4)


def test_cli_serve_mesh_flags(monkeypatch):
    """``readme-jax serve --mesh-expert 4 --mesh-model 2`` hands the server a MeshConfig (none by default)."""
    from readme_jax import cli
    from readme_jax.config import MeshConfig

    got = {}
    monkeypatch.setattr(cli, "serve", lambda path, **kw: got.update(kw))
    parser = cli.build_parser()
    args = parser.parse_args(["serve", "run_dir", "--mesh-expert", "4", "--mesh-model", "2"])
    args.fn(args)
    assert got["mesh"] == MeshConfig(data=1, expert=4, model=2)
    args = parser.parse_args(["serve", "run_dir"])
    args.fn(args)
    assert got["mesh"] is None


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "worker":
    _worker(sys.argv[2], sys.argv[3])

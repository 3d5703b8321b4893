"""A few expert-parallel Read-ME training steps on a tiny random model.

The smoke test the ``launch/`` scripts run on a cluster (every process builds the same model
from the seed, joins the job through :func:`initialize_from_env`, trains on the global mesh),
and what ``tests/test_multiprocess.py`` compares with a single-device step::

    python -m readme_jax.train.sharded_demo --out runs/ep_demo --expert 4 --steps 3 [--ckpt]

Process 0 writes ``result.json`` (losses, mesh, each device's expert-weight shard) and
``result.npz`` (the trained backbone, dummy experts removed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from readme_jax.config import MeshConfig, RouterConfig, StageConfig, tiny_model_config
from readme_jax.distributed.checkpoint import save_sharded
from readme_jax.distributed.mesh import gather_tree, pad_experts, shard_batch, unpad_experts
from readme_jax.distributed.multihost import initialize_from_env
from readme_jax.model.moe import MoEBackbone
from readme_jax.model.readme_model import ExpertLayout, ReadMEModel
from readme_jax.model.router import Router, router_model_config
from readme_jax.train import schedule, steps
from readme_jax.train.sharded_step import ShardedLMStep


def _random_tree(shapes: dict, rng: np.random.Generator) -> dict:
    out = {}
    for name, shape in shapes.items():
        if isinstance(shape, dict):
            out[name] = _random_tree(shape, rng)
        elif name.endswith("norm"):
            out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif name.startswith("bias"):
            out[name] = np.zeros(shape, np.float32)
        elif name == "embed":
            out[name] = rng.standard_normal(shape).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) * shape[-2] ** -0.5).astype(np.float32)
    return out


def demo_problem(seed: int = 0, n_experts: int = 6, batch: int = 8, seq_len: int = 16) -> dict:
    """Tiny random Read-ME (``model``: router + backbone as numpy) and one batch, identical on every process."""
    cfg = tiny_model_config(n_layers=2, ffn_dim=48)
    rcfg = router_model_config(RouterConfig(width=16, n_heads=2, ffn_dim=16), cfg.vocab_size, cfg.max_seq_len)
    backbone = nnx.eval_shape(lambda: MoEBackbone(cfg, rngs=nnx.Rngs(0), n_experts=n_experts, expert_dim=16))
    router = nnx.eval_shape(lambda: Router(rcfg, rngs=nnx.Rngs(0), n_experts=n_experts))
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, cfg.vocab_size, (batch, seq_len + 1)).astype(np.int32)
    bb, rp = _random_tree(backbone.param_shapes(), rng), _random_tree(router.param_shapes(), rng)
    model = ReadMEModel(rp, bb, rcfg, cfg, ExpertLayout.of(bb), router.mlp)
    return {"cfg": cfg, "model": model, "n_experts": n_experts, "backbone": bb, "router": rp, "blocks": blocks}


def demo_optimizer():
    return schedule.make_optimizer(StageConfig(steps=10, batch_size=8, lr=1e-3), weight_decay=0.01, clip_norm=1.0)


DEMO_LR = 1e-3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for result.json / result.npz / ckpt")
    ap.add_argument("--data", type=int, default=-1, help="data axis size (-1: all remaining devices)")
    ap.add_argument("--expert", type=int, default=1, help="expert axis size")
    ap.add_argument("--model", type=int, default=1, help="model axis size (splits expert columns)")
    ap.add_argument("--comm", default="psum", choices=("psum", "all_to_all"))
    ap.add_argument("--capacity-factor", type=float, default=0.0)
    ap.add_argument("--experts", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt", action="store_true", help="save the trained backbone with save_sharded")
    ap.add_argument("--process-local-data", action="store_true",
                    help="each process feeds only its own rows of the batch (as a multi-host data loader would)")
    args = ap.parse_args(argv)

    info = initialize_from_env()  # before any JAX computation (importing jax does not start a backend)
    out = Path(args.out)
    lead = jax.process_index() == 0
    mc = MeshConfig(data=args.data, expert=args.expert, model=args.model, ffn_comm=args.comm,
                    capacity_factor=args.capacity_factor)
    prob = demo_problem(args.seed, args.experts, args.batch, args.seq_len)
    step = ShardedLMStep.from_config(prob["cfg"], mc, demo_optimizer(),
                                     steps.router_route_fn(prob["model"]))
    mesh = step.mesh
    trainable, frozen = steps.split_params(pad_experts(prob["backbone"], mesh.shape["expert"]),
                                           steps.FROZEN_TOP_KEYS_NO_EMBED)
    trainable, frozen = step.shard(trainable), step.shard(frozen)
    opt_state = step.init_opt_state(trainable)
    if args.process_local_data:  # this process's devices own a contiguous block of rows (make_mesh order)
        n = len(prob["blocks"]) // jax.process_count()
        i = jax.process_index()
        blocks = shard_batch(prob["blocks"][i * n:(i + 1) * n], mesh, process_local=True)
    else:
        blocks = prob["blocks"]
    losses = []
    for i in range(args.steps):
        trainable, opt_state, m = step(trainable, frozen, opt_state, prob["router"], blocks, DEMO_LR)
        losses.append(float(m["loss"]))
        if lead:
            print(f"step {i}: loss {losses[-1]:.6f} grad_norm {float(m['grad_norm']):.6f}", flush=True)
    wg = trainable["layers"]["wg"]
    shards = {str(s.device.id): list(s.data.shape) for s in wg.addressable_shards}
    backbone = unpad_experts(steps.merge_params(trainable, frozen), prob["n_experts"])
    host = gather_tree(backbone)
    if args.ckpt:
        save_sharded(out / "ckpt", steps.merge_params(trainable, frozen), {"kind": "readme_backbone"},
                     n_experts=prob["n_experts"], overwrite=True)
    shard_lists = gather_shard_shapes(shards)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                for path, v in jax.tree_util.tree_leaves_with_path(host)}
        np.savez(out / "result.npz", **flat)
        (out / "result.json").write_text(json.dumps(
            {**info, "mesh": dict(mesh.shape), "losses": losses, "wg_shards": shard_lists,
             "wg_global": list(wg.shape)}, indent=1))
        print(f"wrote {out / 'result.json'}", flush=True)
    return 0


def gather_shard_shapes(local: dict) -> dict:
    """Every process's ``{device id: shard shape}`` merged (process 0 gets them all)."""
    if jax.process_count() == 1:
        return local
    blob = json.dumps(local).encode().ljust(4096, b" ")
    arr = np.frombuffer(blob, np.uint8)
    all_ = multihost_utils.process_allgather(arr)
    merged = {}
    for row in np.asarray(all_).reshape(jax.process_count(), -1):
        merged.update(json.loads(bytes(row).decode().strip()))
    return merged


if __name__ == "__main__":
    raise SystemExit(main())

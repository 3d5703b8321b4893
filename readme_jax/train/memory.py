"""Per-device memory of the expert-tuning step, estimated without allocating anything.

Static parts are exact shapes from the code itself, under ``eval_shape``: the MoE backbone's own init
(``MoEBackbone``), the dummy experts of ``distributed.mesh.pad_experts``, the trainable/frozen split of
``train.steps``, the optimizer of ``train.schedule.make_optimizer`` (AdamW moments and, with
``grad_accum > 1``, ``optax.MultiSteps``' gradient accumulator, all in the params' dtype) and the
placement rule of ``distributed.mesh`` on an abstract mesh. So the estimate follows the model.

Activations are a formula (an estimate, not a measurement). Per device, with ``a`` the compute
dtype's bytes, ``b`` rows per device (micro-batch / (data x expert)), ``n = b T`` tokens, ``n_f = n x
expert`` (the psum exchange gathers the data group's tokens over the expert axis; the device's experts
may get all of them), ``R`` / ``P`` the expert-specific / shared widths:

    layer  = b H T^2 (4 + a)                          attention scores (f32) and probabilities
           + n a (4 D + 2 H hd + 2 K hd) + 2 n 4 D    layer input, norms, q, k, v, attention output
           + n_f (D a + R (4 + 4 + a))                gathered tokens, gate/up (f32) and their product
           + n P (4 + 4 + a)                          the shared part
    logits = 3 n V 4                                  logits, log-softmax and their cotangent (f32)
    remat none : L layer + layer + logits             every layer's intermediates kept for the backward
    remat layer: L n D a + 2 layer + logits           layer inputs only; one layer recomputed + cotangents

Not counted: XLA's temporary buffers beyond these, the collectives' buffers, fragmentation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from readme_jax.checkpoints.hf import config_from_hf
from readme_jax.config import MeshConfig, ModelConfig, RouterConfig, RunConfig, StageConfig
from readme_jax.convert.experts import expert_width
from readme_jax.data.domains import DOMAIN_NAMES
from readme_jax.distributed.mesh import AXES, batch_shards, mesh_shape, pad_experts, param_shardings
from readme_jax.errors import ConfigError
from readme_jax.model.moe import MoEBackbone
from readme_jax.model.router import Router, router_model_config
from readme_jax.train import schedule, steps

GIB = 1024**3
# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json): what `--arch llama2-7b` stands for
LLAMA2_7B = dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
                 ffn_dim=11008, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, max_seq_len=4096)
ARCHS = {"llama2-7b": LLAMA2_7B}


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the expert-tuning step's memory depends on."""

    model: ModelConfig  # the backbone (dtype, param_dtype from the run)
    n_experts: int
    expert_dim: int  # R: expert-specific width (F_e for the fixed layout)
    shared_dim: int  # P: the split layout's shared width (0: fixed)
    stage: StageConfig  # train.experts (batch_size, grad_accum, seq_len)
    mesh: MeshConfig
    n_devices: int
    remat: str = "none"
    train_embeddings: bool = False
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    donate: bool = True  # the Trainer's sharded step donates params and optimizer state
    router: RouterConfig | None = None  # replicated on every device (None: not counted)


def model_config(cfg: RunConfig, arch: str | None = None) -> ModelConfig:
    """The backbone's architecture: a known ``arch`` (``ARCHS``), else the HF ``config.json`` at
    ``cfg.model``; dtype and param dtype are the run's (as loading does)."""
    if arch is not None:
        if arch not in ARCHS:
            raise ConfigError(f"memory: unknown --arch {arch!r}; known: {sorted(ARCHS)}")
        return ModelConfig(**ARCHS[arch], dtype=cfg.dtype, param_dtype=cfg.dtype)
    path = Path(cfg.model) / "config.json"
    if not path.is_file():
        raise ConfigError(f"memory: no Hugging Face config at {path} (model={cfg.model!r}); point model= at an "
                          f"HF directory or pass --arch (one of {sorted(ARCHS)})")
    return config_from_hf(json.loads(path.read_text()), path, cfg.dtype)


def setup_of_run(cfg: RunConfig, n_devices: int, arch: str | None = None, expert_dim: int | None = None,
                 shared_dim: int | None = None) -> Setup:
    """The expert-tuning step of a run config on ``n_devices`` (its ``mesh:``, or one device without one).

    Widths: the ``fixed`` layout stores R = F_e = round(r F) per expert and no shared part. The
    ``split`` layout's P and R come from calibration (``refactor/moe/meta.json``: ``shared_width``,
    ``specific_width``); without ``expert_dim``/``shared_dim`` they are taken as the fixed layout's.
    """
    mc = model_config(cfg, arch)
    fe = expert_width(mc.ffn_dim, cfg.convert.r)
    mesh = cfg.mesh if cfg.mesh is not None else MeshConfig(data=1, expert=1)
    return Setup(model=mc, n_experts=len(cfg.data.domains) or len(DOMAIN_NAMES),
                 expert_dim=fe if expert_dim is None else expert_dim, shared_dim=shared_dim or 0,
                 stage=cfg.train.experts, mesh=mesh, n_devices=n_devices if cfg.mesh is not None else 1,
                 remat=cfg.train.remat, train_embeddings=cfg.train.train_embeddings,
                 weight_decay=cfg.train.weight_decay, clip_norm=cfg.train.clip_norm,
                 donate=cfg.mesh is not None and n_devices > 1, router=cfg.router)


def abstract_mesh(mc: MeshConfig, n_devices: int) -> AbstractMesh:
    return AbstractMesh(mesh_shape(mc, n_devices), AXES, axis_types=(AxisType.Auto,) * 3)


def backbone_shapes(s: Setup) -> dict:
    """The backbone's params as ShapeDtypeStructs (the real init under eval_shape), experts unpadded."""
    return nnx.eval_shape(lambda: MoEBackbone(s.model, rngs=nnx.Rngs(0), n_experts=s.n_experts,
                                              expert_dim=s.expert_dim, shared_dim=s.shared_dim)).arrays()


def tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def per_device_bytes(tree, mesh: AbstractMesh) -> int:
    """Bytes one device holds of ``tree`` under the placement rule (the largest shard of each leaf)."""
    shardings = param_shardings(tree, mesh)
    return int(sum(np.prod(sh.shard_shape(x.shape), dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))))


def activation_bytes(s: Setup, rows_per_device: int) -> int:
    """The formula of the module docstring."""
    c = s.model
    a = np.dtype(c.dtype).itemsize
    b, T, D, H, K, hd = rows_per_device, s.stage.seq_len, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    n = b * T
    n_f = n * s.mesh.expert
    layer = (b * H * T * T * (4 + a) + n * a * (4 * D + 2 * H * hd + 2 * K * hd) + 2 * n * 4 * D
             + n_f * (D * a + s.expert_dim * (8 + a)) + n * s.shared_dim * (8 + a))
    logits = 3 * n * c.vocab_size * 4
    if s.remat == "layer":
        return c.n_layers * n * D * a + 2 * layer + logits
    return (c.n_layers + 1) * layer + logits


def estimate(s: Setup) -> dict:
    """Per-device bytes of the expert-tuning step: ``params`` (trainable and frozen), ``grads``,
    ``optimizer``, ``outputs`` (new params and state while the inputs live; 0 when donated),
    ``activations``, ``total``. The whole model is not on any device meanwhile: with a sharded step the
    Trainer keeps it on the host during expert tuning (``Trainer.offload``)."""
    mesh = abstract_mesh(s.mesh, s.n_devices)
    micro = s.stage.batch_size // s.stage.grad_accum
    if micro % batch_shards(mesh):
        raise ConfigError(f"train.experts: micro-batch {micro} (batch_size {s.stage.batch_size} / grad_accum "
                          f"{s.stage.grad_accum}) cannot be split over data x expert = {batch_shards(mesh)} devices")
    full = backbone_shapes(s)
    padded = jax.eval_shape(lambda p: pad_experts(p, mesh.shape["expert"]), full)
    trainable, frozen = steps.split_params(padded, steps.frozen_keys(s.train_embeddings))
    tx = schedule.make_optimizer(s.stage, s.weight_decay, s.clip_norm)
    opt = jax.eval_shape(tx.init, trainable)
    tr, opt_b = per_device_bytes(trainable, mesh), per_device_bytes(opt, mesh)
    router = 0
    if s.router is not None:
        rcfg = router_model_config(s.router, s.model.vocab_size, s.model.max_seq_len, "float32")
        router = tree_bytes(nnx.eval_shape(lambda: Router(rcfg, rngs=nnx.Rngs(0), n_experts=s.n_experts,
                                                          mlp=s.router.mlp)).arrays())
    out = {"params": tr + per_device_bytes(frozen, mesh) + router, "grads": tr, "optimizer": opt_b,
           "outputs": 0 if s.donate else tr + opt_b,
           "activations": activation_bytes(s, micro // batch_shards(mesh))}
    out["total"] = sum(out.values())
    out["n_params"] = int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(full)))
    out["mesh"] = dict(mesh.shape)
    out["padded_experts"] = int(jax.tree.leaves(padded["layers"]["wg"])[0].shape[1])
    out["rows_per_device"] = micro // batch_shards(mesh)
    return out


def format_table(est: dict, device_gib: float | None = None) -> str:
    """The table `readme-jax memory` prints (GiB per device)."""
    rows = [("params (trainable + frozen + router)", est["params"]), ("grads", est["grads"]),
            ("optimizer (AdamW moments, accumulator)", est["optimizer"]),
            ("step outputs (0: donated)", est["outputs"]), ("activations (estimate)", est["activations"]),
            ("total per device", est["total"])]
    lines = [f"mesh {est['mesh']}, {est['padded_experts']} experts (padded), {est['rows_per_device']} row(s) "
             f"per device, model {est['n_params'] / 1e9:.2f}B params",
             f"{'':40s} {'GiB':>8s}"] + [f"{name:40s} {b / GIB:8.1f}" for name, b in rows]
    if device_gib:
        fits = "fits" if est["total"] <= device_gib * GIB else "does NOT fit"
        lines.append(f"{fits} on {device_gib:g} GiB devices ({est['total'] / (device_gib * GIB):.0%}; JAX preallocates "
                     f"75% of a GPU unless XLA_PYTHON_CLIENT_MEM_FRACTION is raised)")
    return "\n".join(lines)

"""The floor of an engine step: the bytes it must read over the measured copy bandwidth, and the
FLOPs it must do over the measured matmul rate (a roofline: the larger of the two).

* ``copy_bandwidth()``: bytes moved per second (read + written, the STREAM convention) by an
  in-place scale of a 256 MiB float32 array, the median of a few runs.
* ``matmul_rate()``: FLOP/s of a 2048 x 2048 float32 matmul, the median of a few runs.
* :class:`StepCost`: the weights a step reads (every dense parameter of the backbone and the
  router, the tied embedding as the LM head, and the experts present in the step), the KV cache
  positions its rows hold, and the useful FLOPs (each token through its own expert, attention over
  its own positions, the head on the sampled rows). Counted from the model's shapes, not from the
  program: a padded or wasteful program does not raise its own floor.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.serve.engine.experts import EXPERT_KEYS


def _median_seconds(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def copy_bandwidth(n_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes read + written per second by an in-place (donated) scale of an ``n_bytes`` array."""
    box = {"x": jnp.ones((n_bytes // 4,), jnp.float32)}
    scale = jax.jit(lambda x: x * 1.0000001, donate_argnums=0)

    def run():
        box["x"] = scale(box["x"])
        box["x"].block_until_ready()

    return 2 * n_bytes / _median_seconds(run, repeats)


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n float32 matmul."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    return 2 * n**3 / _median_seconds(lambda: mm(a).block_until_ready(), repeats)


def _nbytes(tree) -> int:
    return int(sum(np.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


@dataclasses.dataclass(frozen=True)
class StepCost:
    """What a step of a model must read and compute (module doc); build with :meth:`of`."""

    base_bytes: int  # dense weights read every step (backbone and router, LM head)
    expert_bytes: int  # one expert, every layer
    kv_bytes_per_position: int  # backbone + router cache, one position of one row
    flops_per_token: int  # matmuls of one token through attention, shared part and one expert (no head)
    head_flops_per_row: int
    attn_flops_per_position: int  # per token, per cache position it attends to

    @classmethod
    def of(cls, model) -> "StepCost":
        moe = model.is_moe
        bp = model.backbone_params if moe else model.params
        cfg = model.backbone_cfg if moe else model.cfg
        layers = bp["layers"]
        experts = {k: v for k, v in layers.items() if moe and k in EXPERT_KEYS}
        dense_layers = {k: v for k, v in layers.items() if k not in experts}
        router_bytes = 0
        router_flops = 0
        kv_router = 0
        if moe:
            rp = {k: v for k, v in model.router_params.items() if k != "embed"}
            router_bytes = _nbytes(rp)
            router_flops = 2 * (sum(int(np.prod(a.shape)) for a in jax.tree.leaves(rp["layers"]) if a.ndim >= 3)
                                + int(np.prod(rp["head"].shape)))
            rc = model.router_cfg
            kv_router = 2 * rc.n_layers * rc.n_kv_heads * rc.head_dim * 4
        L, V, D = cfg.n_layers, cfg.vocab_size, cfg.d_model
        head = bp["embed"] if cfg.tie_embeddings else bp["lm_head"]
        E = model.n_experts
        per_token = 2 * sum(int(np.prod(a.shape)) for a in jax.tree.leaves(dense_layers) if a.ndim >= 3)
        per_token += 2 * sum(int(np.prod(a.shape)) // E for a in experts.values())
        return cls(base_bytes=_nbytes(dense_layers) + _nbytes(head) + _nbytes(bp["final_norm"]) + router_bytes,
                   expert_bytes=_nbytes(experts) // E if experts else 0,
                   kv_bytes_per_position=2 * L * cfg.n_kv_heads * cfg.head_dim * 4 + kv_router,
                   flops_per_token=per_token + router_flops, head_flops_per_row=2 * V * D,
                   attn_flops_per_position=4 * L * cfg.n_heads * cfg.head_dim)

    def bytes(self, n_experts: int, positions: int) -> int:
        """Bytes read by a step with ``n_experts`` experts present whose rows hold ``positions`` in all."""
        return self.base_bytes + n_experts * self.expert_bytes + positions * self.kv_bytes_per_position

    def flops(self, n_tokens: int, n_rows: int, attended: int) -> int:
        """FLOPs of ``n_tokens`` tokens sampling on ``n_rows`` rows, attending ``attended`` positions in all."""
        return n_tokens * self.flops_per_token + n_rows * self.head_flops_per_row \
            + attended * self.attn_flops_per_position

    def floor_s(self, bandwidth: float, rate: float, *, n_experts: int, n_tokens: int, n_rows: int,
                positions: int, attended: int) -> dict:
        """``{"memory_s", "compute_s", "floor_s"}`` of one step (floor = the larger)."""
        mem = self.bytes(n_experts, positions) / bandwidth
        comp = self.flops(n_tokens, n_rows, attended) / rate
        return {"memory_s": mem, "compute_s": comp, "floor_s": max(mem, comp)}

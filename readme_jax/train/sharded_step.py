"""Read-ME's LM (expert-tuning) step, data-parallel x expert-parallel.

The step is ``train.steps.make_lm_step`` itself with the FFN swapped for
:func:`expert_parallel_ffn`, jitted once more with in/out shardings from the placement rule
(``distributed.mesh``): expert weights and their optimizer moments sharded over ``expert``
(and ``model``), the rest and the router replicated, the batch split over ``(data, expert)``.
The compiler inserts the gradient all-reduces over ``data``.
"""

from __future__ import annotations

from typing import Callable

import jax
import optax
from jax.sharding import Mesh

from readme_jax.config import MeshConfig, ModelConfig
from readme_jax.distributed.expert_parallel import expert_parallel_ffn
from readme_jax.distributed.mesh import (batch_sharding, make_mesh, param_shardings, replicated, shard_batch,
                                         shard_tree)
from readme_jax.train import steps


class ShardedLMStep:
    """``step(trainable, frozen, opt_state, ctx_params, blocks_BT1, lr, teacher_params=None) -> (trainable,
    opt_state, metrics)``.

    Same contract as ``steps.make_lm_step``; arguments may be host or device arrays: anything
    not already placed by the placement rule is placed on every call (pre-place with
    :meth:`shard` to avoid the copies). One compiled step per tree structure. Expert weights
    must already be padded to a multiple of the expert axis (``pad_experts``).

    ``remat``: recompute each decoder layer in the backward pass (``train.remat: layer``).
    ``donate``: the step reuses the buffers of ``trainable`` and ``opt_state`` for its outputs
    (the caller must not read the arrays it passed in again), so params and optimizer state are
    not held twice at the step's end; the Trainer donates.
    """

    def __init__(self, cfg: ModelConfig, mesh: Mesh, tx: optax.GradientTransformation,
                 ctx_fn: Callable | None = None, *, impl: str = "xla", comm: str = "psum",
                 capacity_factor: float = 0.0, remat: bool = False, donate: bool = False,
                 loss: steps.LossSpec = steps.LM_ONLY, **impl_kw):
        self.cfg, self.mesh, self.tx, self.donate = cfg, mesh, tx, donate
        self.ffn = expert_parallel_ffn(mesh, impl=impl, comm=comm, capacity_factor=capacity_factor, **impl_kw)
        self._inner = steps.make_lm_step(cfg, self.ffn, ctx_fn, tx, remat=remat, loss=loss)
        self._compiled: dict = {}

    @classmethod
    def from_config(cls, cfg: ModelConfig, mc: MeshConfig, tx: optax.GradientTransformation,
                    ctx_fn: Callable | None = None, *, devices=None, impl: str = "xla", remat: bool = False,
                    donate: bool = False, loss: steps.LossSpec = steps.LM_ONLY, **impl_kw) -> "ShardedLMStep":
        """Mesh from ``mc`` over ``devices`` (default all), exchange from ``mc.ffn_comm``/``capacity_factor``."""
        return cls(cfg, make_mesh(mc, devices), tx, ctx_fn, impl=impl, comm=mc.ffn_comm,
                   capacity_factor=mc.capacity_factor, remat=remat, donate=donate, loss=loss, **impl_kw)

    def shard(self, tree):
        """Place a param/optimizer tree on the mesh by the placement rule."""
        return shard_tree(tree, self.mesh)

    def replicate(self, tree):
        """Place a tree whole on every device of the mesh (the router, the dense teacher)."""
        return shard_tree(tree, self.mesh, self._ctx_shardings(tree))

    def init_opt_state(self, trainable):
        """``tx.init`` with moments placed like their params."""
        shapes = jax.eval_shape(self.tx.init, trainable)
        return jax.jit(self.tx.init, out_shardings=param_shardings(shapes, self.mesh))(trainable)

    def _ctx_shardings(self, ctx_params):
        return jax.tree.map(lambda _: replicated(self.mesh), ctx_params)  # the router: replicated

    def _jitted(self, trainable, frozen, opt_state, ctx_params, teacher_params):
        key = jax.tree.structure((trainable, frozen, opt_state, ctx_params, teacher_params))
        if key not in self._compiled:
            tr, fr, op = (param_shardings(t, self.mesh) for t in (trainable, frozen, opt_state))
            ctx, teacher = self._ctx_shardings(ctx_params), self._ctx_shardings(teacher_params)
            rep = replicated(self.mesh)
            self._compiled[key] = jax.jit(self._inner, in_shardings=(tr, fr, op, ctx, batch_sharding(self.mesh), rep,
                                                                     teacher),
                                          out_shardings=(tr, op, rep),  # metrics: every one replicated
                                          donate_argnums=(0, 2) if self.donate else ())
        return self._compiled[key]

    def __call__(self, trainable, frozen, opt_state, ctx_params, blocks_BT1, lr, teacher_params=None):
        fn = self._jitted(trainable, frozen, opt_state, ctx_params, teacher_params)
        trainable, frozen, opt_state = (shard_tree(t, self.mesh) for t in (trainable, frozen, opt_state))
        ctx_params = shard_tree(ctx_params, self.mesh, self._ctx_shardings(ctx_params))
        teacher_params = shard_tree(teacher_params, self.mesh, self._ctx_shardings(teacher_params))
        if not (isinstance(blocks_BT1, jax.Array) and blocks_BT1.sharding == batch_sharding(self.mesh)):
            blocks_BT1 = shard_batch(blocks_BT1, self.mesh)
        return fn(trainable, frozen, opt_state, ctx_params, blocks_BT1, lr, teacher_params)

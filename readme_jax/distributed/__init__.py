"""Experts spread over devices: mesh, expert-parallel FFN, sharded training step, checkpoints, multi-host.

See docs/DISTRIBUTED.md. Modules: ``mesh`` (mesh + placement rule + dummy experts),
``expert_parallel`` (the shard_map FFN), ``train`` (sharded LM step), ``checkpoint`` (orbax across
meshes), ``multihost`` (``jax.distributed`` from the environment), ``demo`` (launcher smoke test).
"""

from readme_jax.distributed.checkpoint import logical_experts, restore_sharded, save_sharded
from readme_jax.distributed.expert_parallel import expert_parallel_ffn
from readme_jax.distributed.mesh import (batch_sharding, expert_count, gather_tree, make_mesh, pad_experts,
                                         param_shardings, param_specs, shard_batch, shard_tree, unpad_experts)
from readme_jax.distributed.multihost import detect_launch, initialize_from_env
from readme_jax.distributed.train import ShardedLMStep

__all__ = ["ShardedLMStep", "batch_sharding", "detect_launch", "expert_count", "expert_parallel_ffn", "gather_tree",
           "initialize_from_env", "logical_experts", "make_mesh", "pad_experts", "param_shardings", "param_specs",
           "restore_sharded", "save_sharded", "shard_batch", "shard_tree", "unpad_experts"]

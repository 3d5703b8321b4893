"""Experts spread over devices: mesh, expert-parallel FFN, checkpoints, multi-host (the sharded training step is train/sharded_step.py).

See docs/DISTRIBUTED.md. Modules: ``mesh`` (mesh + placement rule + dummy experts),
``expert_parallel`` (the shard_map FFN), ``checkpoint`` (orbax across
meshes), ``multihost`` (``jax.distributed`` from the environment).
"""

from readme_jax.distributed.checkpoint import logical_experts, restore_sharded, save_sharded
from readme_jax.distributed.expert_parallel import expert_parallel_ffn
from readme_jax.distributed.mesh import (batch_sharding, expert_count, gather_tree, make_mesh, pad_experts,
                                         param_shardings, param_specs, shard_batch, shard_tree, unpad_experts)
from readme_jax.distributed.multihost import detect_launch, initialize_from_env

__all__ = ["batch_sharding", "detect_launch", "expert_count", "expert_parallel_ffn", "gather_tree",
           "initialize_from_env", "logical_experts", "make_mesh", "pad_experts", "param_shardings", "param_specs",
           "restore_sharded", "save_sharded", "shard_batch", "shard_tree", "unpad_experts"]

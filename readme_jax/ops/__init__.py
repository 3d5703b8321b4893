"""Numeric ops shared by the model, training and serving: the expert FFN and its grouping."""

from readme_jax.ops.expert_ffn import IMPLS, expert_ffn
from readme_jax.kernels.grouping import SortMeta, group_sizes, sort_by_expert

__all__ = ["IMPLS", "expert_ffn", "group_sizes", "sort_by_expert", "SortMeta"]

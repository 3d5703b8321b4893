"""Pallas kernels: the fused gathered-expert FFN (GPU Triton, TPU Mosaic, CPU interpret)."""

from readme_jax.kernels.block_sizes import BlockSizes, choose
from readme_jax.kernels.expert_ffn_pallas import fused_tiles_gpu, fused_tiles_tpu, pallas_ffn

__all__ = ["BlockSizes", "choose", "fused_tiles_gpu", "fused_tiles_tpu", "pallas_ffn"]

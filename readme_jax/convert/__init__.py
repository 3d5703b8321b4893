"""Dense Llama -> Read-ME MoE: calibration statistics and expert extraction."""

from readme_jax.convert.calibrate import (CalibrationStats, calibrate, calibration_step, load_stats,
                                          save_stats)
from readme_jax.convert.experts import (expert_overlap, expert_width, extract_experts, layout_cost,
                                        moe_arrays_from_dense, permanent_channels, permanent_sizes,
                                        pruned_dense_arrays, select_channels, summarize,
                                        top_channels)

__all__ = [
    "CalibrationStats", "calibrate", "calibration_step", "load_stats", "save_stats",
    "expert_overlap", "expert_width", "extract_experts", "layout_cost", "moe_arrays_from_dense",
    "permanent_channels", "permanent_sizes", "pruned_dense_arrays", "select_channels", "summarize",
    "top_channels",
]

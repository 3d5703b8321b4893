"""Serving: requests, schedulers, expert cache and transfers, workloads, metrics, simulation.

The model-independent parts; the JAX engine plugs into :class:`Scheduler` (docs/SERVING.md).
"""

from readme_jax.serve.cache_policy import (Access, CacheStats, ExpertCache, offline_optimum_misses,
                                           optimal_misses_bruteforce, simulate_cache, step_access_sequence)
from readme_jax.serve.metrics import (hit_ratio_table, plot_hit_ratio_vs_capacity, plot_normalized_latency_hist,
                                      plot_unique_experts, request_metrics, summarize)
from readme_jax.serve.requests import Batch, BatchItem, Kind, Request, Status, WorkItem
from readme_jax.serve.scheduler import Scheduler, SchedulerConfig
from readme_jax.serve.simulate import CostModel, SimResult, StepRecord, run_policies, simulate
from readme_jax.serve.transfer import (ExpertStoreSim, LinkModel, StoreConfig, TransferTimeline,
                                       compare_prefetch)
from readme_jax.serve.workload import RequestSpec, generate_workload

__all__ = [
    "Access", "Batch", "BatchItem", "CacheStats", "CostModel", "ExpertCache", "ExpertStoreSim", "Kind",
    "LinkModel", "Request", "RequestSpec", "Scheduler", "SchedulerConfig", "SimResult",
    "Status", "StepRecord", "StoreConfig", "TransferTimeline", "WorkItem", "compare_prefetch",
    "generate_workload", "hit_ratio_table", "offline_optimum_misses", "optimal_misses_bruteforce",
    "plot_hit_ratio_vs_capacity", "plot_normalized_latency_hist", "plot_unique_experts", "request_metrics",
    "run_policies", "simulate", "simulate_cache", "step_access_sequence", "summarize",
]

"""Serving, in four rooms (each imports only the rooms above it in this list):

* ``serve.scheduling`` — requests, the continuous-batching scheduler (Read-ME expert-aware batching
  and three baselines) and the expert cache policies. No model.
* ``serve.engine`` — the JAX engine: one jitted call per step (prompt chunks and decodes together),
  KV slots, route lookahead, the expert store and the mesh placement; ``generate``, ``complete``,
  ``greedy_batch``.
* ``serve.api`` — the live loop (requests submitted while it steps), ``LLM`` (text in, text out)
  and the OpenAI-compatible HTTP server.
* ``serve.sim`` — simulation and benchmark tools: workloads, the model-free simulator, simulated
  transfers, metrics and plots, and ``serve-bench``.

This package re-exports the model-free parts (docs/SERVING.md).
"""

from readme_jax.serve.scheduling.cache_policy import (Access, CacheStats, ExpertCache, offline_optimum_misses,
                                                      optimal_misses_bruteforce, simulate_cache, step_access_sequence)
from readme_jax.serve.scheduling.requests import Batch, BatchItem, Kind, Request, Status, WorkItem
from readme_jax.serve.scheduling.scheduler import Scheduler, SchedulerConfig
from readme_jax.serve.sim.metrics import (hit_ratio_table, plot_hit_ratio_vs_capacity, plot_normalized_latency_hist,
                                          plot_unique_experts, request_metrics, summarize)
from readme_jax.serve.sim.simulate import CostModel, SimResult, StepRecord, run_policies, simulate
from readme_jax.serve.sim.transfer import ExpertStoreSim, LinkModel, StoreConfig, TransferTimeline, compare_prefetch
from readme_jax.serve.sim.workload import RequestSpec, generate_workload

__all__ = [
    "Access", "Batch", "BatchItem", "CacheStats", "CostModel", "ExpertCache", "ExpertStoreSim", "Kind",
    "LinkModel", "Request", "RequestSpec", "Scheduler", "SchedulerConfig", "SimResult",
    "Status", "StepRecord", "StoreConfig", "TransferTimeline", "WorkItem", "compare_prefetch",
    "generate_workload", "hit_ratio_table", "offline_optimum_misses", "optimal_misses_bruteforce",
    "plot_hit_ratio_vs_capacity", "plot_normalized_latency_hist", "plot_unique_experts", "request_metrics",
    "run_policies", "simulate", "simulate_cache", "step_access_sequence", "summarize",
]

"""Frozen dataclass configs, loaded from YAML with ``key=value`` overrides (unknown keys are errors).

Modules: ``choices`` (every closed set of values as a ``Literal``), ``loading`` (YAML, overrides,
``from_dict``), ``model`` (decoder, router), ``train`` (stages, rounds, mesh), ``serve`` (workload,
serve-bench), ``run`` (the main job). Everything is re-exported here: ``from readme_jax.config import X``.
"""

from readme_jax.config.choices import (CACHE_POLICIES, EXPERT_LAYOUTS, EXPERT_LOSSES, IMPLS, MESH_FFN_COMMS,
                                       ROUTER_TARGETS, SCHEDULER_POLICIES, CachePolicy, Dtype, EmbedInit,
                                       ExpertLayoutKind, FfnComm, Impl, RouterLoss, RouterMlp,
                                       RouterTarget, RunDtype, SchedulerPolicy, ScoreScale, Split, check_choices,
                                       choices)
from readme_jax.config.loading import deep_merge, from_dict, load, parse_overrides, read_yaml, to_dict
from readme_jax.config.model import ModelConfig, RouterConfig, tiny_model_config
from readme_jax.config.run import ConvertConfig, DataConfig, EvalConfig, RunConfig
from readme_jax.config.serve import (BENCH_WORKLOAD, LMSYS_PROMPT_MEAN_TOKENS, LMSYS_RESPONSE_MEAN_TOKENS,
                                     WORKLOAD_PRESETS, EngineConfig, SamplingParams, ServeBenchConfig, WorkloadConfig)
from readme_jax.config.train import MeshConfig, StageConfig, TrainConfig
from readme_jax.errors import ConfigError

__all__ = ["BENCH_WORKLOAD", "CACHE_POLICIES", "EXPERT_LAYOUTS", "EXPERT_LOSSES", "IMPLS",
           "LMSYS_PROMPT_MEAN_TOKENS",
           "LMSYS_RESPONSE_MEAN_TOKENS", "MESH_FFN_COMMS", "ROUTER_TARGETS", "SCHEDULER_POLICIES",
           "WORKLOAD_PRESETS", "CachePolicy", "ConfigError", "ConvertConfig", "DataConfig", "Dtype", "EmbedInit",
           "EngineConfig", "EvalConfig", "ExpertLayoutKind", "FfnComm", "Impl", "MeshConfig", "ModelConfig", "RouterConfig",
           "RouterLoss", "RouterMlp", "RouterTarget", "RunConfig", "RunDtype", "SamplingParams", "SchedulerPolicy", "ScoreScale",
           "ServeBenchConfig", "Split", "StageConfig", "TrainConfig", "WorkloadConfig", "check_choices", "choices",
           "deep_merge", "from_dict", "load", "parse_overrides", "read_yaml", "tiny_model_config", "to_dict"]

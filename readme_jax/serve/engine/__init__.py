"""The JAX serving engine (docs/SERVING.md, "The engine")."""

from readme_jax.serve.engine.engine import (Engine, EngineConfig, EngineRunner, SamplingParams, ServedModel,
                                            StepOutput, complete, generate, greedy_batch)

__all__ = ["Engine", "EngineConfig", "EngineRunner", "SamplingParams", "ServedModel", "StepOutput", "complete",
           "generate", "greedy_batch"]

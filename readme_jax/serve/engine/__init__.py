"""The JAX serving engine: one jitted call per step (docs/SERVING.md, "The engine").

``Engine`` (engine.py) lays each scheduler batch out (layout.py; calls.py with an expert store)
and runs the step (step.py: forward.py over attention.py and experts.py); ``generate``,
``greedy_batch``, ``complete`` and ``EngineRunner`` drive it (drivers.py); expert_store.py and
placement.py hold the host-resident experts and the mesh placement.
"""

from readme_jax.config import EngineConfig, SamplingParams
from readme_jax.serve.engine.drivers import EngineRunner, complete, generate, greedy_batch
from readme_jax.serve.engine.engine import Engine
from readme_jax.serve.engine.step import ServedModel
from readme_jax.serve.scheduling.requests import StepOutput

__all__ = ["Engine", "EngineConfig", "EngineRunner", "SamplingParams", "ServedModel", "StepOutput", "complete",
           "generate", "greedy_batch"]

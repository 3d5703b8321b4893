"""readme-jax: Read-ME router-decoupled mixture of experts on JAX.

The public API (everything else is reachable through the subpackages, see docs/ARCHITECTURE.md)::

    import readme_jax
    model = readme_jax.load("runs/main")          # a run folder, a train/final folder or an export
    out = model(tokens_BT)                         # logits, routes, router logits (and caches)
    engine = readme_jax.Engine(model, readme_jax.EngineConfig())
    llm = readme_jax.LLM.open("runs/main")        # text in, text out (generate, stream, chat)
"""

from readme_jax.checkpoints import load_model
from readme_jax.checkpoints.readme_io import load_readme as load
from readme_jax.checkpoints.readme_io import save_export, save_readme
from readme_jax.config import ModelConfig, RouterConfig, RunConfig, TrainConfig
from readme_jax.errors import ReadmeError
from readme_jax.model.readme_model import DenseModel, ExpertLayout, ReadMEModel, ReadMEOut
from readme_jax.serve.engine import Engine, EngineConfig, SamplingParams, generate
from readme_jax.serve.llm import LLM, Completion

__version__ = "0.1.0"

__all__ = ["LLM", "Completion", "DenseModel", "Engine", "EngineConfig", "ExpertLayout", "ModelConfig", "ReadMEModel", "ReadMEOut",
           "ReadmeError", "RouterConfig", "RunConfig", "SamplingParams", "TrainConfig", "generate", "load",
           "load_model", "save_export", "save_readme"]

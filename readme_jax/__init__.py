"""readme-jax: Read-ME router-decoupled mixture of experts on JAX.

The public API (everything else is reachable through the subpackages, see docs/ARCHITECTURE.md)::

    import readme_jax
    model = readme_jax.load("runs/main")          # a run folder, a train/final folder or an export
    out = model(tokens_BT)                         # logits, routes, router logits (and caches)
    engine = readme_jax.Engine(model, readme_jax.EngineConfig())
    llm = readme_jax.LLM.open("runs/main")        # text in, text out (generate, stream, chat)

The names load on first use, so importing a subpackage stays light.
"""

import importlib
from typing import TYPE_CHECKING

# name -> module that defines it. Loaded on first attribute access (PEP 562), so that importing a
# low layer (``readme_jax.kernels``, ``readme_jax.ops``, ``readme_jax.bench.device_check``) does not
# pull in checkpoints/serving and their optional dependencies (gguf, grain, tokenizers), which a
# bare accelerator image may lack.
_LAZY = {
    "load_model": "readme_jax.checkpoints",
    "load": ("readme_jax.checkpoints.readme_io", "load_readme"),
    "save_export": "readme_jax.checkpoints.readme_io",
    "save_readme": "readme_jax.checkpoints.readme_io",
    "ModelConfig": "readme_jax.config", "RouterConfig": "readme_jax.config",
    "RunConfig": "readme_jax.config", "TrainConfig": "readme_jax.config",
    "ReadmeError": "readme_jax.errors",
    "DenseModel": "readme_jax.model.readme_model", "ExpertLayout": "readme_jax.model.readme_model",
    "ReadMEModel": "readme_jax.model.readme_model", "ReadMEOut": "readme_jax.model.readme_model",
    "Engine": "readme_jax.serve.engine", "EngineConfig": "readme_jax.serve.engine",
    "SamplingParams": "readme_jax.serve.engine", "generate": "readme_jax.serve.engine",
    "LLM": "readme_jax.serve.api.llm", "Completion": "readme_jax.serve.api.llm",
}

if TYPE_CHECKING:  # static analysers see the real names
    from readme_jax.checkpoints import load_model
    from readme_jax.checkpoints.readme_io import load_readme as load
    from readme_jax.checkpoints.readme_io import save_export, save_readme
    from readme_jax.config import ModelConfig, RouterConfig, RunConfig, TrainConfig
    from readme_jax.errors import ReadmeError
    from readme_jax.model.readme_model import DenseModel, ExpertLayout, ReadMEModel, ReadMEOut
    from readme_jax.serve.engine import Engine, EngineConfig, SamplingParams, generate
    from readme_jax.serve.api.llm import LLM, Completion


def __getattr__(name: str):
    target = _LAZY.get(name)
    if target is None:  # a subpackage (``readme_jax.serve`` after a bare ``import readme_jax``)
        try:
            return importlib.import_module(f"readme_jax.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"readme_jax.{name}":
                raise
        raise AttributeError(f"module 'readme_jax' has no attribute {name!r}")
    mod, attr = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(mod), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = ["LLM", "Completion", "DenseModel", "Engine", "EngineConfig", "ExpertLayout", "ModelConfig", "ReadMEModel", "ReadMEOut",
           "ReadmeError", "RouterConfig", "RunConfig", "SamplingParams", "TrainConfig", "generate", "load",
           "load_model", "save_export", "save_readme"]

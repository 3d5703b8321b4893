"""One Read-ME expert as a standalone Llama checkpoint in Hugging Face format.

Expert ``e`` with the shared attention is an ordinary dense Llama whose FFN is the expert's channels
(the shared part, with the split layout, followed by the expert-specific part): on any tokens its
logits equal the Read-ME model's with every token routed to ``e``. transformers, vLLM and llama.cpp's
converter load it as any Llama. Columns that are zero in all three FFN matrices (the layouts' padding)
are dropped per layer, which changes no output; layers are padded back to one width with zero columns
(HF needs one ``intermediate_size``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from readme_jax.checkpoints.atomic import write_folder
from readme_jax.checkpoints.hf import save_hf
from readme_jax.config import ModelConfig
from readme_jax.errors import ConfigError
from readme_jax.model.readme_model import ReadMEModel


def expert_dense_arrays(model: ReadMEModel, e: int) -> tuple[dict, ModelConfig]:
    """``(dense Llama arrays, cfg)`` of expert ``e`` with the shared attention (numpy float32/orig dtype)."""
    if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or not 0 <= e < model.n_experts:
        raise ConfigError(f"expert index must be an integer in [0, {model.n_experts}), got {e!r}")
    bp = {k: (v if isinstance(v, dict) else np.asarray(v)) for k, v in model.backbone_params.items()}
    layers = {k: np.asarray(v) for k, v in bp["layers"].items()}
    wg, wu, wd = layers["wg"][:, e], layers["wu"][:, e], layers["wd"][:, e]  # [L,D,R], [L,D,R], [L,R,D]
    if "shared_wg" in layers:
        wg = np.concatenate([layers["shared_wg"], wg], -1)
        wu = np.concatenate([layers["shared_wu"], wu], -1)
        wd = np.concatenate([layers["shared_wd"], wd], 1)
    live = (wg != 0).any(1) | (wu != 0).any(1) | (wd != 0).any(2)  # [L, C]
    width = max(1, int(live.sum(1).max()))
    L, D = wg.shape[:2]
    out = {k: np.zeros((L, D, width), wg.dtype) for k in ("wg", "wu")}
    out["wd"] = np.zeros((L, width, D), wd.dtype)
    for l in range(L):
        cols = np.flatnonzero(live[l])
        out["wg"][l, :, :len(cols)] = wg[l][:, cols]
        out["wu"][l, :, :len(cols)] = wu[l][:, cols]
        out["wd"][l, :len(cols)] = wd[l][cols]
    dense_layers = {k: v for k, v in layers.items() if k not in ("wg", "wu", "wd", "shared_wg", "shared_wu",
                                                                 "shared_wd")}
    arrays = {k: v for k, v in bp.items() if k != "layers"}
    arrays["layers"] = {**dense_layers, **out}
    return arrays, dataclasses.replace(model.backbone_cfg, ffn_dim=width)


def save_expert_hf(out_dir, model: ReadMEModel, e: int, tokenizer=None, overwrite: bool = False) -> Path:
    """Write expert ``e`` as an HF Llama folder (config.json, model.safetensors, tokenizer), atomically."""
    arrays, cfg = expert_dense_arrays(model, e)
    return write_folder(out_dir, lambda tmp: save_hf(tmp, cfg, arrays, tokenizer=tokenizer), overwrite=overwrite,
                        what="expert export")


def save_experts_hf(out_dir, model: ReadMEModel, tokenizer=None, overwrite: bool = False) -> list[Path]:
    """Every expert, into ``out_dir/expert_<i>_<domain>/`` (or ``expert_<i>`` without domain names)."""
    names = list(model.layout.domains) or [""] * model.n_experts
    paths = []
    for e in range(model.n_experts):
        sub = f"expert_{e}" + (f"_{names[e]}" if e < len(names) and names[e] else "")
        paths.append(save_expert_hf(Path(out_dir) / sub, model, e, tokenizer, overwrite))
    return paths

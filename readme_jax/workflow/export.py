"""`readme-jax export`: the run's trained Read-ME model as safetensors + JSON, readable without JAX.

The format (``readme-jax-moe`` v1) is written and read by :mod:`readme_jax.checkpoints.readme_io`
(:func:`save_export` documents the tensor names); ``readme_jax.load(folder)`` reads it back. Beside
the model tensors the export holds the conversion's masks: ``experts.channel_index [L,E,R]`` and
``experts.shared_index [L,P]`` (dense FFN channel of each column, -1 = padding) and
``experts.permanent [L,F]`` (uint8).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from readme_jax.checkpoints.readme_io import save_export
from readme_jax.errors import CheckpointError
from readme_jax.workflow.training import load_trained, trained_meta
from readme_jax.workflow.workspace import Workspace


def export_workspace(ws: Workspace, out_dir: Path) -> Path:
    if not ws.is_done("train"):
        raise CheckpointError(f"{ws.out}: no trained model to export (run `readme-jax train` first)")
    model = load_trained(ws)
    meta = trained_meta(ws)
    ex = np.load(ws.out / "refactor" / "experts.npz")
    extra = {"experts.channel_index": ex["channel_index"].astype(np.int32),
             "experts.permanent": ex["permanent"].astype(np.uint8)}
    if "shared_index" in ex and ex["shared_index"].size:
        extra["experts.shared_index"] = ex["shared_index"].astype(np.int32)
    info = {"router_config": meta["router_config"], "expert_width": meta["expert_width"],
            "ffn_dim": meta["ffn_dim"], "r": meta["r"]}
    return save_export(out_dir, model, extra_tensors=extra, info=info, tokenizer=ws.tokenizer)

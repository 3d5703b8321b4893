"""`readme-jax export`: the run's trained Read-ME model as safetensors + JSON, readable without JAX.

The format (``readme-jax-moe`` v1) is written and read by :mod:`readme_jax.checkpoints.readme_io`
(:func:`save_export` documents the tensor names); ``readme_jax.load(folder)`` reads it back. Beside
the model tensors the export holds the conversion's masks: ``experts.channel_index [L,E,R]`` and
``experts.shared_index [L,P]`` (dense FFN channel of each column, -1 = padding) and
``experts.permanent [L,F]`` (uint8).

Everything in the export describes the trained checkpoint (``<run>/train/final``), never the config
the export command runs under: the router settings are the router checkpoint's own ``router_config``
and the model's architecture comes from the checkpoints' meta. The target folder must be new or empty
unless ``overwrite``; it is written atomically (all or nothing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from readme_jax.checkpoints.atomic import check_target
from readme_jax.checkpoints.expert_hf import save_experts_hf
from readme_jax.checkpoints.model_card import model_card
from readme_jax.checkpoints.readme_io import save_export
from readme_jax.errors import CheckpointError
from readme_jax.jsonfile import read_json
from readme_jax.workflow.training import load_trained, trained_meta
from readme_jax.workflow.workspace import Workspace

# provenance keys the export copies from the trained backbone's meta.json
META_KEYS = ("expert_width", "ffn_dim", "r")
# the hub id of the model the embedded GGUF was quantized from (the card's base_model)
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def export_workspace(ws: Workspace, out_dir: Path, *, overwrite: bool = False, hf_experts: bool = False) -> Path:
    """The run's trained model as the ``readme-jax-moe`` export; with ``hf_experts`` also every expert
    as a standalone HF Llama in ``out_dir/hf_experts/expert_<i>_<domain>/`` (checkpoints/expert_hf.py)."""
    out = Path(out_dir).absolute()
    run = ws.out.absolute()
    if out == run or out in run.parents:
        raise CheckpointError(f"export target {out} holds the run folder {run}; choose a folder outside it "
                              "or a new subfolder")
    check_target(out, overwrite, "export")  # before loading anything
    if not ws.is_done("train"):
        raise CheckpointError(f"{ws.out}: no trained model to export (run `readme-jax train` first)")
    model = load_trained(ws)
    meta = trained_meta(ws)
    backbone_meta = ws.out / "train" / "final" / "backbone" / "meta.json"
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{backbone_meta}: missing key(s) {missing} (written by the refactor stage)")
    experts = ws.out / "refactor" / "experts.npz"
    if not experts.is_file():
        raise CheckpointError(f"{experts} is missing: the export needs the conversion's channel indices")
    ex = np.load(experts)
    extra = {"experts.channel_index": ex["channel_index"].astype(np.int32),
             "experts.permanent": ex["permanent"].astype(np.uint8)}
    if "shared_index" in ex and ex["shared_index"].size:
        extra["experts.shared_index"] = ex["shared_index"].astype(np.int32)
    info = {k: meta[k] for k in META_KEYS}
    if meta.get("router_config") is not None:  # the trained router's own settings (its meta.json)
        info = {"router_config": meta["router_config"], **info}
    card = _card_inputs(ws)
    save_export(out, model, extra_tensors=extra, info=info, tokenizer=ws.tokenizer, overwrite=overwrite,
                card=lambda doc: model_card(doc, **card))
    if hf_experts:
        save_experts_hf(out / "hf_experts", model, tokenizer=ws.tokenizer)
    return out


def _card_inputs(ws: Workspace) -> dict:
    """What the model card says beyond the export's own JSON: the source model, the training budget
    (the train stage's done.json) and the report's measured perplexities when the run has a report."""
    train = read_json(ws.out / "train" / "done.json")
    budget = {k.replace("_", " "): train[k] for k in ("rounds", "lm_tokens", "router_tokens") if k in train}
    report = ws.out / "report" / "metrics.json"
    metrics = read_json(report) if report.is_file() else None
    source = ws.cfg.model or "embedded"
    if source == "embedded":
        return {"metrics": metrics, "budget": budget, "base_model": EMBEDDED_HUB_ID,
                "source": f"{EMBEDDED_HUB_ID} (the embedded Q4_1 GGUF, dequantized to float32)"}
    return {"metrics": metrics, "budget": budget, "source": source}

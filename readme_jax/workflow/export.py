"""Export a trained Read-ME model as safetensors + JSON, readable without JAX (format v1).

Folder layout::

    readme_moe.safetensors   tensors, float32 (or the params' dtype), names below
    readme_moe.json          {"format": "readme-jax-moe", "version": 1, "model_config", "router_config",
                              "router_model_config", "n_experts", "expert_width", "ffn_dim", "domains",
                              "r", "layout": {name: "shape description"}}
    tokenizer.json           the tokenizer (Hugging Face tokenizers format)

Tensor names: ``backbone.<name>`` for the backbone (``embed [V,D]``, ``final_norm [D]``,
``lm_head [D,V]`` if untied, ``layers.<name>`` stacked over layers: ``attn_norm [L,D]``,
``wq [L,D,H*hd]``, ``wk/wv [L,D,K*hd]``, ``wo [L,H*hd,D]``, ``ffn_norm [L,D]``, experts
``wg/wu [L,E,D,R]``, ``wd [L,E,R,D]`` and, with the split layout (``expert_layout``), the shared
part every token uses ``shared_wg/shared_wu [L,D,P]``, ``shared_wd [L,P,D]``: FFN(x) = shared(x) +
expert_e(x); zero columns are padding); matrices are [in, out], so ``y = x @ W``. RoPE is the
rotate-half convention. ``router.<name>`` the same for the router (``head [W,E]``). Masks:
``experts.channel_index [L,E,R]`` and ``experts.shared_index [L,P]`` (dense FFN channel of each
column, -1 = padding) and ``experts.permanent [L,F]`` (uint8). Route of a token = argmax of the
router's logits; the backbone uses that expert in every layer, with no gate weight.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from readme_jax import config as config_mod
from readme_jax.errors import CheckpointError
from readme_jax.workflow.workspace import Workspace

FORMAT = "readme-jax-moe"
VERSION = 1


def flatten(tree: dict, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}.{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name))
        else:
            out[name] = np.ascontiguousarray(np.asarray(v))
    return out


def unflatten(tensors: dict[str, np.ndarray], prefix: str) -> dict:
    out: dict = {}
    for name, v in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        node = out
        parts = name[len(prefix) + 1:].split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def export_workspace(ws: Workspace, out_dir: Path) -> Path:
    from readme_jax.workflow.training import load_trained

    if not ws.is_done("train"):
        raise CheckpointError(f"{ws.out}: no trained model to export (run `readme-jax train` first)")
    rp, rcfg, _, bp, bcfg, meta = load_trained(ws)
    ex = np.load(ws.out / "refactor" / "experts.npz")
    tensors = {**flatten(bp, "backbone"), **flatten(rp, "router"),
               "experts.channel_index": ex["channel_index"].astype(np.int32),
               "experts.permanent": ex["permanent"].astype(np.uint8)}
    if "shared_index" in ex and ex["shared_index"].size:
        tensors["experts.shared_index"] = ex["shared_index"].astype(np.int32)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "readme_moe.safetensors"))
    info = {"format": FORMAT, "version": VERSION, "model_config": config_mod.to_dict(bcfg),
            "router_config": config_mod.to_dict(ws.cfg.router), "router_model_config": config_mod.to_dict(rcfg),
            "n_experts": meta["n_experts"], "expert_width": meta["expert_width"], "ffn_dim": meta["ffn_dim"],
            "domains": meta["domains"], "r": meta["r"], "expert_layout": meta.get("layout", "fixed"),
            "layout": {k: list(v.shape) for k, v in tensors.items()}}
    (out_dir / "readme_moe.json").write_text(json.dumps(info, indent=1))
    ws.tokenizer.save_hf(out_dir)
    return out_dir

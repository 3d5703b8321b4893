"""A :class:`ReadMEModel` in and out: the run folder's orbax pair and the safetensors export.

Two on-disk forms, one model type:

- **orbax pair** (what training writes, ``<run>/train/final``): ``router/`` and ``backbone/``, each an
  orbax checkpoint with ``meta.json`` (:mod:`readme_jax.checkpoints.orbax_io`). The router's meta holds
  ``router_config`` (the RouterConfig it was built from), the backbone's ``model_config``, ``domains``
  and the expert layout.
- **export** (``readme-jax export``, format ``readme-jax-moe`` v1): ``readme_moe.safetensors`` +
  ``readme_moe.json`` + ``tokenizer.json``; readable without JAX (the layout is documented in
  :func:`save_export`).

:func:`load_readme` reads either (or a run folder) and returns a validated :class:`ReadMEModel`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import load_file, save_file

from readme_jax import config as config_mod
from readme_jax.checkpoints.atomic import check_target, write_folder
from readme_jax.checkpoints.embedded import embedded_gguf_path
from readme_jax.checkpoints.finite import check_finite, check_finite_tree
from readme_jax.checkpoints.hub import resolve_source
from readme_jax.checkpoints.orbax_io import is_orbax_dir, restore_params, save_params
from readme_jax.checkpoints.tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf
from readme_jax.config import ModelConfig, RouterConfig
from readme_jax.errors import CheckpointError, ConfigError
from readme_jax.model.readme_model import ExpertLayout, ReadMEModel
from readme_jax.model.router import router_model_config

EXPORT_FORMAT = "readme-jax-moe"
EXPORT_VERSION = 1
EXPORT_TENSORS = "readme_moe.safetensors"
EXPORT_INFO = "readme_moe.json"
TINY_RANDOM_SOURCE = "tiny-random"  # RunConfig.model value of the random smoke-test model (workflow/workspace.py)


# ----------------------------------------------------------------------------- orbax pair


def save_readme(path, model: ReadMEModel, *, router_config: RouterConfig | None = None,
                backbone_meta: dict | None = None) -> Path:
    """Write ``path/router`` and ``path/backbone`` (overwriting); ``backbone_meta`` adds provenance keys."""
    d = Path(path)
    save_router(d / "router", model, router_config=router_config)
    bmeta = {"kind": "readme_moe", **(backbone_meta or {}), "model_config": config_mod.to_dict(model.backbone_cfg),
             "n_experts": model.n_experts, "domains": list(model.layout.domains), "layout": model.layout.kind,
             "shared_width": model.layout.shared_dim, "specific_width": model.layout.expert_dim}
    save_params(d / "backbone", model.backbone_params, bmeta, overwrite=True)
    return d


def save_router(path, model: ReadMEModel, *, router_config: RouterConfig | None = None) -> Path:
    """Write the router alone (``load_router`` reads it back onto a backbone)."""
    meta = {"kind": "readme_router", "n_experts": model.n_experts, "router_mlp": model.router_mlp,
            "router_model_config": config_mod.to_dict(model.router_cfg)}
    if router_config is not None:
        meta["router_config"] = config_mod.to_dict(router_config)
    return save_params(path, model.router_params, meta, overwrite=True)


def router_from_meta(meta: dict, backbone_cfg: ModelConfig, where) -> tuple[ModelConfig, str]:
    """``(router decoder config, mlp kind)`` from a router checkpoint's meta (new or older keys)."""
    try:
        if "router_model_config" in meta:
            return (config_mod.from_dict(ModelConfig, meta["router_model_config"], prefix="router_model_config."),
                    meta.get("router_mlp", "swiglu"))
        rc = config_mod.from_dict(RouterConfig, meta["router_config"], prefix="router_config.")
    except KeyError:
        raise CheckpointError(f"{where}: meta.json has neither 'router_model_config' nor 'router_config'") from None
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return router_model_config(rc, backbone_cfg.vocab_size, backbone_cfg.max_seq_len), rc.mlp


def load_router(path, backbone_cfg: ModelConfig) -> tuple[dict, ModelConfig, str]:
    """``(router params, router decoder config, mlp kind)`` of a saved router (e.g. ``after_router0/router``)."""
    params, meta = restore_params(path)
    check_finite_tree(params, path)
    router_cfg, mlp = router_from_meta(meta, backbone_cfg, path)
    return params, router_cfg, mlp


def load_backbone(path) -> tuple[dict, ModelConfig, dict]:
    """``(params, config, meta)`` of a saved MoE backbone."""
    params, meta = restore_params(path)
    check_finite_tree(params, path)
    if "model_config" not in meta:
        raise CheckpointError(f"{Path(path) / 'meta.json'}: missing key 'model_config'")
    try:
        cfg = config_mod.from_dict(ModelConfig, meta["model_config"], prefix="model_config.")
    except ConfigError as e:
        raise CheckpointError(f"{Path(path) / 'meta.json'}: {e}") from None
    return params, cfg, meta


def _load_pair(d: Path) -> ReadMEModel:
    backbone_params, backbone_cfg, meta = load_backbone(d / "backbone")
    router_params, router_cfg, mlp = load_router(d / "router", backbone_cfg)
    layout = ExpertLayout.of(backbone_params, meta.get("domains", ()))
    return ReadMEModel(router_params, backbone_params, router_cfg, backbone_cfg, layout, mlp).validate(str(d))


# ----------------------------------------------------------------------------- export


def flatten(tree: dict, prefix: str) -> dict[str, np.ndarray]:
    """``{"a": {"b": x}}`` -> ``{"<prefix>.a.b": x}`` (host, contiguous)."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}.{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name))
        else:
            out[name] = np.ascontiguousarray(np.asarray(v))
    return out


def unflatten(tensors: dict[str, np.ndarray], prefix: str) -> dict:
    """Inverse of :func:`flatten` for the names under ``prefix``."""
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


def save_export(out_dir, model: ReadMEModel, *, extra_tensors: dict[str, np.ndarray] | None = None,
                info: dict | None = None, tokenizer=None, overwrite: bool = False,
                card: Callable[[dict], str] | None = None) -> Path:
    """Write the export (format v1) into ``out_dir``: a new or empty folder, or any folder with ``overwrite``;
    written atomically (:func:`readme_jax.checkpoints.atomic.write_folder`: all or nothing).

    Tensor names: ``backbone.<name>`` (``embed [V,D]``, ``final_norm [D]``, ``lm_head [D,V]`` if untied,
    ``layers.<name>`` stacked over layers: ``attn_norm [L,D]``, ``wq [L,D,H*hd]``, ``wk/wv [L,D,K*hd]``,
    ``wo [L,H*hd,D]``, ``ffn_norm [L,D]``, experts ``wg/wu [L,E,D,R]``, ``wd [L,E,R,D]`` and, with the
    split layout (``expert_layout``), the shared part every token uses ``shared_wg/shared_wu [L,D,P]``,
    ``shared_wd [L,P,D]``: FFN(x) = shared(x) + expert_e(x); zero columns are padding); matrices are
    [in, out], so ``y = x @ W``. RoPE is the rotate-half convention. ``router.<name>`` the same for the
    router (``head [W,E]``). ``extra_tensors`` (e.g. ``experts.channel_index [L,E,R]``,
    ``experts.shared_index [L,P]``, ``experts.permanent [L,F]``) are written as given. Route of a token =
    argmax of the router's logits; the backbone uses that expert in every layer, with no gate weight.
    ``card(doc)`` (the JSON document) gives the model card written as ``README.md`` (docs/EXPORT.md).
    """
    check_target(Path(out_dir).absolute(), overwrite, "export")  # refuse before copying any tensor
    tensors = {**flatten(model.backbone_params, "backbone"), **flatten(model.router_params, "router"),
               **(extra_tensors or {})}
    doc = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, **(info or {}),
           "model_config": config_mod.to_dict(model.backbone_cfg),
           "router_model_config": config_mod.to_dict(model.router_cfg), "router_mlp": model.router_mlp,
           "n_experts": model.n_experts, "domains": list(model.layout.domains), "expert_layout": model.layout.kind,
           "layout": {k: list(v.shape) for k, v in tensors.items()}}
    text = json.dumps(doc, indent=1)

    def write(d: Path) -> None:
        save_file(tensors, str(d / EXPORT_TENSORS))
        (d / EXPORT_INFO).write_text(text)
        if card is not None:
            (d / "README.md").write_text(card(doc))
        if tokenizer is not None:
            tokenizer.save_hf(d)

    return write_folder(out_dir, write, overwrite=overwrite, what="export")


def _load_export(d: Path) -> ReadMEModel:
    try:
        info = json.loads((d / EXPORT_INFO).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{d / EXPORT_INFO}: invalid JSON ({e})") from None
    if info.get("format") != EXPORT_FORMAT or info.get("version") != EXPORT_VERSION:
        raise CheckpointError(f"{d / EXPORT_INFO}: expected format {EXPORT_FORMAT!r} version {EXPORT_VERSION}, "
                              f"got {info.get('format')!r} version {info.get('version')!r}")
    if not (d / EXPORT_TENSORS).is_file():
        raise CheckpointError(f"{d}: {EXPORT_TENSORS} is missing")
    tensors = load_file(str(d / EXPORT_TENSORS))
    for name, a in tensors.items():
        check_finite(a, name, d / EXPORT_TENSORS)
    try:
        backbone_cfg = config_mod.from_dict(ModelConfig, info["model_config"], prefix="model_config.")
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{d / EXPORT_INFO}: bad or missing model_config ({e})") from None
    backbone_params, router_params = unflatten(tensors, "backbone"), unflatten(tensors, "router")
    router_cfg, mlp = router_from_meta(info, backbone_cfg, d / EXPORT_INFO)
    layout = ExpertLayout.of(backbone_params, info.get("domains", ()))
    return ReadMEModel(router_params, backbone_params, router_cfg, backbone_cfg, layout, mlp).validate(str(d))


# ----------------------------------------------------------------------------- tokenizers and dense twins


def run_source(path) -> tuple[Path, str] | None:
    """``(run folder, its ``model`` setting)`` when ``path`` is a run folder or inside one (train/final)."""
    p = Path(path).absolute()
    for d in (p, p.parent, p.parent.parent):
        if (d / "config.json").is_file() and (d / "train").is_dir():
            try:
                return d, str(json.loads((d / "config.json").read_text()).get("model", "embedded"))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{d / 'config.json'}: invalid JSON ({e})") from None
    return None


def dense_source(path) -> str | Path:
    """Where the dense model of a run (or a dense checkpoint path itself) lives, for ``load_model``."""
    run = run_source(path)
    if run is None:
        return path
    d, model = run
    if model == TINY_RANDOM_SOURCE:
        return d / "tiny_model"
    return "embedded" if model in ("embedded", "") else model


def load_tokenizer_for(path) -> Tokenizer:
    """The tokenizer that goes with a Read-ME model folder: the export's ``tokenizer.json``, or the run's
    source model's (the embedded GGUF, a .gguf file, an HF directory, or a hub id's snapshot)."""
    p = Path(path)
    if (p / "tokenizer.json").is_file():
        return tokenizer_from_hf(p)
    src = dense_source(p)
    if src == "embedded":
        return tokenizer_from_gguf(embedded_gguf_path())
    src = resolve_source(src)
    if src.suffix == ".gguf" and src.is_file():
        return tokenizer_from_gguf(src)
    if (src / "tokenizer.json").is_file():
        return tokenizer_from_hf(src)
    raise CheckpointError(f"no tokenizer for {p}: no tokenizer.json there and its source {src} has none")


# ----------------------------------------------------------------------------- one door


def load_readme(path) -> ReadMEModel:
    """The Read-ME model in ``path``: a run folder (its ``train/final``), an orbax pair, or an export."""
    p = Path(path)
    if (p / EXPORT_INFO).is_file():
        return _load_export(p)
    if (p / "train" / "final").is_dir():
        p = p / "train" / "final"
    if is_orbax_dir(p / "router") and is_orbax_dir(p / "backbone"):
        return _load_pair(p)
    if not p.exists():
        raise CheckpointError(f"no Read-ME model at {p}: the path does not exist")
    raise CheckpointError(f"no Read-ME model at {p}: expected a run folder (train/final/), a folder with "
                          f"router/ and backbone/ checkpoints, or an export ({EXPORT_INFO} + {EXPORT_TENSORS})")

"""What each stage of the main job depends on, and the fingerprint that proves a finished stage may
be reused.

A stage's fingerprint hashes the settings it reads (config keys, dotted) and those of every stage it
reads from, plus the identity of the source model files. ``done.json`` records both the fingerprint
and the settings, so a rerun with other settings names exactly the keys that changed. A stage whose
own keys did not change but whose upstream did is stale too (its settings include the upstream's).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from readme_jax import config as config_mod
from readme_jax.checkpoints import embedded_gguf_path, is_hub_id
from readme_jax.checkpoints.readme_io import TINY_RANDOM_SOURCE
from readme_jax.config import RunConfig

# stage -> (config keys it reads itself, stages whose outputs it reads)
STAGE_DEPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "chat_data": (("model", "dtype", "data", "seed"), ()),
    "dense_eval": (("model", "dtype", "data", "eval", "seed"), ("chat_data",)),
    "refactor": (("model", "dtype", "data", "convert"), ("chat_data",)),
    "refactor_eval": (("eval", "impl"), ("refactor",)),
    "train": (("seed", "router", "train", "impl", "mesh", "eval.seq_len"), ("refactor",)),
    "baseline": (("seed", "train.rounds", "train.experts", "train.weight_decay", "train.clip_norm",
                  "train.train_embeddings", "train.seed", "train.expert_loss", "train.lm_weight",
                  "train.kd_temperature", "train.chat_weight"), ("refactor",)),
    "final_eval": (("eval", "impl"), ("train", "baseline", "refactor_eval")),
    "chat_eval": (("eval", "impl"), ("train", "baseline")),
    "serve_bench": (("serve", "impl"), ("train",)),
    "report": ((), ("chat_data", "dense_eval", "refactor_eval", "train", "baseline", "final_eval", "chat_eval",
                    "serve_bench")),
}
STAGE_ORDER = tuple(STAGE_DEPS)
# files (relative to the stage folder) a finished stage must have, beside done.json
STAGE_ARTIFACTS: dict[str, tuple[str, ...]] = {
    "refactor": ("stats.npz", "experts.npz", "moe/meta.json", "moe/params", "pruned/meta.json", "pruned/params"),
    "train": ("final/backbone/meta.json", "final/backbone/params", "final/router/meta.json", "final/router/params"),
    "baseline": ("pruned_tuned/meta.json", "pruned_tuned/params"),
}
# files inside a stage folder that carry their own key and are reused only when it matches
SELF_KEYED = frozenset({"calib_partial"})
# settings that change no result (where and how often to checkpoint, what is logged, whether the backward
# pass recomputes layers: the same gradients up to float32 rounding, tests/test_remat.py): left out of
# fingerprints
NO_RESULT_KEYS = frozenset({"train.checkpoint_every", "train.wandb_project", "train.remat"})
# (stage, upstream) -> the upstream settings the stage's input depends on, where it reads only part of
# the upstream's outputs: the baseline reads refactor's pruned model, which ignores the expert layout
PARTIAL_READS: dict[tuple[str, str], tuple[str, ...]] = {
    ("baseline", "refactor"): ("model", "dtype", "data", "seed", "convert.r", "convert.calib_samples",
                               "convert.calib_seq_len", "convert.batch_size", "convert.calib_sampling",
                               "convert.score", "convert.refit", "convert.refit_ridge"),
}


def _keys(stage: str) -> set[str]:
    own, ups = STAGE_DEPS[stage]
    keys = set(own)
    for up in ups:
        keys |= set(PARTIAL_READS[(stage, up)]) if (stage, up) in PARTIAL_READS else _keys(up)
    return keys


def stage_keys(stage: str) -> tuple[str, ...]:
    """Every config key (dotted) a stage's outputs depend on, its upstream stages' included."""
    return tuple(sorted(_keys(stage)))


def downstream(stage: str) -> tuple[str, ...]:
    """The stages that read ``stage``'s outputs, directly or not (in run order)."""
    out = {stage}
    for s in STAGE_ORDER:
        if any(up in out for up in STAGE_DEPS[s][1]):
            out.add(s)
    return tuple(s for s in STAGE_ORDER if s in out and s != stage)


def _lookup(tree: dict, key: str):
    node = tree
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else None
    return node


def flat(tree, prefix: str) -> dict:
    """``{"a.b.c": leaf}`` of a nested dict (lists and tuples are leaves)."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: tree}


def source_identity(cfg: RunConfig) -> dict:
    """What identifies the source model's files: name, size and modification time of each."""
    if cfg.model == TINY_RANDOM_SOURCE:
        return {"tiny-random": cfg.seed}
    if is_hub_id(cfg.model):  # the id, not the files: a new hub revision does not invalidate finished stages
        return {"hub": cfg.model}
    path = embedded_gguf_path() if cfg.model in ("embedded", "") else Path(cfg.model)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    out = {}
    for f in files:
        try:
            st = f.stat()
            out[f.name] = [st.st_size, st.st_mtime_ns]
        except OSError:
            out[f.name] = None
    return {"path": str(path.resolve()), "files": out}


def stage_settings(cfg: RunConfig, stage: str, source: dict | None = None) -> dict:
    """The flat settings a stage depends on: ``{"convert.r": 0.5, ..., "source": {...}}``."""
    tree = json.loads(json.dumps(config_mod.to_dict(cfg), default=list))
    out = {}
    for key in stage_keys(stage):
        out.update({k: v for k, v in flat(_lookup(tree, key), key).items() if k not in NO_RESULT_KEYS})
    out["source"] = source if source is not None else source_identity(cfg)
    return out


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_keys(recorded: dict, current: dict) -> list[str]:
    """``["convert.r: 0.5 -> 0.25", ...]`` for every key whose value differs (missing counts)."""
    out = []
    for k in sorted(set(recorded) | set(current)):
        a, b = recorded.get(k, "<unset>"), current.get(k, "<unset>")
        if a != b:
            out.append(f"{k}: {_short(a)} -> {_short(b)}" if k != "source" else "source model files changed")
    return out


def _short(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."

"""What every stage of the main job shares: the config, the output folder, the model, the data.

Each stage writes into ``<output_dir>/<stage>/`` and finishes by writing ``<stage>/done.json``;
a rerun skips stages that have it (resume), so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import functools
import json
import os
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from flax import nnx

from readme_jax import config as config_mod
from readme_jax.checkpoints import embedded_gguf_path, is_hub_id, load_model, save_hf, tokenizer_from_gguf
from readme_jax.checkpoints.readme_io import TINY_RANDOM_SOURCE
from readme_jax.config import ModelConfig, RunConfig
from readme_jax.data import CHAT_DOMAIN, block_starts, domain_meta, prepare_domains, token_stream
from readme_jax.data.ood import OOD_SETS, ood_text
from readme_jax.errors import ConfigError, DataError, NumericsError
from readme_jax.fsutil import DirLock, atomic_dir, check_no_escaping_links, remove_tree
from readme_jax.jsonfile import read_json, write_json
from readme_jax.model.llama import Llama
from readme_jax.workflow import stages




def make_tiny_random_model(path: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama (HF directory) with the embedded SmolLM2 tokenizer: ``model: tiny-random``
    runs every stage in minutes, for smoke tests, CI and notebooks. Its numbers mean nothing."""
    if (path / "config.json").is_file():
        return path
    tok = tokenizer_from_gguf(embedded_gguf_path())
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      ffn_dim=128, rope_theta=10000.0, tie_embeddings=True, max_seq_len=512)
    with atomic_dir(path, overwrite=True) as tmp:
        save_hf(tmp, cfg, Llama(cfg, rngs=nnx.Rngs(seed)).arrays(), tokenizer=tok)
    return path


def check_output_dir(path: Path) -> Path:
    """Create the output folder and prove it is writable, or raise ConfigError before any work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output_dir {str(path)!r} is not writable: {e.strerror or e}") from None
    return path


def _artifact_ok(path: Path) -> bool:
    """Present, and for ``.npz`` files a readable archive (its index is read, not its arrays)."""
    if not path.exists():
        return False
    if path.suffix == ".npz":
        try:
            with np.load(path) as z:
                z.files
        except (OSError, ValueError, zipfile.BadZipFile):
            return False
    return True


def check_lengths(cfg: RunConfig, context: int) -> None:
    """Every sequence length the run uses fits the model's context, or a ConfigError naming the key."""
    lengths = {"eval.seq_len": cfg.eval.seq_len, "convert.calib_seq_len": cfg.convert.calib_seq_len,
               "train.router.seq_len": cfg.train.router.seq_len, "train.experts.seq_len": cfg.train.experts.seq_len}
    over = {k: v for k, v in lengths.items() if v > context}
    if over:
        k, v = next(iter(over.items()))
        raise ConfigError(f"{k}={v} exceeds the model's context of {context} tokens"
                          + (f" (also {sorted(over)[1:]})" if len(over) > 1 else ""))


class Workspace:
    """One run's output folder. Opening one writes nothing; :meth:`prepare` (called by ``run``) takes
    the folder's lock, checks that every finished stage was made with this config (fingerprints,
    workflow/stages.py) and only then records the config in ``config.json``."""

    def __init__(self, cfg: RunConfig, progress: bool = True, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.progress = progress
        self.log = log
        self.out = Path(cfg.output_dir)
        self._check_model_source()
        self._lock: DirLock | None = None
        self._source: dict | None = None

    def _check_model_source(self):
        m = self.cfg.model
        if m not in ("embedded", "", TINY_RANDOM_SOURCE) and not Path(m).exists() and not is_hub_id(m):
            raise ConfigError(f"model: path {m!r} does not exist (expected 'embedded', a .gguf file, an HF directory "
                              "or a Hugging Face hub id org/name)")

    # ------------------------------------------------------------------ before any work

    def prepare(self, recompute: bool = False) -> "Workspace":
        """Lock the folder, check reuse (refuse or, with ``recompute``, invalidate stale stages),
        then write ``config.json``. Raises ConfigError before any stage runs."""
        check_output_dir(self.out)
        check_no_escaping_links(self.out)
        self._lock = DirLock(self.out).acquire()
        try:
            stale = self.stale_stages()
            if stale and not recompute:
                lines = "; ".join(f"{s} ({', '.join(why[:4])}{' ...' if len(why) > 4 else ''})"
                                  for s, why in stale.items())
                raise ConfigError(f"{self.out} holds stages made with other settings: {lines}. Use another "
                                  "output_dir, or pass --recompute to redo them and every stage after them")
            for name in stale:
                self.log(f"recomputing {name}: {', '.join(stale[name])}")
                self.clear_stage(name)
            write_json(self.out / "config.json", config_mod.to_dict(self.cfg))
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def stale_stages(self) -> dict[str, list[str]]:
        """``{stage: [why, ...]}`` for every stage, finished or started, this config may not reuse
        (an unfinished stage's resume state, e.g. training checkpoints, counts too)."""
        out = {}
        for name in stages.STAGE_ORDER:
            info, unfinished = self._read_done(name), False
            if info is None:
                info, unfinished = self._read_started(name), True
                if info is None:
                    continue
            current = self.settings(name)
            if info.get("fingerprint") != stages.fingerprint(current):
                if "settings" not in info:
                    why = ["no fingerprint (made by an older readme-jax)"]
                else:
                    why = stages.changed_keys(info["settings"], current) or ["fingerprint differs"]
                out[name] = (["unfinished"] if unfinished else []) + why
        return out

    def _read_started(self, name: str) -> dict | None:
        path = self.out / name / "started.json"
        if not path.is_file():
            return None
        try:
            return read_json(path)
        except (OSError, ValueError):
            return {}  # unreadable: treated as made with other settings

    def start_stage(self, name: str) -> None:
        """Before a stage runs: drop its old done.json (a kill must not leave it "done") and record the
        settings its partial outputs (resume state) are made with."""
        d = self.stage_dir(name)
        (d / "done.json").unlink(missing_ok=True)
        settings = self.settings(name)
        write_json(d / "started.json", {"fingerprint": stages.fingerprint(settings), "settings": settings})

    def clear_stage(self, name: str) -> None:
        """Remove a stale stage's outputs and resume state (never following links); inputs keyed by
        their own settings (calibration partials) stay."""
        d = self.out / name
        if d.is_dir() and not d.is_symlink():
            for child in d.iterdir():
                if child.name not in stages.SELF_KEYED:
                    remove_tree(child)

    def settings(self, stage: str) -> dict:
        if self._source is None:
            self._source = stages.source_identity(self.cfg)
        return stages.stage_settings(self.cfg, stage, self._source)

    # ------------------------------------------------------------------ stages

    def stage_dir(self, name: str) -> Path:
        d = self.out / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _read_done(self, name: str) -> dict | None:
        """The stage's done.json if it is valid JSON and its artifacts are all there, else None
        (the stage then counts as not done and is recomputed; the reason is logged)."""
        path = self.out / name / "done.json"
        if not path.is_file():
            return None
        try:
            info = read_json(path)
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            self.log(f"{path}: unreadable ({e}); the stage will be recomputed")
            return None
        missing = [a for a in stages.STAGE_ARTIFACTS.get(name, ()) if not _artifact_ok(self.out / name / a)]
        if missing:
            self.log(f"{path}: its outputs {missing} are missing or unreadable; the stage will be recomputed")
            return None
        if name == "chat_data" and info.get("enabled") and info.get("key") != self._cached_chat_key():
            self.log(f"{path}: the cached chat domain is not the one this run made (another model or setting "
                     "wrote it since); the stage will be recomputed")
            return None
        return info

    def _cached_chat_key(self) -> str | None:
        meta = domain_meta(CHAT_DOMAIN, self.cfg.data.cache_dir)
        return None if meta is None else meta.get("provenance", {}).get("key")

    def is_done(self, name: str) -> bool:
        return self._read_done(name) is not None

    def done_info(self, name: str) -> dict:
        info = self._read_done(name)
        if info is None:
            raise ConfigError(f"{self.out / name}: stage {name!r} has not finished (run `readme-jax run` first)")
        return info

    def mark_done(self, name: str, info: dict, seconds: float):
        settings = self.settings(name)
        info = {**info, "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                "fingerprint": stages.fingerprint(settings), "settings": settings}
        try:
            write_json(self.out / name / "done.json", info, strict=True)
        except ValueError as e:
            raise NumericsError(f"stage {name} produced {e}: the model or its data is broken (NaN/Inf); "
                                "the stage is not marked done") from None

    # ------------------------------------------------------------------ model and data

    @functools.cached_property
    def dense(self):
        """``(Llama, Tokenizer)`` of the dense source model."""
        self.log(f"loading dense model {self.cfg.model!r}")
        if self.cfg.model == TINY_RANDOM_SOURCE:
            got = load_model(make_tiny_random_model(self.out / "tiny_model", self.cfg.seed), self.cfg.dtype)
        else:
            got = load_model(None if self.cfg.model in ("embedded", "") else self.cfg.model, self.cfg.dtype)
        check_lengths(self.cfg, got[0].cfg.max_seq_len)
        return got

    @property
    def tokenizer(self):
        return self.dense[1]

    @property
    def sep_id(self) -> int | None:
        """Document separator in token streams: ``<|endoftext|>`` when the vocabulary has it
        (SmolLM2's eos is the chat ``<|im_end|>``), else the tokenizer's eos."""
        tid = self.tokenizer.token_to_id("<|endoftext|>")
        return tid if tid is not None else self.tokenizer.eos_id

    @functools.cached_property
    def domains(self) -> list[str]:
        """The experts' domains, in expert order: the text domains, then ``chat`` when ``data.chat_prompts`` > 0
        (written by the chat_data stage)."""
        return self.text_domains + ([CHAT_DOMAIN] if self.cfg.data.chat_prompts > 0 else [])

    @functools.cached_property
    def text_domains(self) -> list[str]:
        """The fetched text domains (data.domains, or every one available here)."""
        d = self.cfg.data
        names = list(d.domains) or None
        report = prepare_domains(names, allow_apt=d.allow_apt, progress=self.progress, cache_dir=d.cache_dir)
        got = list(report.available)
        if names:
            missing = [n for n in names if n not in got]
            if missing:
                raise DataError(f"data.domains asks for {missing}, which are unavailable here")
            got = names
        if len(got) < 2:
            raise DataError(f"need at least 2 text domains (one expert each), found {got}")
        self.log(f"text domains: {', '.join(got)}" + (" (+ chat)" if self.cfg.data.chat_prompts else ""))
        return got

    def blocks(self, domain: str, split: str, seq_len: int, n: int, offset: int = 0,
               sampling: str = "head") -> np.ndarray:
        """``[n, seq_len+1]`` int32 blocks of a split (fewer if the split is short): the first ones, or
        ``sampling="spread"`` evenly spaced over the split (``data.block_starts``), in stream order."""
        stream = token_stream(domain, split, self.tokenizer, sep_id=self.sep_id, cache_dir=self.cfg.data.cache_dir,
                              progress=self.progress)
        try:
            starts = block_starts(stream.shape[0], seq_len, n, sampling, offset)
        except DataError as e:
            raise DataError(f"{domain}/{split}: {e}") from None
        idx = starts[:, None] + np.arange(seq_len + 1)[None]
        return np.asarray(stream[idx.reshape(-1)], np.int32).reshape(len(starts), seq_len + 1)

    def ood_blocks(self) -> tuple[dict[str, np.ndarray], dict]:
        """``({set: [n, seq_len+1] blocks}, {set: provenance})`` of the out-of-domain text (data/ood.py):
        ``eval.ood_tokens // eval.seq_len`` blocks evenly spaced over each set; empty when ood_tokens is 0."""
        e = self.cfg.eval
        n = e.ood_tokens // e.seq_len
        blocks, prov = {}, {}
        if n == 0:
            return blocks, prov
        for name in OOD_SETS:
            text, prov[name] = ood_text(name)
            ids = np.asarray(self.tokenizer.encode(text, add_bos=False), np.int32)
            starts = block_starts(ids.shape[0], e.seq_len, n, "spread")
            blocks[name] = ids[starts[:, None] + np.arange(e.seq_len + 1)[None]]
            prov[name]["tokens"] = int(ids.shape[0])
        return blocks, prov

    def eval_blocks(self) -> dict[str, np.ndarray]:
        e = self.cfg.eval
        return {d: self.blocks(d, e.split, e.seq_len, e.blocks_per_domain, sampling=e.sampling) for d in self.domains}


def seed_of(*parts) -> int:
    return zlib.crc32(json.dumps(parts).encode()) & 0x7FFFFFFF

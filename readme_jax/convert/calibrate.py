"""Calibration statistics for Read-ME expert extraction.

For every domain, layer and FFN channel we accumulate the sum over tokens of
``|silu(h Wg) * (h Wu)|`` (the input of the down projection, ``layers.ffn_hidden``), the sum of its
square, and the number of counted tokens, so ``mean = sums / tokens`` and ``mean_sq = sq_sums / tokens``
(the second feeds the output-aware channel score, ``convert.score: output``). The dense forward runs
unchanged (``decoder.forward`` with a FFN that also returns these per-layer sums as its aux output).

Batches are ``int[B, T]`` token arrays or ``(tokens_BT, mask_BT)`` pairs; masked-out tokens
(mask False) are not counted. The mask does not change attention: pad only at the END of a
row (causal attention keeps real tokens blind to later padding).

Per-batch sums are float32 on device and accumulated in float64 on the host.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from readme_jax.config import ModelConfig, to_dict
from readme_jax.errors import DataError, ShapeError
from readme_jax.model import decoder, layers

STATISTIC = "mean over tokens of |silu(x Wg) * (x Wu)| (and of its square) per layer and FFN channel"
_FORMAT = "readme-jax-calibration-stats-v2"
_READABLE = ("readme-jax-calibration-stats-v1", _FORMAT)  # v1: no squared sums


@dataclasses.dataclass(frozen=True)
class CalibrationStats:
    """Per-domain channel statistics: ``mean_NLF = sums_NLF / tokens_N[:, None, None]``.

    ``provenance`` is a JSON-able dict: model_id, model_config, statistic, domains, and per
    domain ``tokens`` (counted), ``samples`` (sequences seen) and ``seq_lens`` (distinct T).
    """

    domains: tuple[str, ...]
    sums_NLF: np.ndarray  # float64
    tokens_N: np.ndarray  # int64, counted tokens per domain
    provenance: dict
    sq_sums_NLF: np.ndarray | None = None  # float64 sums of h^2 (None: stats made without them)

    def mean(self) -> np.ndarray:
        """Mean |h| per domain, layer, channel: float64 ``[N, L, F]``."""
        return self.sums_NLF / self.tokens_N[:, None, None]

    def mean_sq(self) -> np.ndarray:
        """Mean h^2 per domain, layer, channel: float64 ``[N, L, F]``."""
        if self.sq_sums_NLF is None:
            raise DataError("these calibration stats hold no squared sums (made by an older readme-jax): recompute")
        return self.sq_sums_NLF / self.tokens_N[:, None, None]

    def pooled_mean(self) -> np.ndarray:
        """Mean |h| over all domains' tokens pooled together: float64 ``[L, F]``."""
        return self.sums_NLF.sum(0) / self.tokens_N.sum()

    def select(self, names: Iterable[str]) -> "CalibrationStats":
        """The stats of the named domains only, in the given order."""
        names = tuple(names)
        missing = [n for n in names if n not in self.domains]
        if missing:
            raise DataError(f"calibration stats have no domain(s) {missing}; available: {list(self.domains)}")
        idx = [self.domains.index(n) for n in names]
        return _assemble(names, self.sums_NLF[idx], self.tokens_N[idx], self.provenance,
                         {n: _domain_prov(self.provenance, n) for n in names},
                         None if self.sq_sums_NLF is None else self.sq_sums_NLF[idx])


def _domain_prov(prov: dict, name: str) -> dict:
    return {k: prov[k][name] for k in ("tokens", "samples", "seq_lens")}


def _assemble(domains, sums_NLF, tokens_N, base_prov: dict, per_domain: dict, sq_sums_NLF=None) -> CalibrationStats:
    prov = {k: base_prov[k] for k in ("model_id", "model_config", "statistic", "inputs") if k in base_prov}
    prov["domains"] = list(domains)
    for k in ("tokens", "samples", "seq_lens"):
        prov[k] = {n: per_domain[n][k] for n in domains}
    sq = None if sq_sums_NLF is None else np.asarray(sq_sums_NLF, np.float64)
    return CalibrationStats(tuple(domains), np.asarray(sums_NLF, np.float64), np.asarray(tokens_N, np.int64), prov, sq)


# ----------------------------------------------------------------------------- the jitted step


def _calibration_ffn(lp: dict, h_BTD, mask_BT):
    """Dense SwiGLU that also returns ``sum_tokens |h|`` and ``sum_tokens h^2`` (h = silu(x Wg) * (x Wu)),
    each ``[F]`` float32."""
    hid_BTF = layers.ffn_hidden(h_BTD, lp["wg"], lp["wu"])
    y = jnp.dot(hid_BTF, lp["wd"], preferred_element_type=jnp.float32).astype(h_BTD.dtype)
    a = jnp.abs(hid_BTF).astype(jnp.float32)
    sum_F = jnp.einsum("btf,bt->f", a, mask_BT, preferred_element_type=jnp.float32)
    sq_F = jnp.einsum("btf,bt->f", a * a, mask_BT, preferred_element_type=jnp.float32)
    return y, (sum_F, sq_F)


def _step(params: dict, tokens_BT, mask_BT, *, cfg: ModelConfig):
    _, _, (sums_LF, sq_LF) = decoder.forward(params, cfg, tokens_BT, ffn=_calibration_ffn, ffn_ctx=mask_BT,
                                             logits=False)
    return sums_LF, sq_LF


# One compiled program per (cfg, batch shape); params are traced arguments, never re-traced.
calibration_step = jax.jit(_step, static_argnames=("cfg",))


# ----------------------------------------------------------------------------- driver


def _check_params(params: dict, cfg: ModelConfig) -> None:
    L, D, F = cfg.n_layers, cfg.d_model, cfg.ffn_dim
    want = {"wg": (L, D, F), "wu": (L, D, F), "wd": (L, F, D)}
    lp = params.get("layers") if isinstance(params, Mapping) else None
    if not isinstance(lp, Mapping):
        raise ShapeError("calibrate: model_arrays has no 'layers' group (expected the decoder.forward layout)")
    for name, shape in want.items():
        if name not in lp:
            raise ShapeError(f"calibrate: model_arrays is missing 'layers.{name}' (expected shape {shape})")
        if tuple(lp[name].shape) != shape:
            raise ShapeError(f"calibrate: 'layers.{name}' has shape {tuple(lp[name].shape)}, but the model "
                             f"config (L={L}, D={D}, F={F}) expects {shape}")


def _as_batch(batch, domain: str, i: int, vocab: int):
    """Normalize a batch to ``(tokens int32[B,T], mask float32[B,T])`` or raise DataError."""
    if isinstance(batch, tuple):
        if len(batch) != 2:
            raise DataError(f"domain {domain!r}, batch {i}: expected tokens or (tokens, mask), "
                            f"got a tuple of {len(batch)}")
        tokens, mask = batch
    else:
        tokens, mask = batch, None
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"domain {domain!r}, batch {i}: expected integer tokens [B, T], "
                        f"got {tokens.dtype} {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        raise DataError(f"domain {domain!r}, batch {i}: token ids must lie in [0, {vocab}), "
                        f"found range [{tokens.min()}, {tokens.max()}]")
    if mask is None:
        mask = np.ones(tokens.shape, np.float32)
    else:
        mask = np.asarray(mask)
        if mask.shape != tokens.shape:
            raise DataError(f"domain {domain!r}, batch {i}: mask shape {mask.shape} differs from "
                            f"tokens shape {tokens.shape}")
        mask = (mask != 0).astype(np.float32)
    return tokens.astype(np.int32), mask


def _run_domain(params, cfg: ModelConfig, name: str, batches, progress: bool):
    F, L = cfg.ffn_dim, cfg.n_layers
    sums = np.zeros((L, F), np.float64)
    sq = np.zeros((L, F), np.float64)
    tokens = 0
    samples = 0
    seq_lens: set[int] = set()
    bar = tqdm(batches, desc=f"calibrate {name}", unit="batch", disable=not progress, leave=False)
    for i, batch in enumerate(bar):
        toks, mask = _as_batch(batch, name, i, cfg.vocab_size)
        n = int(mask.sum())
        if n == 0:
            continue
        a, b = calibration_step(params, toks, mask, cfg=cfg)
        sums += np.asarray(a, np.float64)
        sq += np.asarray(b, np.float64)
        tokens += n
        samples += int(toks.shape[0])
        seq_lens.add(int(toks.shape[1]))
        bar.set_postfix(tokens=tokens)
    bar.close()
    if tokens == 0:
        raise DataError(f"calibration domain {name!r} produced no calibration tokens "
                        f"(empty batch iterable or every token masked out)")
    if not (np.isfinite(sums).all() and np.isfinite(sq).all()):
        bad = sorted({int(l) for l in np.nonzero(~(np.isfinite(sums) & np.isfinite(sq)))[0]})
        raise DataError(f"calibration domain {name!r}: non-finite statistic in layer(s) {bad} "
                        f"(check the model weights for inf/nan)")
    return sums, sq, tokens, {"tokens": tokens, "samples": samples, "seq_lens": sorted(seq_lens)}


def _partial_path(partial_dir: Path, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64]
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return partial_dir / f"{safe}-{digest}.npz"


def calibrate(model_arrays: dict, cfg: ModelConfig, batches_by_domain: Mapping[str, Iterable], *,
              model_id: str = "unknown", partial_dir: str | Path | None = None,
              progress: bool = True, inputs: dict | None = None) -> CalibrationStats:
    """Run the dense model over each domain's batches and collect channel statistics.

    ``model_arrays`` is the dense ``decoder.forward`` param dict. With ``partial_dir``, each
    finished domain is saved there and a rerun loads it instead of iterating its batches
    (the saved model_id and model config must match). ``inputs`` (JSON-able: the settings that
    made the batches) is recorded; a saved domain made from other ``inputs`` is recomputed. Domains keep the mapping's order.
    Raises DataError for a domain without counted tokens.
    """
    if not batches_by_domain:
        raise DataError("calibrate: batches_by_domain is empty; give at least one domain")
    for name in batches_by_domain:
        if not isinstance(name, str) or not name:
            raise DataError(f"calibrate: domain names must be non-empty strings, got {name!r}")
    _check_params(model_arrays, cfg)
    params = jax.tree.map(jnp.asarray, model_arrays)  # to device once, outside the batch loop
    base = {"model_id": model_id, "model_config": to_dict(cfg), "statistic": STATISTIC}
    inputs = json.loads(json.dumps(inputs if inputs is not None else {}, default=list))
    pdir = Path(partial_dir) if partial_dir is not None else None
    if pdir is not None:
        pdir.mkdir(parents=True, exist_ok=True)

    names = list(batches_by_domain)
    sums, sqs, toks, per_domain = [], [], [], {}
    for name in names:
        part = _partial_path(pdir, name) if pdir is not None else None
        done = _load_partial(part)
        if done is not None and done.provenance.get("inputs") == inputs:
            _check_resumed(done, part, name, base)
            s, q, t = done.sums_NLF[0], done.sq_sums_NLF[0], int(done.tokens_N[0])
            info = _domain_prov(done.provenance, name)
        else:  # none yet, or made from other inputs (calibration settings, data): recompute
            s, q, t, info = _run_domain(params, cfg, name, batches_by_domain[name], progress)
            if part is not None:
                save_stats(part, _assemble((name,), s[None], [t], {**base, "inputs": inputs}, {name: info}, q[None]))
        sums.append(s)
        sqs.append(q)
        toks.append(t)
        per_domain[name] = info
    return _assemble(names, np.stack(sums), np.asarray(toks), {**base, "inputs": inputs}, per_domain, np.stack(sqs))


def _load_partial(path: Path | None) -> CalibrationStats | None:
    """A finished domain's saved stats, or None (none saved, or saved in an older format: recomputed)."""
    if path is None or not path.exists():
        return None
    try:
        done = load_stats(path)
    except DataError:
        return None
    return done if done.sq_sums_NLF is not None else None


def _check_resumed(done: CalibrationStats, path: Path, name: str, base: dict) -> None:
    prov = done.provenance
    if done.domains != (name,):
        raise DataError(f"partial stats {path} hold domains {list(done.domains)}, expected [{name!r}]; "
                        f"delete the file to recompute")
    for key in ("model_id", "model_config"):
        if prov.get(key) != base[key]:
            raise DataError(f"partial stats {path} were computed with {key}={prov.get(key)!r}, but this run "
                            f"uses {base[key]!r}; delete the file (or the partial directory) to recompute")


# ----------------------------------------------------------------------------- files


def save_stats(path: str | Path, stats: CalibrationStats) -> None:
    """Write stats to one ``.npz`` (sums, tokens, provenance as a JSON string), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        extra = {} if stats.sq_sums_NLF is None else {"sq_sums_NLF": stats.sq_sums_NLF.astype(np.float64)}
        np.savez(f, format=np.array(_FORMAT), sums_NLF=stats.sums_NLF.astype(np.float64),
                 tokens_N=stats.tokens_N.astype(np.int64), domains=np.array(list(stats.domains), dtype=str),
                 provenance_json=np.array(json.dumps(stats.provenance, sort_keys=True)), **extra)
    os.replace(tmp, path)


def load_stats(path: str | Path) -> CalibrationStats:
    """Read stats written by :func:`save_stats`; DataError if missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"calibration stats file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            fmt = str(z["format"])
            sums = np.asarray(z["sums_NLF"], np.float64)
            tokens = np.asarray(z["tokens_N"], np.int64)
            domains = tuple(str(d) for d in z["domains"])
            prov = json.loads(str(z["provenance_json"]))
            sq = np.asarray(z["sq_sums_NLF"], np.float64) if "sq_sums_NLF" in z.files else None
    except (KeyError, ValueError, OSError) as e:
        raise DataError(f"calibration stats file {path} is unreadable or incomplete: {e}") from None
    if fmt not in _READABLE:
        raise DataError(f"calibration stats file {path}: format {fmt!r}, expected {_FORMAT!r}")
    n = len(domains)
    if sums.ndim != 3 or sums.shape[0] != n or tokens.shape != (n,) or (sq is not None and sq.shape != sums.shape):
        raise DataError(f"calibration stats file {path}: sums {sums.shape} / tokens {tokens.shape} "
                        f"disagree with {n} domains")
    return CalibrationStats(domains, sums, tokens, prov, sq)

"""Expert extraction: channel selection per domain and the physical expert weights.

Expert ``e`` of layer ``l`` is the set of FFN channels (columns of Wg/Wu, rows of Wd) with the
``F_e = expert_width(F, r)`` largest calibration statistics of domain ``e``. The channels every
expert keeps form the permanent expert. Two physical layouts (see docs/CONVERT.md):

* ``fixed`` (default, what the MoE model uses): each expert holds all its F_e channels,
  permanent ones included: ``wg, wu: [L, E, D, F_e]``, ``wd: [L, E, F_e, D]``.
* ``split``: a shared permanent FFN ``[L, D, P_max]`` plus expert remainders ``[L, E, D, R_max]``,
  zero-padded (zero columns contribute exactly 0) with valid counts recorded.
* ``split_min``: the shared FFN holds only ``P_min = min_l P_l`` permanent channels per layer
  (lowest indices first); each layer's other permanent channels stay in every expert's remainder,
  so every width is exact (``P_min`` and ``F_e - P_min``) and nothing is padded.

Column ``j`` of an expert came from dense channel ``channel_index[..., j]`` (ascending; -1 = pad).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from readme_jax.config import EXPERT_LAYOUTS, ModelConfig
from readme_jax.convert.calibrate import load_stats
from readme_jax.errors import ConfigError, ShapeError
from readme_jax.model.moe import SHARED_KEYS

FFN_KEYS = ("wg", "wu", "wd")


def expert_width(ffn_dim: int, r: float) -> int:
    """``F_e = round(r * F)`` with halves rounded up; ConfigError unless 0 < r <= 1 and F_e >= 1."""
    if isinstance(r, bool) or not isinstance(r, (int, float, np.floating)) or not math.isfinite(r):
        raise ConfigError(f"expert ratio r must be a number in (0, 1], got {r!r}")
    if not 0.0 < r <= 1.0:
        raise ConfigError(f"expert ratio r must lie in (0, 1], got {r}")
    width = int(math.floor(r * ffn_dim + 0.5))
    if width < 1:
        raise ConfigError(f"expert ratio r={r} keeps round(r*F)={width} of F={ffn_dim} channels; need at least 1")
    return width


def top_channels(score_XF: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k highest scores on the last axis; ties go to the lower channel index."""
    order = np.argsort(-np.asarray(score_XF, np.float64), axis=-1, kind="stable")[..., :k]
    mask = np.zeros(np.shape(score_XF), bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask


CHANNEL_SCORES = ("activation", "output")


def channel_scores(stats, wd_LFD, score: str) -> tuple[np.ndarray, np.ndarray]:
    """``(per-domain [N, L, F], pooled [L, F])`` channel importance from calibration stats.

    ``activation`` (the paper): mean ``|h_c|``. ``output``: mean ``h_c^2 * ||Wd[c]||^2``, the expected
    squared size of what channel c adds to the FFN's output (how much cutting it alone would move the
    output), which sees that a channel with a small down-projection row matters little however active.
    """
    if score == "activation":
        return stats.mean(), stats.pooled_mean()
    if score != "output":
        raise ConfigError(f"convert.score must be one of {list(CHANNEL_SCORES)}, got {score!r}")
    wd = np.asarray(wd_LFD, np.float64)
    norm_LF = (wd * wd).sum(-1)
    sq = stats.mean_sq()
    if norm_LF.shape != sq.shape[1:]:
        raise ShapeError(f"channel_scores: down projections {wd.shape} do not match stats [.., L, F] = {sq.shape}")
    pooled = stats.sq_sums_NLF.sum(0) / stats.tokens_N.sum()
    return sq * norm_LF[None], pooled * norm_LF


def select_channels(stats_mean_NLF: np.ndarray, r: float, pooled_LF: np.ndarray | None = None,
                    shared_fraction: float = 0.0) -> np.ndarray:
    """Per domain and layer, keep exactly ``expert_width(F, r)`` channels: ``bool[N, L, F]``.

    ``shared_fraction`` = 0: each domain keeps its own top channels; the shared (permanent) part is
    whatever all domains happen to pick. ``shared_fraction`` = s > 0: every domain first keeps the
    ``round(s * width)`` channels with the largest pooled statistic (all domains' tokens), then fills
    the rest of its width with its own top channels among the others, so the shared part holds at
    least that many channels, each trained on every token.

    Ranking is a stable sort on (-score, channel index), so the result is deterministic.
    """
    s = np.asarray(stats_mean_NLF)
    if s.ndim != 3:
        raise ShapeError(f"select_channels: stats must be [n_domains, n_layers, ffn_dim], got shape {s.shape}")
    if s.size == 0:
        raise ShapeError(f"select_channels: stats are empty, shape {s.shape}")
    if not np.isfinite(s).all():
        raise ShapeError("select_channels: stats contain inf/nan at (domain, layer) "
                         f"{sorted({(int(a), int(b)) for a, b, _ in np.argwhere(~np.isfinite(s))})[:5]}")
    width = expert_width(s.shape[-1], r)
    if not 0 <= shared_fraction < 1:
        raise ConfigError(f"select_channels: shared_fraction must lie in [0, 1), got {shared_fraction!r}")
    n_forced = int(math.floor(shared_fraction * width + 0.5))
    if n_forced == 0:
        return top_channels(s, width)
    if pooled_LF is None:
        raise ShapeError("select_channels: shared_fraction > 0 needs the pooled statistic pooled_LF")
    p = np.asarray(pooled_LF, np.float64)
    if p.shape != s.shape[1:] or not np.isfinite(p).all():
        raise ShapeError(f"select_channels: pooled stats must be finite [n_layers, ffn_dim] = {s.shape[1:]}, "
                         f"got shape {p.shape}")
    forced_LF = top_channels(p, n_forced)
    rest = np.where(forced_LF[None], -np.inf, np.asarray(s, np.float64))
    return forced_LF[None] | top_channels(rest, width - n_forced)


def permanent_channels(masks_NLF: np.ndarray) -> np.ndarray:
    """Channels kept by every expert (the always-on permanent expert): ``bool[L, F]``."""
    return np.logical_and.reduce(_check_masks(masks_NLF)[0], axis=0)


def permanent_sizes(masks_NLF: np.ndarray) -> np.ndarray:
    """Number of permanent channels per layer: ``int64[L]``."""
    return permanent_channels(masks_NLF).sum(-1).astype(np.int64)


def expert_overlap(masks_NLF: np.ndarray) -> np.ndarray:
    """Shared fraction ``|A ∩ B| / F_e`` for every pair of experts: float64 ``[L, N, N]``.

    All experts have F_e channels, so this is also ``|A ∩ B| / |A|``; Jaccard is ``o / (2 - o)``.
    """
    m, fe = _check_masks(masks_NLF)
    inter = np.einsum("alf,blf->lab", m.astype(np.int64), m.astype(np.int64))
    return inter / fe


def _check_masks(masks_NLF) -> tuple[np.ndarray, int]:
    """Validate a mask stack (bool [N,L,F], same count everywhere); return it and F_e."""
    m = np.asarray(masks_NLF)
    if m.ndim != 3 or m.dtype != np.bool_:
        raise ShapeError(f"channel masks must be bool [n_experts, n_layers, ffn_dim], got {m.dtype} {m.shape}")
    counts = m.sum(-1)
    if m.size == 0 or counts.min() != counts.max() or counts.min() < 1:
        raise ShapeError(f"every (expert, layer) mask must keep the same number (>= 1) of channels; "
                         f"counts range over [{counts.min() if m.size else 0}, {counts.max() if m.size else 0}]")
    return m, int(counts.flat[0])


def _dense_ffn(dense_arrays: Mapping, masks_NLF: np.ndarray | None = None, where: str = "") -> dict:
    """The dense ``wg, wu: [L,D,F]``, ``wd: [L,F,D]`` as numpy, checked against the masks' [L, F]."""
    lp = dense_arrays.get("layers", dense_arrays) if isinstance(dense_arrays, Mapping) else None
    if lp is None or any(k not in lp for k in FFN_KEYS):
        raise ShapeError(f"{where}: expected dense arrays with 'layers.wg/wu/wd' (decoder.forward layout)")
    w = {k: np.asarray(lp[k]) for k in FFN_KEYS}
    if w["wg"].ndim != 3:
        raise ShapeError(f"{where}: 'layers.wg' must be [L, D, F], got shape {w['wg'].shape}")
    L, D, F = w["wg"].shape
    for k, shape in (("wu", (L, D, F)), ("wd", (L, F, D))):
        if w[k].shape != shape:
            raise ShapeError(f"{where}: 'layers.{k}' has shape {w[k].shape}, expected {shape} "
                             f"(from layers.wg {w['wg'].shape})")
    if masks_NLF is not None and tuple(masks_NLF.shape[1:]) != (L, F):
        raise ShapeError(f"{where}: channel masks/stats are [.., L={masks_NLF.shape[1]}, F={masks_NLF.shape[2]}] "
                         f"but the dense model has L={L}, F={F} (layers.wg {w['wg'].shape})")
    return w


def _require_full(dense_arrays, where: str) -> None:
    if not isinstance(dense_arrays, Mapping) or not isinstance(dense_arrays.get("layers"), Mapping):
        raise ShapeError(f"{where}: expected the full dense param dict with a 'layers' group "
                         f"(decoder.forward layout)")


def _sorted_index(mask_XF: np.ndarray, width: int) -> np.ndarray:
    """Indices of True entries on the last axis, ascending, padded with -1 to ``width``: int32."""
    count = mask_XF.sum(-1, keepdims=True)
    order = np.argsort(~mask_XF, axis=-1, kind="stable")[..., :width]
    return np.where(np.arange(width) < count, order, -1).astype(np.int32)


def _gather(w: dict, idx_LXK: np.ndarray) -> dict:
    """Gather channels ``idx [L, ..., K]`` (-1 = zero pad): wg/wu -> [L,...,D,K], wd -> [L,...,K,D]."""
    valid = idx_LXK >= 0
    safe = np.where(valid, idx_LXK, 0)
    L = idx_LXK.shape[0]
    g = {}
    for k in ("wg", "wu"):
        cols = np.stack([np.take(w[k][l], safe[l], axis=-1) for l in range(L)])  # [L, D, ..., K]
        cols = np.moveaxis(cols, 1, -2)  # [L, ..., D, K]
        g[k] = np.where(valid[..., None, :], cols, np.zeros((), cols.dtype))
    rows = np.stack([np.take(w["wd"][l], safe[l], axis=0) for l in range(L)])  # [L, ..., K, D]
    g["wd"] = np.where(valid[..., None], rows, np.zeros((), rows.dtype))
    return g


def extract_experts(dense_arrays: Mapping, masks_NLF: np.ndarray, layout: str = "fixed") -> dict:
    """Physical expert weights from a dense model and channel masks ``bool[E, L, F]``.

    ``fixed``: ``{"wg","wu": [L,E,D,F_e], "wd": [L,E,F_e,D], "channel_index": int32[L,E,F_e]}``.
    ``split`` / ``split_min``: ``{"shared_wg","shared_wu": [L,D,P], "shared_wd": [L,P,D],
    "shared_index": int32[L,P], "shared_count": int32[L], "wg","wu": [L,E,D,R], "wd": [L,E,R,D],
    "channel_index": int32[L,E,R], "expert_count": int32[L]}``; for ``split`` P = max_l P_l and
    R = F_e - min_l P_l (zero-padded), for ``split_min`` P = min_l P_l and R = F_e - P (exact).
    Arrays are numpy in the dense dtype; padding columns are zero and index -1.
    """
    masks, fe = _check_masks(masks_NLF)
    w = _dense_ffn(dense_arrays, masks, "extract_experts")
    m_LEF = np.swapaxes(masks, 0, 1)
    if layout == "fixed":
        idx = _sorted_index(m_LEF, fe)
        return {**_gather(w, idx), "channel_index": idx}
    if layout not in ("split", "split_min"):
        raise ConfigError(f"extract_experts: layout must be 'fixed', 'split' or 'split_min', got {layout!r}")
    shared_LF = np.logical_and.reduce(masks, axis=0)
    if layout == "split_min":
        shared_LF &= np.cumsum(shared_LF, axis=-1) <= shared_LF.sum(-1).min()
    s_L = shared_LF.sum(-1)
    shared_idx = _sorted_index(shared_LF, int(s_L.max()))
    expert_idx = _sorted_index(m_LEF & ~shared_LF[:, None, :], int(fe - s_L.min()))
    out = {f"shared_{k}": v for k, v in _gather(w, shared_idx).items()}
    out.update(shared_index=shared_idx, shared_count=s_L.astype(np.int32))
    out.update(_gather(w, expert_idx), channel_index=expert_idx, expert_count=(fe - s_L).astype(np.int32))
    return out


def layout_cost(masks_NLF: np.ndarray, k: int, d_model: int, bytes_per_param: int = 2) -> dict:
    """FFN weight bytes read by a batch touching ``k`` distinct experts, and FLOPs per token.

    Sums over layers; one channel is a column of Wg and Wu and a row of Wd (3 D params).
    ``split_exact`` is the unpadded ideal (P_l shared per layer, not a layout we build);
    ``split`` and ``split_min`` are what :func:`extract_experts` builds.
    """
    masks, fe = _check_masks(masks_NLF)
    if not 1 <= k <= masks.shape[0]:
        raise ConfigError(f"layout_cost: k must be in [1, {masks.shape[0]}] experts, got {k}")
    p_L = np.logical_and.reduce(masks, axis=0).sum(-1).astype(np.int64)
    L = len(p_L)
    P, p = int(p_L.max()), int(p_L.min())
    per_channel = 3 * d_model * bytes_per_param
    ch = {"fixed": L * k * fe, "split_exact": int((p_L + k * (fe - p_L)).sum()),
          "split": L * (P + k * (fe - p)), "split_min": L * (p + k * (fe - p))}
    flops = {"fixed": L * fe, "split_exact": L * fe, "split": L * (P + fe - p), "split_min": L * fe}
    return {"k": k, "expert_width": fe, "permanent_per_layer": p_L.tolist(),
            "bytes": {n: c * per_channel for n, c in ch.items()},
            "flops_per_token": {n: 2 * c * d_model * 3 for n, c in flops.items()}}


def moe_arrays_from_dense(dense_arrays: Mapping, masks_NLF: np.ndarray, *, domains: Sequence[str] | None = None,
                          r: float | None = None, layout: str = "split") -> tuple[dict, dict]:
    """The Read-ME MoE params and their metadata.

    ``params`` has the dense top-level and attention arrays (same objects, not copied) with the
    dense ``layers.wg/wu/wd`` replaced by the experts:

    * ``fixed``: ``wg, wu [L,E,D,F_e]``, ``wd [L,E,F_e,D]`` (shared channels copied into every expert);
    * ``split`` (default): ``shared_wg, shared_wu [L,D,P]``, ``shared_wd [L,P,D]`` (the channels every
      domain keeps, stored once) plus expert-specific ``wg, wu [L,E,D,R]``, ``wd [L,E,R,D]``; P and R
      are zero-padded to the widest layer (see :func:`extract_experts`). Zero columns add exactly 0,
      get zero gradient and zero weight decay, so they stay zero through training.

    ``meta`` holds ``channel_index int32[L,E,*]`` (dense channel of each expert column, -1 = pad),
    ``shared_index`` (split only), ``permanent bool[L,F]``, ``domains``, ``r``, ``n_experts``,
    ``expert_width`` (F_e, the active FFN width per token), ``ffn_dim``, ``layout``.
    """
    masks, fe = _check_masks(masks_NLF)
    E, L, F = masks.shape
    _require_full(dense_arrays, "moe_arrays_from_dense")
    if domains is None:
        domains = [f"expert{e}" for e in range(E)]
    domains = [str(d) for d in domains]
    if len(domains) != E:
        raise ShapeError(f"moe_arrays_from_dense: {len(domains)} domain names for {E} expert masks")
    if r is not None and expert_width(F, r) != fe:
        raise ConfigError(f"moe_arrays_from_dense: r={r} gives {expert_width(F, r)} channels of F={F}, "
                          f"but the masks keep {fe}")
    if layout not in EXPERT_LAYOUTS:
        raise ConfigError(f"moe_arrays_from_dense: layout must be one of {EXPERT_LAYOUTS}, got {layout!r}")
    ex = extract_experts(dense_arrays, masks, layout)
    params = {k: v for k, v in dense_arrays.items() if k != "layers"}
    params["layers"] = {k: v for k, v in dense_arrays["layers"].items() if k not in FFN_KEYS}
    params["layers"].update(wg=ex["wg"], wu=ex["wu"], wd=ex["wd"])
    meta = {"channel_index": ex["channel_index"], "permanent": np.logical_and.reduce(masks, axis=0),
            "domains": domains, "r": float(r) if r is not None else fe / F, "n_experts": E,
            "expert_width": fe, "ffn_dim": F, "layout": layout}
    if layout == "split" and ex["shared_wg"].shape[-1] > 0:  # no shared channel at all: nothing to store
        params["layers"].update({k: ex[k] for k in SHARED_KEYS})
        meta["shared_index"] = ex["shared_index"]
    return params, meta


def pruned_channel_index(pooled_stats_LF: np.ndarray, width: int) -> np.ndarray:
    """The pruned twin's channels per layer: the ``width`` largest pooled statistics, ascending ``int32[L, width]``."""
    return _sorted_index(top_channels(np.asarray(pooled_stats_LF), int(width)), int(width))


def pruned_dense_arrays(dense_arrays: Mapping, pooled_stats_LF: np.ndarray, width: int,
                        cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """The equal-size pruned dense baseline: per layer keep the ``width`` channels with the
    largest pooled statistic (ascending channel order). Returns ``(params, cfg with ffn_dim=width)``.
    """
    _require_full(dense_arrays, "pruned_dense_arrays")
    s = np.asarray(pooled_stats_LF)
    if s.ndim != 2:
        raise ShapeError(f"pruned_dense_arrays: pooled stats must be [n_layers, ffn_dim], got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ShapeError("pruned_dense_arrays: pooled stats contain inf/nan")
    w = _dense_ffn(dense_arrays, s[None], "pruned_dense_arrays")
    L, D, F = w["wg"].shape
    if (L, D, F) != (cfg.n_layers, cfg.d_model, cfg.ffn_dim):
        raise ShapeError(f"pruned_dense_arrays: dense arrays are L={L}, D={D}, F={F} but cfg says "
                         f"L={cfg.n_layers}, D={cfg.d_model}, F={cfg.ffn_dim}")
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not 1 <= width <= F:
        raise ConfigError(f"pruned_dense_arrays: width must be an integer in [1, {F}], got {width!r}")
    idx = pruned_channel_index(s, int(width))
    g = _gather(w, idx)
    params = {k: v for k, v in dense_arrays.items() if k != "layers"}
    params["layers"] = {**{k: v for k, v in dense_arrays["layers"].items() if k not in FFN_KEYS}, **g}
    return params, dataclasses.replace(cfg, ffn_dim=int(width))


# ----------------------------------------------------------------------------- report


def summarize(masks_NLF: np.ndarray, d_model: int, bytes_per_param: int = 2) -> dict:
    """Permanent sizes, mean pairwise overlap per layer, and :func:`layout_cost` for k = 1..E."""
    masks, fe = _check_masks(masks_NLF)
    E = masks.shape[0]
    ov = expert_overlap(masks)
    off = ~np.eye(E, dtype=bool)
    mean_overlap = ov[:, off].mean(-1) if E > 1 else np.ones(ov.shape[0])
    return {"expert_width": fe, "n_experts": E, "permanent_per_layer": permanent_sizes(masks).tolist(),
            "mean_overlap_per_layer": mean_overlap.tolist(),
            "cost": [layout_cost(masks, k, d_model, bytes_per_param) for k in range(1, E + 1)]}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m readme_jax.convert.experts STATS.npz [--r 0.5]``: print the channel report."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("stats", help="calibration stats .npz written by save_stats")
    ap.add_argument("--r", type=float, default=0.5, help="expert ratio r (default 0.5)")
    ap.add_argument("--bytes-per-param", type=int, default=2, help="weight bytes per parameter (default 2)")
    a = ap.parse_args(argv)
    stats = load_stats(a.stats)
    D = int(stats.provenance["model_config"]["d_model"])
    s = summarize(select_channels(stats.mean(), a.r), D, a.bytes_per_param)
    p = np.array(s["permanent_per_layer"])
    fe = s["expert_width"]
    print(f"model {stats.provenance.get('model_id')}; domains {list(stats.domains)}; "
          f"tokens {dict(zip(stats.domains, stats.tokens_N.tolist()))}")
    print(f"F={stats.sums_NLF.shape[-1]} r={a.r} -> F_e={fe}; L={len(p)}; D={D}")
    print(f"permanent channels per layer: {p.tolist()}")
    print(f"  min {p.min()} mean {p.mean():.1f} max {p.max()} (of F_e={fe}: {p.mean() / fe:.1%} on average)")
    print(f"mean pairwise overlap |A&B|/F_e per layer: {[round(o, 3) for o in s['mean_overlap_per_layer']]}")
    names = ("fixed", "split_exact", "split", "split_min")
    print("FFN weight MB read by a batch touching k experts (ratio to fixed):")
    print("  k  " + "".join(f"{n:>20}" for n in names))
    for c in s["cost"]:
        b = c["bytes"]
        print(f"  {c['k']:<3}" + "".join(f"{b[n] / 1e6:>12.2f} ({b[n] / b['fixed']:.3f})" for n in names))
    f = s["cost"][0]["flops_per_token"]
    print("FFN FLOPs per token (M): " + ", ".join(f"{n} {f[n] / 1e6:.2f}" for n in names))

if __name__ == "__main__":
    main()

"""How sure a number is: percentile bootstrap over evaluation blocks, t-intervals over repeated runs.

The block is the resampling unit (tokens inside a block are not independent). Resample indices
are ``numpy.random.default_rng(seed).integers(0, N, (n_boot, N))``, so a result is reproducible
from its inputs; a paired comparison reuses the same indices for both models on the same blocks.
:func:`t_interval` summarises one measurement repeated with independent seeds (the benchmarks).
"""

from __future__ import annotations

import numpy as np


def _as_nll(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 1 or x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: expected a non-empty 1-D array of finite per-block NLLs, got shape {x.shape}")
    return x


def resampled_means(x_N: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot]`` means of ``x`` over bootstrap resamples of its entries."""
    idx = np.random.default_rng(seed).integers(0, len(x_N), (n_boot, len(x_N)))
    return x_N[idx].mean(1)


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_ppl(nll_N, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """``{ppl, lo, hi}``: exp(mean block NLL) and its percentile CI from resampling blocks."""
    x = _as_nll(nll_N, "nll_N")
    lo, hi = _interval(resampled_means(x, n_boot, seed), level)
    return {"ppl": float(np.exp(x.mean())), "lo": float(np.exp(lo)), "hi": float(np.exp(hi))}


def paired_difference(nll_a_N, nll_b_N, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Log-perplexity of ``a`` minus ``b`` on the same blocks, with a paired percentile CI;
    ``significant`` when the CI excludes 0 (negative: ``a`` is better)."""
    a, b = _as_nll(nll_a_N, "nll_a_N"), _as_nll(nll_b_N, "nll_b_N")
    if a.shape != b.shape:
        raise ValueError(f"paired_difference needs the same blocks: {a.shape} vs {b.shape}")
    diff = a - b
    lo, hi = _interval(resampled_means(diff, n_boot, seed), level)
    return {"mean_diff": float(diff.mean()), "lo": lo, "hi": hi, "significant": bool(lo > 0 or hi < 0)}


def domain_comparison(a_by_domain: dict, b_by_domain: dict) -> tuple[dict, dict]:
    """Paired difference (a minus b) per domain both hold, and the counts: ``better`` (mean below 0),
    ``significant`` (interval below 0), ``significant_losses`` (interval above 0)."""
    comp = {d: paired_difference(a_by_domain[d], b_by_domain[d]) for d in a_by_domain if d in b_by_domain}
    counts = {"better": sum(c["mean_diff"] < 0 for c in comp.values()),
              "significant": sum(c["significant"] and c["hi"] < 0 for c in comp.values()),
              "significant_losses": sum(c["significant"] and c["lo"] > 0 for c in comp.values())}
    return comp, counts


def t_interval(xs) -> dict:
    """``{mean, ci95_low, ci95_high, n}`` of repeated measurements (``None`` entries skipped):
    the Student-t 95 % interval of the mean; a single value gives a zero-width interval."""
    from scipy import stats  # local import: scipy is only needed by the benchmarks that call this

    x = np.asarray([v for v in xs if v is not None], np.float64)
    m = float(x.mean())
    h = float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else 0.0
    return {"mean": m, "ci95_low": m - h, "ci95_high": m + h, "n": int(x.size)}


def domain_ppl_ci(nll_by_domain: dict, n_boot: int = 1000, seed: int = 0) -> dict:
    """``domain -> [lo, hi]``: the 95 % bootstrap interval of each domain's perplexity."""
    return {d: [b["lo"], b["hi"]] for d, b in ((d, bootstrap_ppl(x, n_boot, seed)) for d, x in nll_by_domain.items())}

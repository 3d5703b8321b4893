"""Synthetic Chatbot-Arena-like workload: Poisson arrivals, LMSYS-like prompt/output lengths.

Length means default to 69.5 prompt and 214.5 response tokens, the averages RECALLED (not
verified here) from Table 1 of the LMSYS-Chat-1M paper (arXiv 2309.11998). The shapes are
ours: lengths are ``clip(round(LogNormal(mu, sigma)), min, max)`` with ``mu`` solved so the
clipped, rounded distribution has exactly the configured mean. ``length_scale`` shrinks means
and maxima together for CPU-sized runs.

Prompt TEXT is not made here: pass ``prompt_fn(length, seed) -> token ids`` (e.g. drawing
from the real domain corpus). Routes for model-free simulation come from a synthetic route
model: each request has a home expert (Zipf-skewed popularity); each token keeps the
previous token's expert with probability ``route_stay``, else draws its home expert with
probability ``route_home`` or a uniform expert. With a real model the router gives routes.

Randomness: independent streams per purpose (arrivals, lengths, routes, prompt seeds) from
``seed``, so e.g. changing the rate does not change lengths.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from readme_jax.config import WorkloadConfig
from readme_jax.errors import ConfigError, DataError
from readme_jax.serve.scheduling.requests import Request

@dataclasses.dataclass(frozen=True, eq=False)
class RequestSpec:
    """One generated request. ``output_routes[k]`` routes generated token k+1 (simulation only)."""

    rid: int
    arrival_s: float
    prompt_len: int
    output_len: int
    prompt_routes: np.ndarray | None
    output_routes: np.ndarray | None
    prompt_ids: np.ndarray | None = None

    def to_request(self, prompt_routes: np.ndarray | None = None) -> Request:
        """A fresh :class:`Request` (``prompt_routes`` overrides the synthetic ones, e.g. from the router)."""
        routes = self.prompt_routes if prompt_routes is None else prompt_routes
        if routes is None:
            raise DataError(f"request spec {self.rid} has no prompt routes; pass the router's routes")
        return Request(self.rid, self.arrival_s, np.asarray(routes), self.output_len, self.prompt_ids)


# ----------------------------------------------------------------------------- lengths


def _norm_cdf(z):
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(z, np.float64) / math.sqrt(2.0)))


def expected_length(mu: float, sigma: float, lo: int, hi: int) -> float:
    """Exact mean of ``clip(floor(X + 0.5), lo, hi)`` for ``X ~ LogNormal(mu, sigma)``."""
    def cdf(x):
        x = np.asarray(x, np.float64)
        out = np.zeros_like(x)
        pos = x > 0
        out[pos] = _norm_cdf((np.log(x[pos]) - mu) / sigma)
        return out

    k = np.arange(lo + 1, hi, dtype=np.float64)  # interior values
    p_mid = cdf(k + 0.5) - cdf(k - 0.5)
    p_lo = float(cdf([lo + 0.5])[0])
    p_hi = 1.0 - float(cdf([hi - 0.5])[0]) if hi > lo else 0.0
    if hi == lo:
        return float(lo)
    return float(lo * p_lo + (k * p_mid).sum() + hi * p_hi)


def solve_mu(mean: float, sigma: float, lo: int, hi: int) -> float:
    """The lognormal ``mu`` whose clipped, rounded lengths have exactly ``mean`` (bisection)."""
    if not lo < mean < hi:
        raise ConfigError(f"target mean {mean} must lie strictly between {lo} and {hi}")
    a, b = math.log(max(lo, 1e-3)) - 12 * sigma, math.log(hi) + 12 * sigma
    for _ in range(100):
        m = 0.5 * (a + b)
        if expected_length(m, sigma, lo, hi) < mean:
            a = m
        else:
            b = m
    return 0.5 * (a + b)


def sample_lengths(rng: np.random.Generator, n: int, mean: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    mu = solve_mu(mean, sigma, lo, hi)
    x = rng.lognormal(mu, sigma, size=n)
    return np.clip(np.floor(x + 0.5), lo, hi).astype(np.int64)


# ----------------------------------------------------------------------------- routes


def expert_popularity(n_experts: int, zipf: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n_experts + 1, dtype=np.float64) ** zipf
    return w / w.sum()


def synthetic_routes(rng: np.random.Generator, n_tokens: int, home: int, cfg: WorkloadConfig,
                     first: int | None = None) -> np.ndarray:
    """A route chain: keep the previous expert w.p. route_stay, else home w.p. route_home, else uniform."""
    out = np.empty(n_tokens, np.int32)
    keep = rng.random(n_tokens) < cfg.route_stay
    go_home = rng.random(n_tokens) < cfg.route_home
    uni = rng.integers(0, cfg.n_experts, size=n_tokens)
    prev = first
    for i in range(n_tokens):
        if prev is not None and keep[i]:
            e = prev
        else:
            e = home if go_home[i] else int(uni[i])
        out[i] = e
        prev = e
    return out


# ----------------------------------------------------------------------------- workload


def generate_workload(cfg: WorkloadConfig, prompt_fn: Callable[[int, int], np.ndarray] | None = None,
                      *, with_routes: bool = True) -> list[RequestSpec]:
    """``cfg.n_requests`` requests, arrival-ordered, fully determined by ``cfg.seed``.

    ``prompt_fn(length, seed)`` must return exactly ``length`` token ids.
    """
    ss = np.random.SeedSequence(cfg.seed)
    r_arr, r_len, r_route, r_prompt = (np.random.default_rng(s) for s in ss.spawn(4))
    n = cfg.n_requests
    arrivals = np.cumsum(r_arr.exponential(1.0 / cfg.rate_per_s, size=n))
    plo, phi = cfg.bounds("prompt")
    olo, ohi = cfg.bounds("output")
    plen = sample_lengths(r_len, n, cfg.prompt_mean * cfg.length_scale, cfg.prompt_sigma, plo, phi)
    olen = sample_lengths(r_len, n, cfg.output_mean * cfg.length_scale, cfg.output_sigma, olo, ohi)
    homes = r_route.choice(cfg.n_experts, size=n, p=expert_popularity(cfg.n_experts, cfg.expert_zipf))
    prompt_seeds = r_prompt.integers(0, 2**31 - 1, size=n)
    specs = []
    for i in range(n):
        ids = None
        if prompt_fn is not None:
            ids = np.asarray(prompt_fn(int(plen[i]), int(prompt_seeds[i])))
            if ids.ndim != 1 or ids.shape[0] != plen[i]:
                raise DataError(f"prompt_fn(length={int(plen[i])}, seed={int(prompt_seeds[i])}) returned shape "
                                f"{ids.shape}; expected ({int(plen[i])},)")
        pr = orr = None
        if with_routes:
            pr = synthetic_routes(r_route, int(plen[i]), int(homes[i]), cfg)
            orr = synthetic_routes(r_route, int(olen[i]), int(homes[i]), cfg, first=int(pr[-1]))
        specs.append(RequestSpec(i, float(arrivals[i]), int(plen[i]), int(olen[i]), pr, orr, ids))
    return specs

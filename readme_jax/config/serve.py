"""Serving configs: the synthetic workload and the serve-bench settings (``serve:`` of the run config).

Workload length means default to 69.5 prompt and 214.5 response tokens, the averages RECALLED (not
verified here) from Table 1 of the LMSYS-Chat-1M paper (arXiv 2309.11998); see serve/workload.py.
"""

from __future__ import annotations

import dataclasses
import math

from readme_jax.config.choices import (CACHE_POLICIES, SCHEDULER_POLICIES, CachePolicy, Impl, MoeFfn,
                                       SchedulerPolicy, Split, check_choices)
from readme_jax.errors import ConfigError

# Recalled from arXiv 2309.11998 Table 1 (LMSYS-Chat-1M); NOT verified in this project.
LMSYS_PROMPT_MEAN_TOKENS = 69.5
LMSYS_RESPONSE_MEAN_TOKENS = 214.5


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    """Synthetic Chatbot-Arena-like requests (serve/workload.py makes them from this)."""

    n_requests: int = 500
    rate_per_s: float = 1.0  # Poisson arrival rate
    prompt_mean: float = LMSYS_PROMPT_MEAN_TOKENS  # recalled-unverified, see module doc
    output_mean: float = LMSYS_RESPONSE_MEAN_TOKENS  # recalled-unverified, see module doc
    prompt_sigma: float = 1.0  # lognormal shape: our assumption, not from the paper
    output_sigma: float = 1.0
    prompt_min: int = 1
    prompt_max: int = 1024
    output_min: int = 1
    output_max: int = 1024
    length_scale: float = 1.0  # multiplies means and maxima (min stays)
    seed: int = 0
    # synthetic routes (model-free simulation only)
    n_experts: int = 8
    expert_zipf: float = 1.0  # home-expert popularity ~ rank^-expert_zipf
    route_stay: float = 0.71  # cf. Read-ME: 2921 of 4096 tokens keep the previous token's expert
    route_home: float = 0.6

    def __post_init__(self):
        if self.n_requests < 0:
            raise ConfigError(f"workload.n_requests must be >= 0, got {self.n_requests}")
        if not self.rate_per_s > 0:
            raise ConfigError(f"workload.rate_per_s must be > 0, got {self.rate_per_s}")
        if not self.length_scale > 0:
            raise ConfigError(f"workload.length_scale must be > 0, got {self.length_scale}")
        for p in ("prompt", "output"):
            lo, hi = self.bounds(p)
            mean = getattr(self, f"{p}_mean") * self.length_scale
            if lo < 1 or hi < lo:
                raise ConfigError(f"workload.{p}_min/{p}_max must satisfy 1 <= min <= max after length_scale, "
                                  f"got {lo}..{hi}")
            if not (lo < mean < hi):
                raise ConfigError(f"workload.{p}_mean * length_scale = {mean:g} must lie strictly between "
                                  f"{p}_min={lo} and scaled {p}_max={hi}")
            if not getattr(self, f"{p}_sigma") > 0:
                raise ConfigError(f"workload.{p}_sigma must be > 0, got {getattr(self, f'{p}_sigma')}")
        if self.n_experts < 1:
            raise ConfigError(f"workload.n_experts must be >= 1, got {self.n_experts}")
        for name in ("route_stay", "route_home"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"workload.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.expert_zipf < 0:
            raise ConfigError(f"workload.expert_zipf must be >= 0, got {self.expert_zipf}")

    def bounds(self, which: str) -> tuple[int, int]:
        lo = getattr(self, f"{which}_min")
        hi = max(lo, int(round(getattr(self, f"{which}_max") * self.length_scale)))
        return lo, hi


WORKLOAD_PRESETS: dict[str, WorkloadConfig] = {
    # full-size lengths (GPU-class engine)
    "arena": WorkloadConfig(),
    # 1/8 lengths and few requests for the 2-core CPU (means 8.7 / 26.8 tokens)
    "cpu": WorkloadConfig(n_requests=64, rate_per_s=2.0, length_scale=0.125),
}


# the cpu preset, prompts capped at 256 x length_scale 0.125 = 32 tokens (the budget), arrivals at 4/s: enough load
# on a 2-core CPU that ready work exceeds the budget, so the policies' choices matter
BENCH_WORKLOAD = dataclasses.replace(WORKLOAD_PRESETS["cpu"], prompt_max=256, rate_per_s=4.0)


@dataclasses.dataclass(frozen=True)
class ServeBenchConfig:
    """serve-bench settings (``serve:`` of the run config, or ``readme-jax serve-bench`` keys).
    ``workload`` defaults to :data:`BENCH_WORKLOAD`, the ``cpu`` preset with prompts capped at 32
    tokens = the token budget; a partial ``workload:`` mapping fills its other keys from it."""

    workload: WorkloadConfig = BENCH_WORKLOAD
    policies: tuple[SchedulerPolicy, ...] = SCHEDULER_POLICIES
    token_budget: int = 32  # tokens per step, every policy (a prefill is never split: longer prompts rejected)
    n_slots: int = 64  # > token_budget: decodes compete for the budget
    max_queue: int = 256
    max_wait_steps: int | None = 16
    max_len: int = 192
    prefill_buckets: tuple[int, ...] | None = None
    row_buckets: tuple[int, ...] | None = None
    decode_windows: tuple[int, ...] | None = (64, 128)
    moe_ffn: MoeFfn = "present"
    impl: Impl = "xla"  # expert_ffn implementation when moe_ffn = expert_ffn
    stop_at_eos: bool = False  # False: outputs run to the workload's lengths (stand-ins for real replies)
    temperature: float = 0.0
    capacities: tuple[int, ...] = (2, 3, 4, 5)
    cache_policies: tuple[CachePolicy, ...] = CACHE_POLICIES
    lookahead_steps: int = 8
    link_bandwidth_bytes_per_s: float = 16e9  # SIMULATED link (about PCIe 4.0 x16)
    link_latency_s: float = 0.0
    latency_prompt_len: int = 16
    latency_tokens: int = 32
    latency_repeats: int = 3
    sweep_rows: int = 8  # batch of the decode-time vs present-experts sweep
    sweep_repeats: int = 10
    domains: tuple[str, ...] | None = None  # None: every prepared domain
    corpus_split: Split = "test"
    corpus_sep_id: int | None = 0  # document separator of the cached streams (SmolLM2 <|endoftext|>)
    seed: int = 0

    def __post_init__(self):
        check_choices(self, "serve.")
        bad = [p for p in self.policies if p not in SCHEDULER_POLICIES]
        if bad or not self.policies:
            raise ConfigError(f"serve.policies must be a non-empty subset of {SCHEDULER_POLICIES}, got {self.policies}")
        bad = [p for p in self.cache_policies if p not in CACHE_POLICIES]
        if bad:
            raise ConfigError(f"serve.cache_policies must be among {CACHE_POLICIES}, got {self.cache_policies}")
        if any(c < 1 for c in self.capacities):
            raise ConfigError(f"serve.capacities must be >= 1, got {self.capacities}")
        for name in ("latency_prompt_len", "latency_tokens", "latency_repeats", "sweep_rows", "sweep_repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name} must be >= 1, got {getattr(self, name)}")
        if not self.link_bandwidth_bytes_per_s > 0:
            raise ConfigError(f"serve.link_bandwidth_bytes_per_s must be > 0, got {self.link_bandwidth_bytes_per_s}")


# ----------------------------------------------------------------------------- the engine


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """KV slots and compile buckets. A request needs ``prompt_len + max_new_tokens <= max_len``
    and ``prompt_len <= max(prefill_buckets)``; ``prefill_buckets`` None: 8, 16, 32, ... up to
    ``max_len - 1``."""

    n_slots: int = 8
    max_len: int = 256
    prefill_buckets: tuple[int, ...] | None = None
    row_buckets: tuple[int, ...] | None = None  # rows per call; None: 1, 2, 4, ... n_slots
    eos_id: int | None = None
    moe_ffn: MoeFfn = "present"  # present: only the batch's experts (present_experts_ffn) | expert_ffn (all, impl)
    impl: Impl = "xla"  # expert_ffn implementation when moe_ffn = expert_ffn
    decode_windows: tuple[int, ...] | None = None  # decode attends over the smallest window > positions + 1

    def __post_init__(self):
        if self.n_slots < 1:
            raise ConfigError(f"engine.n_slots must be >= 1, got {self.n_slots}")
        if self.max_len < 2:
            raise ConfigError(f"engine.max_len must be >= 2, got {self.max_len}")
        if self.prefill_buckets is not None:
            b = tuple(self.prefill_buckets)
            if not b or any(int(x) != x or not 1 <= x <= self.max_len - 1 for x in b):
                raise ConfigError(f"engine.prefill_buckets must be integers in [1, max_len-1={self.max_len - 1}], "
                                  f"got {b}")
        if self.row_buckets is not None:
            r = tuple(self.row_buckets)
            if not r or any(int(x) != x or not 1 <= x <= self.n_slots for x in r) or max(r) != self.n_slots:
                raise ConfigError(f"engine.row_buckets must be integers in [1, n_slots={self.n_slots}] including "
                                  f"n_slots, got {r}")
        if self.decode_windows is not None and any(int(w) != w or not 2 <= w <= self.max_len
                                                   for w in self.decode_windows):
            raise ConfigError(f"engine.decode_windows must be integers in [2, max_len={self.max_len}], "
                              f"got {self.decode_windows}")
        check_choices(self, "engine.")
        if self.eos_id is not None and self.eos_id < 0:
            raise ConfigError(f"engine.eos_id must be >= 0 or null, got {self.eos_id}")

    def buckets(self) -> tuple[int, ...]:
        if self.prefill_buckets is not None:
            return tuple(sorted({int(x) for x in self.prefill_buckets}))
        out, b = [], 8
        while b < self.max_len - 1:
            out.append(b)
            b *= 2
        out.append(self.max_len - 1)
        return tuple(sorted(set(out)))

    def window(self, max_pos: int) -> int:
        """Cache positions a decode reads when its rows sit at positions <= ``max_pos`` (the router
        writes ``max_pos + 1``): the smallest decode window > ``max_pos + 1``, else ``max_len``."""
        for w in sorted(self.decode_windows or ()):
            if w >= max_pos + 2:
                return int(w)
        return self.max_len

    def rows(self, n: int) -> int:
        """Rows a call with ``n`` items runs (the smallest row bucket >= n)."""
        if self.row_buckets is None:
            return min(self.n_slots, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
        return min(b for b in self.row_buckets if b >= n)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 = greedy; ``top_p`` in (0, 1]; ``top_k`` 0 = no limit; ``seed`` None = the request id."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0

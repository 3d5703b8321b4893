"""Serving configs: the synthetic workload and the serve-bench settings (``serve:`` of the run config).

Workload length means default to 69.5 prompt and 214.5 response tokens, the averages RECALLED (not
verified here) from Table 1 of the LMSYS-Chat-1M paper (arXiv 2309.11998); see serve/workload.py.
"""

from __future__ import annotations

import dataclasses

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

"""Serving configs: the synthetic workload and the serve-bench settings (``serve:`` of the run config).

Workload length means default to 69.5 prompt and 214.5 response tokens, the averages RECALLED (not
verified here) from Table 1 of the LMSYS-Chat-1M paper (arXiv 2309.11998); see serve/sim/workload.py.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from readme_jax.config.choices import (CACHE_POLICIES, SCHEDULER_POLICIES, CachePolicy,
                                       SchedulerPolicy, Split, check_choices)
from readme_jax.config.train import MeshConfig
from readme_jax.errors import ConfigError

# Recalled from arXiv 2309.11998 Table 1 (LMSYS-Chat-1M); NOT verified in this project.
LMSYS_PROMPT_MEAN_TOKENS = 69.5
LMSYS_RESPONSE_MEAN_TOKENS = 214.5


def check_number(key: str, value, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
                 integer: bool = False, none_ok: bool = False) -> None:
    """One-line ConfigError naming ``key`` unless ``value`` is a finite number (an integer when
    ``integer``) in the range ``lo``..``hi`` (open ends when ``lo_open``/``hi_open``); None passes
    when ``none_ok``."""
    if value is None and none_ok:
        return
    if integer:
        typed = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    else:
        typed = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = typed and (lo is None or (value > lo if lo_open else value >= lo)) \
        and (hi is None or (value < hi if hi_open else value <= hi))
    if ok:
        return
    if lo is not None and hi is not None:
        rng = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        rng = f"{'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        rng = f"{'<' if hi_open else '<='} {hi}"
    else:
        rng = ""
    kind = ("an integer" if integer else "a finite number") if not typed else ""
    what = " ".join(x for x in (kind, rng) if x) + (" or null" if none_ok else "")
    raise ConfigError(f"{key} must be {what}, got {value!r}")


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= ``n`` (>= 1)."""
    return 1 << max(0, math.ceil(math.log2(max(int(n), 1))))


def check_engine_fields(prefix: str, n_slots, max_len, token_budget) -> None:
    """The engine's shape settings (shared by ``EngineConfig`` and the ``serve:`` section, named with ``prefix``)."""
    check_number(f"{prefix}n_slots", n_slots, lo=1, integer=True)
    check_number(f"{prefix}max_len", max_len, lo=2, integer=True)
    check_number(f"{prefix}token_budget", token_budget, lo=1, integer=True)


def check_mesh_field(key: str, mesh) -> None:
    """None, a MeshConfig, or (engine only) a jax Mesh with axes (data, expert, model); no jax import here."""
    if mesh is None or isinstance(mesh, MeshConfig):
        return
    if tuple(getattr(mesh, "axis_names", ())) == ("data", "expert", "model"):
        return
    raise ConfigError(f"{key} must be a mesh section (data, expert, model) or a jax Mesh with axes "
                      f"(data, expert, model), got {mesh!r}")


WORKLOAD_KEY = "serve.workload."  # where a WorkloadConfig lives in the run config (messages name its keys so)


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    """Synthetic Chatbot-Arena-like requests (serve/sim/workload.py makes them from this)."""

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
        k = WORKLOAD_KEY
        check_number(f"{k}n_requests", self.n_requests, lo=1, integer=True)
        check_number(f"{k}rate_per_s", self.rate_per_s, lo=0, lo_open=True)
        check_number(f"{k}length_scale", self.length_scale, lo=0, lo_open=True)
        check_number(f"{k}seed", self.seed, lo=0, integer=True)
        for p in ("prompt", "output"):
            check_number(f"{k}{p}_min", getattr(self, f"{p}_min"), lo=1, integer=True)
            check_number(f"{k}{p}_max", getattr(self, f"{p}_max"), lo=1, integer=True)
            check_number(f"{k}{p}_mean", getattr(self, f"{p}_mean"))
            check_number(f"{k}{p}_sigma", getattr(self, f"{p}_sigma"), lo=0, lo_open=True)
            lo, hi = self.bounds(p)  # the scaled max, never below the min
            mean = getattr(self, f"{p}_mean") * self.length_scale
            if not (lo < mean < hi):
                raise ConfigError(f"{k}{p}_mean * length_scale = {mean:g} must lie strictly between "
                                  f"{p}_min={lo} and scaled {p}_max={hi}")
        check_number(f"{k}n_experts", self.n_experts, lo=1, integer=True)
        check_number(f"{k}expert_zipf", self.expert_zipf, lo=0)
        for name in ("route_stay", "route_home"):
            check_number(f"{k}{name}", getattr(self, name), lo=0, hi=1)

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
    token_budget: int = 32  # tokens per step, every policy (prompts longer than it run in chunks)
    n_slots: int = 64  # > token_budget: decodes compete for the budget
    # serve the workload once, untimed, before the policies: without it the first policy (its
    # compilation excluded) measured a mean latency of 6.58 s and 6.41 s in two runs against
    # 5.42-5.87 s for the others (2026-12-01, 2-core CPU), a slowdown it alone absorbed
    burn_in: bool = True
    max_queue: int = 256
    max_wait_steps: int | None = 16
    max_len: int = 192
    min_window: int = 32  # smallest attention window of the engine (EngineConfig.min_window)
    mesh: MeshConfig | None = None  # experts sharded over devices (EngineConfig.mesh, serve/engine/placement.py)
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
        k = "serve."
        check_choices(self, k)
        bad = [p for p in self.policies if p not in SCHEDULER_POLICIES]
        if bad or not self.policies:
            raise ConfigError(f"serve.policies must be a non-empty subset of {SCHEDULER_POLICIES}, got {self.policies}")
        bad = [p for p in self.cache_policies if p not in CACHE_POLICIES]
        if bad:
            raise ConfigError(f"serve.cache_policies must be among {CACHE_POLICIES}, got {self.cache_policies}")
        if not isinstance(self.workload, WorkloadConfig):
            raise ConfigError(f"serve.workload must be a workload section, got {self.workload!r}")
        check_number(f"{k}token_budget", self.token_budget, lo=1, integer=True)
        check_number(f"{k}max_queue", self.max_queue, lo=0, integer=True)
        check_number(f"{k}max_wait_steps", self.max_wait_steps, lo=0, integer=True, none_ok=True)
        check_engine_fields(k, self.n_slots, self.max_len, self.token_budget)
        check_number(f"{k}min_window", self.min_window, lo=1, integer=True)
        if not isinstance(self.burn_in, bool):
            raise ConfigError(f"serve.burn_in must be true or false, got {self.burn_in!r}")
        check_number(f"{k}temperature", self.temperature, lo=0)
        if self.mesh is not None and not isinstance(self.mesh, MeshConfig):
            raise ConfigError(f"serve.mesh must be a mesh section (data, expert, model) or null, got {self.mesh!r}")
        if any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1 for c in self.capacities):
            raise ConfigError(f"serve.capacities must be integers >= 1, got {self.capacities!r}")
        check_number(f"{k}lookahead_steps", self.lookahead_steps, lo=0, integer=True)
        check_number(f"{k}link_bandwidth_bytes_per_s", self.link_bandwidth_bytes_per_s, lo=0, lo_open=True)
        check_number(f"{k}link_latency_s", self.link_latency_s, lo=0)
        for name in ("latency_tokens", "latency_repeats", "sweep_rows", "sweep_repeats"):
            check_number(f"{k}{name}", getattr(self, name), lo=1, integer=True)
        # the batch-1 latency request: its prompt must leave room for a token within max_len
        limit = self.max_len - 2
        n = self.latency_prompt_len
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= limit:
            raise ConfigError(f"serve.latency_prompt_len must be an integer in [1, {limit}] (leave a token within "
                              f"max_len={self.max_len}), got {n!r}")
        check_number(f"{k}corpus_sep_id", self.corpus_sep_id, lo=0, integer=True, none_ok=True)
        check_number(f"{k}seed", self.seed, lo=0, integer=True)
        if self.domains is not None and not all(isinstance(d, str) and d for d in self.domains):
            raise ConfigError(f"serve.domains must be a list of domain names or null, got {self.domains!r}")


# ----------------------------------------------------------------------------- the engine


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """KV slots and the step's size; the compiled shapes follow from them (docs/SERVING.md, "The engine").

    A request needs ``prompt_len + max_new_tokens <= max_len``; a prompt of any such length runs in
    chunks of at most ``token_budget`` tokens. A step of n tokens over r requests compiles for
    powers of two: r rows (1, 2, 4, ... up to ``n_slots``), tokens (1, 2, 4, ...) and an attention
    window (``min_window``, 2x, 4x, ... then ``max_len``) that covers the positions its requests
    have reached. Each shape compiles on first use (``Engine.compile_s``; ``Engine.warm`` ahead).
    """

    n_slots: int = 8
    max_len: int = 256
    token_budget: int = 64  # tokens one step runs at most (the scheduler's budget)
    min_window: int = 32  # the smallest attention window (cache positions read per row; capped at max_len)
    eos_id: int | None = None
    # experts sharded over a device mesh (serve/engine/placement.py): a MeshConfig, or a jax Mesh with axes
    # (data, expert, model); None: one device
    mesh: MeshConfig | None = None

    def __post_init__(self):
        check_engine_fields("engine.", self.n_slots, self.max_len, self.token_budget)
        check_number("engine.min_window", self.min_window, lo=1, integer=True)
        check_mesh_field("engine.mesh", self.mesh)
        check_number("engine.eos_id", self.eos_id, lo=0, integer=True, none_ok=True)

    def windows(self) -> tuple[int, ...]:
        """Every attention window: ``min_window`` doubling while below ``max_len``, then ``max_len``
        (only ``max_len`` when ``min_window >= max_len``)."""
        out, w = [], self.min_window
        while w < self.max_len:
            out.append(w)
            w *= 2
        return tuple(out) + (self.max_len,)

    def window(self, n_positions: int) -> int:
        """The smallest window holding cache positions ``0 .. n_positions - 1``."""
        return next((w for w in self.windows() if w >= n_positions), self.max_len)

    def rows(self, n: int) -> int:
        """Rows a step with ``n`` requests runs: the smallest power of two >= n, at most ``n_slots``."""
        return min(self.n_slots, pow2_at_least(n))

    @staticmethod
    def tokens(n: int) -> int:
        """Token slots of a step laid out over ``n``: the smallest power of two >= n."""
        return pow2_at_least(n)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 = greedy; ``top_p`` in (0, 1]; ``top_k`` 0 = no limit; ``seed`` None = the request id.

    Per-request input, so it is validated where a request enters (``Engine.check_request``: a
    RequestError naming the request, an HTTP 400), not at construction: one bad request must not
    stop a batch or a simulation."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0

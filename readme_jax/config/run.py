"""The main job's config (`readme-jax run`): data, conversion, evaluation, serving and the stages."""

from __future__ import annotations

import dataclasses

from readme_jax.config.choices import (BlockSampling, ChannelScore, ExpertLayoutKind, Impl, RunDtype, Split,
                                       check_choices)
from readme_jax.config.model import RouterConfig
from readme_jax.config.serve import ServeBenchConfig
from readme_jax.config.train import MeshConfig, TrainConfig
from readme_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DataConfig:
    domains: tuple[str, ...] = ()  # empty: every domain available on this machine (one expert each)
    allow_apt: bool = True  # fetch the Debian text packages (bible, dictionary) with apt-get download
    cache_dir: str | None = None  # default $READMEJAX_CACHE or ~/.cache/readme-jax/domains
    # self-distilled chat data (stage chat_data): this many prompts built from the domains, answered once by
    # the dense model through its chat template, become one more domain, "chat" (one more expert); 0 = none
    chat_prompts: int = 0
    chat_max_new_tokens: int = 96  # the longest dense answer kept (tokens)

    def __post_init__(self):
        if "chat" in self.domains:
            raise ConfigError("data.domains: 'chat' is not fetched; data.chat_prompts > 0 adds it (stage chat_data)")
        for name in ("chat_prompts", "chat_max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (name == "chat_max_new_tokens" and v < 1):
                raise ConfigError(f"data.{name} must be an integer >= {0 if name == 'chat_prompts' else 1}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """Calibration and expert extraction (paper: 16 sequences x 4096 tokens per domain, r = 0.5)."""

    r: float = 0.5
    calib_samples: int = 16
    calib_seq_len: int = 4096
    batch_size: int = 1
    # split: shared channels stored once [L, D, P] + expert-specific [L, E, D, R] (docs/CONVERT.md);
    # fixed: every expert holds all its channels, shared ones copied (they drift apart in training).
    layout: ExpertLayoutKind = "split"
    # fraction of each expert's width taken from the layer's top channels over ALL domains (shared by
    # every expert) before each domain adds its own top channels; 0 = shared part is only what every
    # domain picks on its own (docs/CONVERT.md "Shared fraction")
    shared_fraction: float = 0.0
    # which train blocks calibrate: evenly spaced over each domain's split (spread) | its first ones (head,
    # the behaviour before 2026-11-30: the dictionary's numerals, Genesis 1-5; RESULTS.md "Calibration sample")
    calib_sampling: BlockSampling = "spread"
    # channel importance: activation = mean |h| (the paper) | output = mean h^2 x |Wd row|^2 (what cutting the
    # channel removes from the FFN's output; docs/CONVERT.md "Channel score")
    score: ChannelScore = "activation"
    # least-squares refit of the kept channels' down projections, layer by layer on the calibration tokens
    # (convert/refit.py; the pruned twin gets the same); refit_ridge: ridge relative to the mean Gram diagonal
    refit: bool = False
    refit_ridge: float = 1e-4

    def __post_init__(self):
        if not (isinstance(self.r, (int, float)) and 0 < self.r <= 1):
            raise ConfigError(f"convert.r must be in (0, 1], got {self.r!r}")
        if not (isinstance(self.refit_ridge, (int, float)) and self.refit_ridge > 0):
            raise ConfigError(f"convert.refit_ridge must be > 0, got {self.refit_ridge!r}")
        if not (isinstance(self.shared_fraction, (int, float)) and 0 <= self.shared_fraction < 1):
            raise ConfigError(f"convert.shared_fraction must be in [0, 1), got {self.shared_fraction!r}")
        if self.calib_samples < 1 or self.calib_seq_len < 2 or self.batch_size < 1:
            raise ConfigError("convert.calib_samples, convert.batch_size must be >= 1 and calib_seq_len >= 2")
        check_choices(self, "convert.")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    seq_len: int = 512
    blocks_per_domain: int = 8
    batch_size: int = 4
    split: Split = "test"
    sampling: BlockSampling = "spread"  # test blocks evenly spaced over the split | its first ones (head)
    prompt: str = "The capital of France is"
    max_new_tokens: int = 16
    chat_max_new_tokens: int = 64  # stage chat_eval: the longest greedy answer to each chat prompt (tokens)
    chat_limit: int = 0  # stage chat_eval: ask only the first N prompts of eval/chat_prompts.py (0 = all 48)
    # held-out text from none of the domains (eval/ood.py): Python code of an installed library no split holds,
    # and English legal prose; tokens of each scored (blocks of seq_len)
    ood_tokens: int = 4096

    def __post_init__(self):
        if self.seq_len < 1 or self.blocks_per_domain < 1 or self.batch_size < 1 or self.max_new_tokens < 1 \
                or self.chat_max_new_tokens < 1 or self.ood_tokens < 0 or self.chat_limit < 0:
            raise ConfigError("eval.seq_len, eval.blocks_per_domain, eval.batch_size, eval.max_new_tokens, "
                              "eval.chat_max_new_tokens must be >= 1 (eval.ood_tokens, eval.chat_limit >= 0)")
        check_choices(self, "eval.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything `readme-jax run` does, from the dense checkpoint to the report."""

    model: str = "embedded"  # 'embedded' (SmolLM2-135M GGUF), a .gguf file, or a Hugging Face directory
    dtype: RunDtype = "float32"
    impl: Impl = "xla"  # expert_ffn implementation
    output_dir: str = "runs/default"
    seed: int = 0
    stages: tuple[str, ...] = ("chat_data", "dense_eval", "refactor", "refactor_eval", "train", "baseline",
                               "final_eval", "chat_eval", "serve_bench", "report")
    data: DataConfig = DataConfig()
    convert: ConvertConfig = ConvertConfig()
    router: RouterConfig = RouterConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    serve: ServeBenchConfig = ServeBenchConfig()  # the serve_bench stage (config/serve.py)
    mesh: MeshConfig | None = None  # expert-parallel expert tuning over all devices (docs/DISTRIBUTED.md)

    def __post_init__(self):
        known = RunConfig.__dataclass_fields__["stages"].default
        bad = [s for s in self.stages if s not in known]
        if bad:
            raise ConfigError(f"stages: unknown stage(s) {bad}; valid: {list(known)}")
        check_choices(self, "")

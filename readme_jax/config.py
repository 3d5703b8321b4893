"""Frozen dataclass configs, loaded from YAML with ``key=value`` overrides.

Unknown keys are errors (with the dotted key and the file named), so a typo never silently
falls back to a default. ``load(cls, path, overrides)`` is the one entry point.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from readme_jax.errors import ConfigError


# ----------------------------------------------------------------------------- choices (the one place)

Dtype = Literal["float32", "bfloat16", "float16"]
RunDtype = Literal["float32", "bfloat16"]  # float16 trains unstably without loss scaling: not offered for runs
Impl = Literal["reference", "xla", "pallas"]  # expert_ffn implementations (readme_jax.ops.expert_ffn)
RouterMlp = Literal["swiglu", "silu_bias"]
ScoreScale = Literal["sqrt", "none"]
EmbedInit = Literal["backbone", "random"]
RouterTarget = Literal["domain", "distill", "domain+distill"]
RouterLoss = Literal["kl", "reference"]
ExpertLayoutKind = Literal["split", "fixed"]
Split = Literal["train", "validation", "test"]
FfnComm = Literal["psum", "all_to_all"]


def choices(lit) -> tuple:
    """The legal values of a ``Literal`` type, as a tuple."""
    return typing.get_args(lit)


IMPLS = choices(Impl)
ROUTER_TARGETS = choices(RouterTarget)
EXPERT_LAYOUTS = choices(ExpertLayoutKind)
MESH_FFN_COMMS = choices(FfnComm)


def check_choices(cfg, prefix: str) -> None:
    """Raise ConfigError for any ``Literal``-typed field of dataclass ``cfg`` holding a value outside it."""
    for name, tp in typing.get_type_hints(type(cfg)).items():
        if typing.get_origin(tp) is Literal and getattr(cfg, name) not in typing.get_args(tp):
            raise ConfigError(f"{prefix}{name} must be one of {list(typing.get_args(tp))}, "
                              f"got {getattr(cfg, name)!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-style decoder (dense or Read-ME MoE backbone)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    dtype: Dtype = "float32"  # compute dtype
    param_dtype: Dtype = "float32"
    attn_scale: float | None = None  # None: 1/sqrt(head_dim); the router's reference variant uses 1.0

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        check_choices(self, "model.")


def tiny_model_config(**kw) -> ModelConfig:
    """A tiny random-weight config for fast tests."""
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                ffn_dim=48, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


# ----------------------------------------------------------------------------- router



@dataclasses.dataclass(frozen=True)
class RouterConfig:
    width: int = 512
    n_layers: int = 1
    n_heads: int = 4
    ffn_dim: int = 1024
    mlp: RouterMlp = "swiglu"
    score_scale: ScoreScale = "sqrt"
    rope_theta: float = 10000.0
    embed_init: EmbedInit = "backbone"
    seed: int = 0
    # What the router learns from (docs/ARCHITECTURE.md, "Router training"):
    #   domain          cross-entropy on each block's domain label (expert i = domain i), every round;
    #   distill         the paper's routing distillation from the backbone's activations, every round;
    #   domain+distill  domain labels in round 0, distillation in the later rounds.
    target: RouterTarget = "domain"

    def __post_init__(self):
        check_choices(self, "router.")
        for name in ("width", "n_layers", "n_heads", "ffn_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"router.{name} must be > 0, got {getattr(self, name)}")
        if self.width % self.n_heads or (self.width // self.n_heads) % 2:
            raise ConfigError(f"router.width ({self.width}) must split into n_heads ({self.n_heads}) even heads")


# ----------------------------------------------------------------------------- loading


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: value {value!r} fits none of {tp}: {'; '.join(errors)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping; unknown keys raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys here: {', '.join(prefix + k for k in fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    missing = [
        prefix + n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(missing)}")
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Plain nested dict of a config dataclass (for provenance JSON and YAML dumps)."""
    return dataclasses.asdict(cfg)


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    """Turn ``["a.b=3", "c=x"]`` into a nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {p}")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """Load dataclass ``cls`` from an optional YAML file plus ``key=value`` overrides."""
    data = read_yaml(path) if path is not None else {}
    data = deep_merge(data, parse_overrides(overrides))
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{e}{where}") from None


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One kind of tuning stage (router or experts) within a round."""

    steps: int = 100
    batch_size: int = 64
    lr: float = 5e-4
    seq_len: int = 4096
    grad_accum: int = 1  # micro-batches per optimizer step (optax.MultiSteps)
    warmup_steps: int = 0

    def validate(self, where: str) -> None:
        if self.steps < 0:
            raise ConfigError(f"{where}.steps must be >= 0, got {self.steps}")
        for name in ("batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"{where}.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or (self.steps and self.warmup_steps >= self.steps):
            raise ConfigError(f"{where}.warmup_steps must be in [0, steps), got {self.warmup_steps}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"{where}.batch_size ({self.batch_size}) must be a multiple of "
                              f"{where}.grad_accum ({self.grad_accum})")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Read-ME's alternating rounds: router tuning (distillation) then expert tuning (LM loss).

    Defaults are the paper's (8 rounds; router 100 steps, batch 64, lr 5e-4; experts 200 steps,
    batch 128, lr 5e-5; x0.8 per round; AdamW with weight decay 0.01; sequence 4096).
    """

    rounds: int = 8
    router: StageConfig = StageConfig(steps=100, batch_size=64, lr=5e-4)
    experts: StageConfig = StageConfig(steps=200, batch_size=128, lr=5e-5)
    lr_decay_per_round: float = 0.8
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    router_loss: RouterLoss = "kl"  # kl (paper Eq. 4) | reference (0.75 CE smoothed argmax + 0.25 soft CE)
    target_temperature: float = 0.05  # softmax temperature on the normalised overlap scores
    train_embeddings: bool = False  # expert tuning: also train token embedding / LM head
    seed: int = 0

    def __post_init__(self):
        if self.rounds < 1:
            raise ConfigError(f"train.rounds must be >= 1, got {self.rounds}")
        self.router.validate("train.router")
        self.experts.validate("train.experts")
        if not 0 < self.lr_decay_per_round <= 1:
            raise ConfigError(f"train.lr_decay_per_round must be in (0, 1], got {self.lr_decay_per_round}")
        check_choices(self, "train.")
        if not self.target_temperature > 0:
            raise ConfigError(f"train.target_temperature must be > 0, got {self.target_temperature}")
        if self.weight_decay < 0 or self.clip_norm < 0:
            raise ConfigError("train.weight_decay and train.clip_norm must be >= 0")


# ----------------------------------------------------------------------------- the main job


@dataclasses.dataclass(frozen=True)
class DataConfig:
    domains: tuple[str, ...] = ()  # empty: every domain available on this machine (one expert each)
    allow_apt: bool = True  # fetch the Debian text packages (bible, dictionary) with apt-get download
    cache_dir: str | None = None  # default $READMEJAX_CACHE or ~/.cache/readme-jax/domains


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

    def __post_init__(self):
        if not (isinstance(self.r, (int, float)) and 0 < self.r <= 1):
            raise ConfigError(f"convert.r must be in (0, 1], got {self.r!r}")
        if self.calib_samples < 1 or self.calib_seq_len < 2 or self.batch_size < 1:
            raise ConfigError("convert.calib_samples, convert.batch_size must be >= 1 and calib_seq_len >= 2")
        check_choices(self, "convert.")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    seq_len: int = 512
    blocks_per_domain: int = 8
    batch_size: int = 4
    split: Split = "test"
    prompt: str = "The capital of France is"
    max_new_tokens: int = 16

    def __post_init__(self):
        if self.seq_len < 1 or self.blocks_per_domain < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("eval.seq_len, eval.blocks_per_domain, eval.batch_size, eval.max_new_tokens must be >= 1")
        check_choices(self, "eval.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything `readme-jax run` does, from the dense checkpoint to the report."""

    model: str = "embedded"  # 'embedded' (SmolLM2-135M GGUF), a .gguf file, or a Hugging Face directory
    dtype: RunDtype = "float32"
    impl: Impl = "xla"  # expert_ffn implementation
    output_dir: str = "runs/default"
    seed: int = 0
    stages: tuple[str, ...] = ("dense_eval", "refactor", "refactor_eval", "train", "baseline", "final_eval",
                               "serve_bench", "report")
    data: DataConfig = DataConfig()
    convert: ConvertConfig = ConvertConfig()
    router: RouterConfig = RouterConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    serve: dict = dataclasses.field(default_factory=dict)  # serve-bench settings (see readme_jax.serve.bench)
    mesh: "MeshConfig | None" = None  # expert-parallel expert tuning over all devices (docs/DISTRIBUTED.md)

    def __post_init__(self):
        known = RunConfig.__dataclass_fields__["stages"].default
        bad = [s for s in self.stages if s not in known]
        if bad:
            raise ConfigError(f"stages: unknown stage(s) {bad}; valid: {list(known)}")
        check_choices(self, "")


# ----------------------------------------------------------------------------- device mesh


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data, expert, model) for expert-parallel training and serving.

    ``data=-1`` takes every device left after ``expert * model``. ``ffn_comm`` is how tokens
    meet their experts: ``psum`` (all-gather tokens over the expert axis, reduce-scatter the
    partial outputs; dropless) or ``all_to_all`` (send each token to its expert's shard;
    ``capacity_factor`` 0 = dropless, else each shard receives at most
    ``ceil(capacity_factor * tokens / expert)`` tokens from each sender, the rest skip the FFN).
    See readme_jax/distributed and docs/DISTRIBUTED.md.
    """

    data: int = -1
    expert: int = 1
    model: int = 1
    ffn_comm: FfnComm = "psum"
    capacity_factor: float = 0.0

    def __post_init__(self):
        if self.data != -1 and self.data < 1:
            raise ConfigError(f"mesh.data must be -1 (all remaining devices) or >= 1, got {self.data}")
        for name in ("expert", "model"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mesh.{name} must be >= 1, got {getattr(self, name)}")
        check_choices(self, "mesh.")
        if not self.capacity_factor >= 0:
            raise ConfigError(f"mesh.capacity_factor must be >= 0 (0 = dropless), got {self.capacity_factor}")

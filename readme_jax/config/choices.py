"""Every closed set of choices in the configs, as ``Literal`` types (the one place), and their check."""

from __future__ import annotations

import typing
from typing import Literal

from readme_jax.errors import ConfigError

Dtype = Literal["float32", "bfloat16", "float16"]
RunDtype = Literal["float32", "bfloat16"]  # float16 trains unstably without loss scaling: not offered for runs
Impl = Literal["reference", "xla", "pallas"]  # expert_ffn implementations (readme_jax.ops.expert_ffn)
RouterMlp = Literal["swiglu", "silu_bias"]
ScoreScale = Literal["sqrt", "none"]
EmbedInit = Literal["backbone", "random"]
RouterTarget = Literal["domain", "distill", "domain+distill"]
RouterLoss = Literal["kl", "reference"]
ExpertLoss = Literal["lm", "kl", "kl+lm"]  # expert tuning: text cross-entropy | KL to the dense model | both
ExpertLayoutKind = Literal["split", "fixed"]
Split = Literal["train", "validation", "test"]
FfnComm = Literal["psum", "all_to_all"]
SchedulerPolicy = Literal["expert_aware", "decode_first", "prefill_first", "fcfs"]
CachePolicy = Literal["belady", "lru", "fifo", "random"]
Remat = Literal["none", "layer"]  # training: recompute each decoder layer in the backward pass (memory for compute)
# which blocks of a split a fixed sample takes: evenly spaced over the split | the first ones (docs/DATA.md)
BlockSampling = Literal["spread", "head"]
ChannelScore = Literal["activation", "output"]  # expert extraction: mean |h| | mean h^2 x |Wd row|^2


def choices(lit) -> tuple:
    """The legal values of a ``Literal`` type, as a tuple."""
    return typing.get_args(lit)


IMPLS = choices(Impl)
ROUTER_TARGETS = choices(RouterTarget)
EXPERT_LAYOUTS = choices(ExpertLayoutKind)
MESH_FFN_COMMS = choices(FfnComm)
SCHEDULER_POLICIES = choices(SchedulerPolicy)
CACHE_POLICIES = choices(CachePolicy)
BLOCK_SAMPLINGS = choices(BlockSampling)
REMATS = choices(Remat)
EXPERT_LOSSES = choices(ExpertLoss)


def check_choices(cfg, prefix: str) -> None:
    """Raise ConfigError for any ``Literal``-typed field of dataclass ``cfg`` holding a value outside it."""
    for name, tp in typing.get_type_hints(type(cfg)).items():
        value = getattr(cfg, name)
        if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            raise ConfigError(f"{prefix}{name} must be one of {list(typing.get_args(tp))}, got {value!r}")
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple and typing.get_args(tp) else None
        if typing.get_origin(inner) is Literal and value is not None:
            bad = [v for v in value if v not in typing.get_args(inner)]
            if bad:
                raise ConfigError(f"{prefix}{name}: {bad} not among {list(typing.get_args(inner))}")

"""Architecture configs: the decoder (dense or MoE backbone) and the Read-ME router."""

from __future__ import annotations

import dataclasses

from readme_jax.config.choices import Dtype, EmbedInit, RouterMlp, RouterTarget, ScoreScale, check_choices
from readme_jax.errors import ConfigError


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
    # Llama 3.1+ RoPE scaling: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    rope_llama3: tuple[float, float, float, int] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})"
            )
        if self.rope_llama3 is not None:
            if len(self.rope_llama3) != 4:
                raise ConfigError(f"model.rope_llama3 must be (factor, low_freq_factor, high_freq_factor, "
                                  f"original_max_position_embeddings), got {self.rope_llama3!r}")
            f, lo, hi, n = self.rope_llama3
            if not (f >= 1 and 0 < lo < hi and n >= 1):
                raise ConfigError(f"model.rope_llama3 needs factor >= 1, 0 < low_freq_factor < high_freq_factor "
                                  f"and original_max_position_embeddings >= 1, got {self.rope_llama3!r}")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        check_choices(self, "model.")


def tiny_model_config(**kw) -> ModelConfig:
    """A tiny random-weight config for fast tests."""
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                ffn_dim=48, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)




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

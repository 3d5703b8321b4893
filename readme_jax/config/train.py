"""Training configs: one tuning stage, the alternating rounds, the device mesh."""

from __future__ import annotations

import dataclasses

from readme_jax.config.choices import ExpertLoss, FfnComm, Remat, RouterLoss, check_choices
from readme_jax.errors import ConfigError


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
    # what expert tuning (and the pruned twin's) learns from (train/recovery.py): lm = the text's next token
    # (the paper); kl = the dense source model's next-token distribution; kl+lm = lm_weight x lm + the rest x kl
    expert_loss: ExpertLoss = "lm"
    lm_weight: float = 0.5
    kd_temperature: float = 1.0
    # the chat domain's weight in the expert-tuning mixture (the pruned twin's too: the same batches), each
    # text domain weighing 1; only with data.chat_prompts > 0
    chat_weight: float = 1.0
    seed: int = 0
    # also checkpoint every N optimizer steps inside a stage (0: only at stage ends); a rerun after a
    # kill resumes mid-stage, bitwise equal to an uninterrupted run. Changes no result.
    checkpoint_every: int = 0
    # also log the training curves to this Weights & Biases project ("" = off; TensorBoard and JSONL
    # are written either way). Needs `pip install wandb`; changes no result.
    wandb_project: str = ""
    # LM steps (expert tuning, the pruned baseline): "layer" recomputes each decoder layer in the backward
    # pass (jax.checkpoint, nothing saved inside a layer), so only the layer inputs stay alive. Memory
    # for compute; the same loss and gradients up to float32 rounding (~1e-6 relative, not bitwise:
    # XLA fuses the recomputed layer differently; tests/test_remat.py), so it is left out of stage
    # fingerprints, like a change of device would be.
    remat: Remat = "none"

    def __post_init__(self):
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) \
                or self.checkpoint_every < 0:
            raise ConfigError(f"train.checkpoint_every must be an integer >= 0, got {self.checkpoint_every!r}")
        if self.rounds < 1:
            raise ConfigError(f"train.rounds must be >= 1, got {self.rounds}")
        self.router.validate("train.router")
        self.experts.validate("train.experts")
        if not 0 < self.lr_decay_per_round <= 1:
            raise ConfigError(f"train.lr_decay_per_round must be in (0, 1], got {self.lr_decay_per_round}")
        check_choices(self, "train.")
        if not self.target_temperature > 0:
            raise ConfigError(f"train.target_temperature must be > 0, got {self.target_temperature}")
        if not 0 <= self.lm_weight <= 1:
            raise ConfigError(f"train.lm_weight must be in [0, 1], got {self.lm_weight}")
        if not self.chat_weight > 0:
            raise ConfigError(f"train.chat_weight must be > 0, got {self.chat_weight}")
        if not self.kd_temperature > 0:
            raise ConfigError(f"train.kd_temperature must be > 0, got {self.kd_temperature}")
        if self.weight_decay < 0 or self.clip_norm < 0:
            raise ConfigError("train.weight_decay and train.clip_norm must be >= 0")



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

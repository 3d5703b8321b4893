"""Routing distillation: the router's target from the backbone's own activations (paper Eq. 4).

Teacher pass (once per round, reused by every router step of the round): run the MoE backbone
on the round's router-training tokens, the hidden stream routed by the current route source
(round 0: each block's own domain expert; later rounds: the current router). At every layer
evaluate ALL experts on the hidden state ("run densely"): ``|silu(h Wg_e) * (h Wu_e)|``, mapped
back to dense-FFN channel space through ``channel_index`` (a channel held by several experts
gets their mean; one held by none gets 0). With the ``split`` layout only the expert-specific
channels are scored (the shared part adds the same to every expert and carries no signal; the
reference code excludes it too). For untuned experts this is exactly the dense FFN's
activation magnitude. The token's top-F_e channels are compared with each expert's channel set:

    overlap[t, e] = mean_l |TopFe(a_l[t]) ∩ C_l,e| / F_e         (normalised to [0, 1])
    target[t]     = softmax(overlap[t] / temperature)

Losses: ``kl`` = KL(target || router) (paper); ``reference`` = the reference code's
0.75 x CE(argmax target, label smoothing 0.5) + 0.25 x CE(soft target).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from readme_jax.config import ModelConfig
from readme_jax.model import decoder
from readme_jax.model.moe import shared_ffn
from readme_jax.ops.expert_ffn import expert_ffn


def channel_magnitudes(h_TD, wg_EDF, wu_EDF, channel_index_EF, ffn_dim: int):
    """``[T, F]`` activation magnitude per dense channel from all experts (mean over holders)."""
    g = jnp.einsum("td,edf->tef", h_TD, wg_EDF, preferred_element_type=jnp.float32)
    u = jnp.einsum("td,edf->tef", h_TD, wu_EDF, preferred_element_type=jnp.float32)
    a = jnp.abs(jax.nn.silu(g) * u)  # [T,E,Fe]
    idx = channel_index_EF.reshape(-1)
    valid = idx >= 0
    safe = jnp.where(valid, idx, 0)
    T = h_TD.shape[0]
    tot = jnp.zeros((T, ffn_dim), jnp.float32).at[:, safe].add(a.reshape(T, -1) * valid)
    cnt = jnp.zeros((ffn_dim,), jnp.float32).at[safe].add(valid.astype(jnp.float32))
    return tot / jnp.maximum(cnt, 1.0)


def overlap_scores(mag_TF, expert_mask_EF, expert_dim: int):
    """``[T, E]``: fraction of the token's top-``expert_dim`` channels inside each expert."""
    _, top = jax.lax.top_k(mag_TF, expert_dim)  # [T, Fe]
    member = expert_mask_EF.astype(jnp.float32).T[top]  # [T, Fe, E]
    return member.sum(axis=1) / expert_dim


def teacher_ffn(impl: str, ffn_dim: int):
    """FFN hook for decoder.forward: routed output for the stream, overlap scores as aux."""

    def ffn(lp, h_BTD, route_BT):
        B, T, D = h_BTD.shape
        x = h_BTD.reshape(B * T, D)
        y = expert_ffn(x, route_BT.reshape(-1), lp["wg"], lp["wu"], lp["wd"], impl=impl)
        mag = channel_magnitudes(x, lp["wg"], lp["wu"], lp["channel_index"], ffn_dim)
        ov = overlap_scores(mag, lp["expert_mask"], lp["wg"].shape[-1])
        return shared_ffn(lp, h_BTD, y.reshape(B, T, D)), ov.reshape(B, T, -1)

    return ffn


def expert_masks_from_index(channel_index_LEF, ffn_dim: int):
    """Boolean ``[L, E, F]`` channel sets from the experts' ``channel_index`` (-1 = padding)."""
    idx = jnp.asarray(channel_index_LEF)
    onehot = (idx[..., None] == jnp.arange(ffn_dim)) & (idx[..., None] >= 0)
    return onehot.any(axis=-2)


@functools.partial(jax.jit, static_argnames=("cfg", "ffn_dim", "impl"))
def teacher_overlap(backbone_params, channel_index_LEF, expert_mask_LEF, tokens_BT, route_BT, *,
                    cfg: ModelConfig, ffn_dim: int, impl: str = "xla"):
    """Mean-over-layers overlap scores ``[B, T, E]`` (the target before the softmax)."""
    p = dict(backbone_params)
    p["layers"] = {**p["layers"], "channel_index": channel_index_LEF, "expert_mask": expert_mask_LEF}
    _, _, ov_LBTE = decoder.forward(p, cfg, tokens_BT, ffn=teacher_ffn(impl, ffn_dim), ffn_ctx=route_BT,
                                    logits=False)
    return ov_LBTE.mean(axis=0)


def target_distribution(overlap_BTE, temperature: float):
    return jax.nn.softmax(overlap_BTE / temperature, axis=-1)


def domain_targets(domain_N, seq_len: int, n_experts: int):
    """One-hot targets ``[N, T, E]``: every token of block n labelled with its block's domain expert.

    Domain i was calibrated into expert i, so the label is ``domain % E``. KL to a one-hot target
    is the cross-entropy on the label.
    """
    label = jnp.asarray(domain_N, jnp.int32) % n_experts
    return jnp.broadcast_to(jax.nn.one_hot(label, n_experts)[:, None, :], (label.shape[0], seq_len, n_experts))


def overlap_gap(overlap_BTE) -> dict:
    """How much signal a distillation target carries: per token, best minus second-best overlap."""
    top2 = jax.lax.top_k(overlap_BTE, 2)[0] if overlap_BTE.shape[-1] > 1 else jnp.concatenate(
        [overlap_BTE, overlap_BTE], -1)
    gap = top2[..., 0] - top2[..., 1]
    return {"gap_mean": float(jnp.mean(gap)), "gap_median": float(jnp.median(gap)),
            "overlap_mean": float(jnp.mean(overlap_BTE))}


def router_loss(logits_BTE, target_BTE, kind: str = "kl"):
    """Mean over tokens of the distillation loss between router logits and the target."""
    logp = jax.nn.log_softmax(logits_BTE.astype(jnp.float32), axis=-1)
    if kind == "kl":
        t = target_BTE
        return jnp.mean(jnp.sum(jnp.where(t > 0, t * (jnp.log(jnp.where(t > 0, t, 1.0)) - logp), 0.0), -1))
    if kind == "reference":
        E = logits_BTE.shape[-1]
        hard = optax.smooth_labels(jax.nn.one_hot(jnp.argmax(target_BTE, -1), E), 0.5)
        ce_hard = -jnp.sum(hard * logp, -1)
        ce_soft = -jnp.sum(target_BTE * logp, -1)
        return jnp.mean(0.75 * ce_hard + 0.25 * ce_soft)
    raise ValueError(f"unknown router loss {kind!r}")

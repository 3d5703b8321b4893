"""Dense Llama in flax.nnx: parameters as stacked-over-layers ``nnx.Param``s, math in decoder.py.

Hot loops should ``nnx.split`` once and ``nnx.merge`` inside a plain ``jax.jit`` (see
``make_apply``), or call :func:`readme_jax.model.decoder.forward` on ``model.arrays()``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from readme_jax.config import ModelConfig
from readme_jax.errors import CheckpointError
from readme_jax.model import decoder


def attention_shapes(cfg: ModelConfig) -> dict:
    L, D, H, K, hd = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return {"attn_norm": (L, D), "wq": (L, D, H * hd), "wk": (L, D, K * hd), "wv": (L, D, K * hd),
            "wo": (L, H * hd, D), "ffn_norm": (L, D)}


def dense_ffn_shapes(cfg: ModelConfig) -> dict:
    L, D, F = cfg.n_layers, cfg.d_model, cfg.ffn_dim
    return {"wg": (L, D, F), "wu": (L, D, F), "wd": (L, F, D)}


def top_shapes(cfg: ModelConfig) -> dict:
    out = {"embed": (cfg.vocab_size, cfg.d_model), "final_norm": (cfg.d_model,)}
    if not cfg.tie_embeddings:
        out["lm_head"] = (cfg.d_model, cfg.vocab_size)
    return out


class StackedLayers(nnx.Module):
    """Stacked per-layer weights (leading axis L)."""

    def __init__(self, shapes: dict, dtype, rngs: nnx.Rngs):
        for name, shape in shapes.items():
            if name.endswith("norm"):
                value = jnp.ones(shape, dtype)
            elif name.startswith("bias"):
                value = jnp.zeros(shape, dtype)
            else:
                fan_in = shape[-2]
                value = (jax.random.normal(rngs.params(), shape, jnp.float32) * fan_in**-0.5).astype(dtype)
            setattr(self, name, nnx.Param(value))


class DecoderModule(nnx.Module):
    """Embedding, stacked layers and head; subclasses say which FFN weights the layers carry."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.param_dtype)
        shapes = self.param_shapes()
        top = top_shapes(cfg)
        self.embed = nnx.Param((jax.random.normal(rngs.params(), top["embed"], jnp.float32) * 0.02).astype(dt))
        self.final_norm = nnx.Param(jnp.ones(top["final_norm"], dt))
        if "lm_head" in top:
            self.lm_head = nnx.Param(
                (jax.random.normal(rngs.params(), top["lm_head"], jnp.float32) * cfg.d_model**-0.5).astype(dt))
        self.layers = StackedLayers(shapes["layers"], dt, rngs)

    # --- what a subclass defines
    def ffn_shapes(self) -> dict:
        return dense_ffn_shapes(self.cfg)

    def layer_ffn(self):
        return decoder.dense_ffn

    # --- shared
    def param_shapes(self) -> dict:
        out = dict(top_shapes(self.cfg))
        out["layers"] = {**attention_shapes(self.cfg), **self.ffn_shapes()}
        return out

    def arrays(self) -> dict:
        """Plain nested dict of the parameter arrays (the layout decoder.forward takes)."""
        return nnx.state(self, nnx.Param).to_pure_dict()

    @classmethod
    def from_arrays(cls, cfg: ModelConfig, arrays: dict, source: str = "<arrays>", **kw):
        """Build a model from a nested dict of arrays, checking every name and shape."""
        model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), **kw))
        shapes = model.param_shapes()
        dt = jnp.dtype(cfg.param_dtype)

        def assign(target, shape_tree, arr_tree, prefix):
            for name, shape in shape_tree.items():
                key = prefix + name
                if isinstance(shape, dict):
                    if not isinstance(arr_tree.get(name), dict):
                        raise CheckpointError(f"{source}: missing parameter group {key!r}")
                    assign(getattr(target, name), shape, arr_tree[name], key + ".")
                    continue
                if name not in arr_tree:
                    raise CheckpointError(f"{source}: missing tensor {key!r} (expected shape {tuple(shape)})")
                arr = arr_tree[name]
                if tuple(arr.shape) != tuple(shape):
                    raise CheckpointError(
                        f"{source}: tensor {key!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
                getattr(target, name).set_value(jnp.asarray(np.asarray(arr) if not isinstance(arr, jax.Array)
                                                            else arr, dtype=dt))

        assign(model, shapes, arrays, "")
        return model

    def __call__(self, tokens_BT, positions_BT=None, cache=None, *, ffn_ctx=None):
        out, cache, _ = decoder.forward(self.arrays(), self.cfg, tokens_BT, positions_BT, cache,
                                        ffn=self.layer_ffn(), ffn_ctx=ffn_ctx)
        return out, cache


class Llama(DecoderModule):
    """The dense Llama: SwiGLU FFN of width cfg.ffn_dim in every layer."""


def make_apply(model: nnx.Module):
    """Split once; return ``(state, apply)`` with ``apply(state, tokens, positions, cache)`` jitted.

    Merging inside the jitted function avoids per-call graph traversal in hot loops.
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def apply(state, tokens_BT, positions_BT=None, cache=None, ffn_ctx=None):
        m = nnx.merge(graphdef, state)
        return m(tokens_BT, positions_BT, cache, ffn_ctx=ffn_ctx)

    return state, apply

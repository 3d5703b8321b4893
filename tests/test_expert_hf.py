"""Each Read-ME expert exported as a standalone HF Llama: transformers loads it, and its logits equal the
Read-ME model's with every token routed to that expert."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaForCausalLM

from readme_jax.checkpoints.expert_hf import expert_dense_arrays, save_experts_hf
from readme_jax.checkpoints.hf import load_hf
from readme_jax.config import RouterConfig, tiny_model_config
from readme_jax.errors import ConfigError
from readme_jax.model.moe import MoEBackbone
from readme_jax.model.readme_model import ReadMEModel
from readme_jax.model.router import make_router

E = 3


def _model(seed, shared_dim):
    cfg = tiny_model_config()
    backbone = MoEBackbone(cfg, rngs=nnx.Rngs(seed), n_experts=E, expert_dim=16, shared_dim=shared_dim)
    router = make_router(RouterConfig(width=16, n_heads=2, ffn_dim=16, seed=seed), E, cfg.vocab_size,
                         cfg.max_seq_len, backbone_embed_VD=backbone.embed[...])
    return ReadMEModel.from_modules(router, backbone, domains=("a", "b", "c"))


@pytest.mark.parametrize("shared_dim", [8, 0])
def test_exported_expert_equals_forced_routing_in_transformers(tmp_path, shared_dim):
    seed = int(np.random.randint(1 << 20))
    m = _model(seed, shared_dim)
    if shared_dim:  # zero padding columns (as the split layout stores them) are dropped, not exported
        layers = dict(m.backbone_params["layers"])
        for k in ("wg", "wu"):
            layers[k] = layers[k].at[0, :, :, -3:].set(0.0)
        layers["wd"] = layers["wd"].at[0, :, -3:, :].set(0.0)
        m = m.replace(backbone_params={**m.backbone_params, "layers": layers})
    paths = save_experts_hf(tmp_path / "experts", m)
    assert [p.name for p in paths] == ["expert_0_a", "expert_1_b", "expert_2_c"]
    tokens = np.random.default_rng(seed).integers(0, m.backbone_cfg.vocab_size, (2, 10))
    for e, p in enumerate(paths):
        hf = LlamaForCausalLM.from_pretrained(p, dtype=torch.float32, attn_implementation="eager").eval()
        assert hf.config.intermediate_size == 16 + shared_dim  # layer 1 has no padding: full width kept
        with torch.no_grad():
            got = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
        want = np.asarray(m(jnp.asarray(tokens), route_BT=jnp.full(tokens.shape, e, jnp.int32)).logits)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 1e-4, (e, err)
        cfg, arrays = load_hf(p)  # our own reader takes it back too
        assert cfg.ffn_dim == 16 + shared_dim
    arrays, cfg = expert_dense_arrays(m, 1)
    if shared_dim:
        assert np.all(arrays["layers"]["wg"][0, :, -3:] == 0)  # layer 0 packed: 3 dropped columns -> zero pad


def test_bad_expert_index():
    with pytest.raises(ConfigError, match=r"expert index must be an integer in \[0, 3\), got 3"):
        expert_dense_arrays(_model(0, 8), 3)

"""HF safetensors in/out against transformers, sharded and bf16 files, orbax, load_model, errors."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import LlamaForCausalLM

from readme_jax.checkpoints import load_model, save_model
from readme_jax.checkpoints.hf import load_hf, save_hf
from readme_jax.checkpoints.orbax_io import restore_params, save_params
from readme_jax.config import tiny_model_config
from readme_jax.errors import CheckpointError
from readme_jax.model import decoder
from readme_jax.model.llama import Llama

CONFIGS = {
    "gqa_untied": tiny_model_config(n_heads=4, n_kv_heads=2, tie_embeddings=False, rope_theta=5000.0),
    "mha_tied": tiny_model_config(n_heads=4, n_kv_heads=4, tie_embeddings=True, norm_eps=1e-6),
    # head_dim 16 != d_model / n_heads = 8: the explicit head_dim key must be honoured
    "gqa_wide_heads": tiny_model_config(n_heads=4, n_kv_heads=1, head_dim=16, tie_embeddings=True),
}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def hf_logits(d, tokens):
    m = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return m(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def tree_equal(a, b):
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], dict):
            tree_equal(a[k], b[k])
        else:
            np.testing.assert_array_equal(np.asarray(a[k], np.float32), np.asarray(b[k], np.float32), err_msg=k)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_parity_full_and_kv_cache(make_hf_dir, name):
    d, cfg, arrays = make_hf_dir(CONFIGS[name], seed=len(name))
    cfg2, loaded = load_hf(d)
    assert cfg2 == cfg
    tree_equal(loaded, arrays)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 11))
    ref = hf_logits(d, tokens)
    model = Llama.from_arrays(cfg2, loaded, source=str(d))
    full, _ = model(jnp.asarray(tokens))
    assert rel_err(full, ref) < 1e-4
    # prefill 6 tokens, then one token at a time through the KV cache
    B, T, P = tokens.shape[0], tokens.shape[1], 6
    cache = decoder.init_cache(cfg2, B, 16)
    pos = jnp.broadcast_to(jnp.arange(P), (B, P))
    out, cache = model(jnp.asarray(tokens[:, :P]), pos, cache)
    steps = [out]
    for t in range(P, T):
        out, cache = model(jnp.asarray(tokens[:, t:t + 1]), jnp.full((B, 1), t), cache)
        steps.append(out)
    assert rel_err(jnp.concatenate(steps, axis=1), ref) < 1e-4


def test_bf16_file_loads(make_hf_dir):
    cfg = tiny_model_config(param_dtype="bfloat16", tie_embeddings=False)
    d, cfg, arrays = make_hf_dir(cfg, seed=3)
    raw = load_file(d / "model.safetensors")
    assert raw["model.layers.0.self_attn.q_proj.weight"].dtype.name == "bfloat16"
    cfg32, loaded = load_hf(d, dtype="float32")
    assert cfg32.param_dtype == "float32" and loaded["layers"]["wq"].dtype == np.float32
    np.testing.assert_array_equal(loaded["layers"]["wq"],
                                  np.asarray(arrays["layers"]["wq"]).astype(jnp.bfloat16).astype(np.float32))
    cfg16, loaded16 = load_hf(d, dtype="bfloat16")
    assert loaded16["embed"].dtype.name == "bfloat16" and cfg16.dtype == "bfloat16"
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 9))
    ours, _ = Llama.from_arrays(cfg32, loaded)(jnp.asarray(tokens))
    assert rel_err(ours, hf_logits(d, tokens)) < 1e-4


def test_sharded_index(make_hf_dir):
    d, cfg, arrays = make_hf_dir(tiny_model_config(), seed=5, max_shard_bytes=20_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (d / "model.safetensors").exists()
    cfg2, loaded = load_hf(d)
    tree_equal(loaded, arrays)
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 7))
    ours, _ = Llama.from_arrays(cfg2, loaded)(jnp.asarray(tokens))
    assert rel_err(ours, hf_logits(d, tokens)) < 1e-4


# ----------------------------------------------------------------------------- errors


def _edit_config(d, **kw):
    raw = json.loads((d / "config.json").read_text())
    raw.update(kw)
    (d / "config.json").write_text(json.dumps(raw))


def test_errors_paths_and_config(make_hf_dir, tmp_path):
    with pytest.raises(CheckpointError, match="HF checkpoint directory not found"):
        load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_hf(tmp_path / "empty")
    d, cfg, _ = make_hf_dir()
    _edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(CheckpointError, match=r"expected a Llama checkpoint.*GPT2LMHeadModel.*'gpt2'"):
        load_hf(d)
    d, _, _ = make_hf_dir()
    _edit_config(d, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0})
    with pytest.raises(CheckpointError, match="rope type 'yarn' is not supported"):
        load_hf(d)
    d, _, _ = make_hf_dir()
    _edit_config(d, mlp_bias=True)
    with pytest.raises(CheckpointError, match="mlp_bias=true is not supported"):
        load_hf(d)
    d, _, _ = make_hf_dir()
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_hf(d)


def test_errors_tensors(make_hf_dir):
    d, cfg, _ = make_hf_dir()
    t = load_file(d / "model.safetensors")
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight' \(expected shape \(48, 32\)\)"):
        load_hf(d)
    d, cfg, _ = make_hf_dir()
    t = load_file(d / "model.safetensors")
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
    save_file(t, d / "model.safetensors")
    with pytest.raises(CheckpointError,
                       match=r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(8, 32\), expected \(16, 32\)"):
        load_hf(d)
    d, _, _ = make_hf_dir(max_shard_bytes=20_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (d / victim).unlink()
    with pytest.raises(CheckpointError, match=f"shard '{victim}'.*not found"):
        load_hf(d)


def test_nan_or_inf_weights_are_refused_naming_the_tensor(make_hf_dir, byte_tokenizer, tmp_path):
    """A corrupt tensor fails the load (load_hf and load_model) before any model is built: file, tensor
    name, NaN and Inf counts; bf16 shards too; a float32 value beyond float16 fails a float16 load."""
    d, cfg, arrays = make_hf_dir()
    t = load_file(d / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"][:3, 0] = np.nan  # [F=48, D=32]
    save_file(t, d / "model.safetensors")
    msg = (r"model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' has 3 NaN / 0 Inf values "
           r"\(of 1536\); the checkpoint is corrupt$")
    with pytest.raises(CheckpointError, match=msg):
        load_hf(d)
    with pytest.raises(CheckpointError, match=msg):
        load_model(d)
    d, _, _ = make_hf_dir(tiny_model_config(param_dtype="bfloat16"), max_shard_bytes=20_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / index["weight_map"]["model.norm.weight"]
    t = load_file(shard)
    t["model.norm.weight"][[1, 4]] = [np.inf, -np.inf]
    save_file(t, shard)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor 'model.norm.weight' has 0 NaN / 2 Inf values"):
        load_hf(d)
    d, _, _ = make_hf_dir()
    t = load_file(d / "model.safetensors")
    t["model.embed_tokens.weight"][7, :5] = 1e6
    save_file(t, d / "model.safetensors")
    assert load_hf(d)[1]["embed"][7, 0] == 1e6
    with pytest.raises(CheckpointError, match=r"'model.embed_tokens.weight' has 0 NaN / 5 Inf .* overflow float16"):
        load_hf(d, dtype="float16")
    # our own orbax format, through load_model
    bad = {**arrays, "layers": {**arrays["layers"], "wd": arrays["layers"]["wd"].copy()}}
    bad["layers"]["wd"][1, 2, 3] = np.nan
    save_params(tmp_path / "orbax_nan", bad, {"kind": "llama", "model_config": {}})
    with pytest.raises(CheckpointError, match=r"orbax_nan: tensor 'layers.wd' has 1 NaN / 0 Inf values \(of 3072\)"):
        load_model(tmp_path / "orbax_nan")


# ----------------------------------------------------------------------------- orbax + load_model


def test_orbax_round_trip(tmp_path, llama_arrays):
    cfg = tiny_model_config()
    arrays = llama_arrays(cfg, seed=7)
    arrays["layers"]["wq"] = jnp.asarray(arrays["layers"]["wq"], jnp.bfloat16)
    save_params(tmp_path / "ck", arrays, {"step": 3, "note": "x"})
    back, meta = restore_params(tmp_path / "ck")
    assert meta == {"step": 3, "note": "x"}
    assert back["layers"]["wq"].dtype == jnp.bfloat16
    tree_equal(back, arrays)
    with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
        save_params(tmp_path / "ck", arrays, {})
    save_params(tmp_path / "ck", arrays, {"step": 4}, overwrite=True)
    assert restore_params(tmp_path / "ck")[1] == {"step": 4}
    with pytest.raises(CheckpointError, match="not a readme-jax orbax checkpoint"):
        restore_params(tmp_path)
    with pytest.raises(CheckpointError, match="not JSON-serializable"):
        save_params(tmp_path / "ck2", arrays, {"bad": object()})



def test_load_model_hf_and_orbax(make_hf_dir, byte_tokenizer, tmp_path):
    cfg = tiny_model_config(vocab_size=300)
    d, cfg, arrays = make_hf_dir(cfg, seed=8, tokenizer=byte_tokenizer)
    model, tok = load_model(d)
    tokens = jnp.asarray(tok.encode("<|im_start|>hello, world"))[None]
    ref = Llama.from_arrays(cfg, arrays)(tokens)[0]
    assert rel_err(model(tokens)[0], ref) < 1e-6
    assert tok.encode("héllo") == byte_tokenizer.encode("héllo") and tok.bos_id == 1
    save_model(tmp_path / "ours", model, tok, meta={"note": "copy"})
    model2, tok2 = load_model(tmp_path / "ours")
    assert model2.cfg == cfg and rel_err(model2(tokens)[0], ref) < 1e-6
    assert tok2.encode("héllo") == tok.encode("héllo") and tok2.chat_template == tok.chat_template
    model3, _ = load_model(tmp_path / "ours", dtype="bfloat16")
    assert model3.cfg.param_dtype == "bfloat16" and model3.arrays()["embed"].dtype == jnp.bfloat16


def test_load_model_errors(make_hf_dir, byte_tokenizer, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*missing"):
        load_model(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="cannot tell the checkpoint format"):
        load_model(tmp_path / "plain")
    d, _, _ = make_hf_dir(tiny_model_config(vocab_size=200), tokenizer=byte_tokenizer)
    with pytest.raises(CheckpointError, match="tokenizer has 259 tokens but the model's embedding has only 200 rows"):
        load_model(d)
    d, _, arrays = make_hf_dir(tiny_model_config(vocab_size=300))
    save_params(tmp_path / "notok", arrays, {"model_config": {"vocab_size": 300}})
    with pytest.raises(CheckpointError, match="missing required config key"):
        load_model(tmp_path / "notok")
    save_params(tmp_path / "moe", arrays, {"kind": "readme_moe"})
    with pytest.raises(CheckpointError, match="kind is 'readme_moe'"):
        load_model(tmp_path / "moe")


def test_llama3_rope_scaling_matches_transformers(make_hf_dir, tmp_path):
    """Llama 3.1/3.2 checkpoints (rope_type llama3): positions far beyond the original context."""
    from transformers import LlamaConfig

    from readme_jax.checkpoints.hf import config_from_hf, config_to_hf
    from readme_jax.config import from_dict, to_dict

    cfg = tiny_model_config(max_seq_len=256, rope_theta=500000.0, rope_llama3=(8.0, 1.0, 4.0, 32))
    d, cfg, arrays = make_hf_dir(cfg, seed=3)
    raw = json.loads((d / "config.json").read_text())
    assert raw["rope_parameters"]["rope_type"] == "llama3"
    hf_cfg = LlamaConfig.from_pretrained(d)  # transformers reads our config.json as a llama3 config
    rope = getattr(hf_cfg, "rope_parameters", None) or hf_cfg.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    cfg2, loaded = load_hf(d)
    assert cfg2 == cfg and cfg2.rope_llama3 == (8.0, 1.0, 4.0, 32)
    assert from_dict(type(cfg), to_dict(cfg)) == cfg  # the config survives our JSON round trip
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 200))
    ref = hf_logits(d, tokens)
    full, _ = Llama.from_arrays(cfg2, loaded, source=str(d))(jnp.asarray(tokens))
    assert rel_err(full, ref) < 1e-3
    plain = dataclasses.replace(cfg2, rope_llama3=None)  # the scaling matters at these positions
    other, _ = Llama.from_arrays(plain, loaded, source=str(d))(jnp.asarray(tokens))
    assert rel_err(other, ref) > 1e-2
    bad = {**raw, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}
    with pytest.raises(CheckpointError, match="rope type 'llama3' needs factor, low_freq_factor"):
        config_from_hf(bad, "cfg.json", "float32")
    with pytest.raises(CheckpointError, match="rope type 'yarn' is not supported, only 'default' and 'llama3'"):
        config_from_hf({**raw, "rope_parameters": {"rope_type": "yarn"}}, "cfg.json", "float32")
    assert config_to_hf(cfg)["rope_parameters"]["original_max_position_embeddings"] == 32

"""readme_jax.load: the Read-ME model back from the orbax pair, a run folder and the export, bit for bit."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import readme_jax
from readme_jax.checkpoints.orbax_io import read_meta, save_params
from readme_jax.checkpoints.readme_io import load_readme, save_export, save_readme
from readme_jax.config import RouterConfig, tiny_model_config, to_dict
from readme_jax.errors import CheckpointError
from readme_jax.model.moe import MoEBackbone
from readme_jax.model.readme_model import ExpertLayout, ReadMEModel
from readme_jax.model.router import make_router

E = 3


def _model(seed: int, mlp: str = "swiglu") -> ReadMEModel:
    cfg = tiny_model_config()
    backbone = MoEBackbone(cfg, rngs=nnx.Rngs(seed), n_experts=E, expert_dim=16, shared_dim=8)
    router = make_router(RouterConfig(width=16, n_heads=2, ffn_dim=16, mlp=mlp, seed=seed), E, cfg.vocab_size,
                         cfg.max_seq_len, backbone_embed_VD=backbone.embed[...])
    return ReadMEModel.from_modules(router, backbone, domains=("a", "b", "c"))


def _same(a: ReadMEModel, b: ReadMEModel):
    assert (a.router_cfg, a.backbone_cfg, a.layout, a.router_mlp) == (b.router_cfg, b.backbone_cfg, b.layout,
                                                                      b.router_mlp)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    tok = jnp.asarray(np.random.default_rng(0).integers(0, a.backbone_cfg.vocab_size, (2, 9)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(a(tok).logits), np.asarray(b(tok).logits))


@pytest.mark.parametrize("mlp", ["swiglu", "silu_bias"])
def test_orbax_pair_and_run_folder_round_trip(tmp_path, mlp):
    m = _model(int(np.random.randint(1 << 20)), mlp)
    assert m.layout == ExpertLayout(E, 16, 8, ("a", "b", "c")) and m.layout.kind == "split"
    save_readme(tmp_path / "run" / "train" / "final", m, router_config=RouterConfig(mlp=mlp),
                backbone_meta={"source": "tiny"})
    _same(m, readme_jax.load(tmp_path / "run" / "train" / "final"))
    _same(m, readme_jax.load(tmp_path / "run"))  # a run folder: its train/final
    meta = read_meta(tmp_path / "run" / "train" / "final" / "backbone")
    assert meta["source"] == "tiny" and meta["layout"] == "split" and meta["domains"] == ["a", "b", "c"]


def test_router_saved_with_only_its_router_config_still_loads(tmp_path):
    """Run folders written before the model type hold ``router_config`` alone in the router's meta."""
    m = _model(3)
    save_readme(tmp_path, m)
    save_params(tmp_path / "router", m.router_params,
                {"kind": "readme_router", "n_experts": E,
                 "router_config": to_dict(RouterConfig(width=16, n_heads=2, ffn_dim=16))}, overwrite=True)
    _same(m, load_readme(tmp_path))


def test_export_round_trip_and_format(tmp_path):
    m = _model(int(np.random.randint(1 << 20)))
    extra = {"experts.channel_index": np.arange(2 * E * 16, dtype=np.int32).reshape(2, E, 16)}
    save_export(tmp_path / "x", m, extra_tensors=extra, info={"r": 0.5})
    _same(m, readme_jax.load(tmp_path / "x"))
    info = json.loads((tmp_path / "x" / "readme_moe.json").read_text())
    assert info["format"] == "readme-jax-moe" and info["version"] == 1 and info["expert_layout"] == "split"
    assert info["layout"]["backbone.layers.shared_wg"] == [2, 32, 8] and info["r"] == 0.5
    assert info["layout"]["experts.channel_index"] == [2, E, 16]


def test_load_says_what_it_expected(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        readme_jax.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="expected a run folder"):
        readme_jax.load(tmp_path / "empty")
    m = _model(4)
    save_export(tmp_path / "x", m)
    doc = json.loads((tmp_path / "x" / "readme_moe.json").read_text())
    (tmp_path / "x" / "readme_moe.json").write_text(json.dumps({**doc, "version": 9}))
    with pytest.raises(CheckpointError, match="version 1"):
        readme_jax.load(tmp_path / "x")
    (tmp_path / "x" / "readme_moe.json").write_text(json.dumps({**doc, "n_experts": 2, "domains": ["a", "b"]}))
    with pytest.raises(Exception, match="2 domains for 3 experts"):
        readme_jax.load(tmp_path / "x")


def test_nan_or_inf_weights_are_refused_naming_the_tensor(tmp_path):
    """Export and orbax pair alike: a corrupt tensor fails the load with file, tensor name and counts."""
    m = _model(5)
    layers = dict(m.backbone_params["layers"])
    layers["wg"] = layers["wg"].at[1, 2, :4, 0].set(jnp.nan).at[0, 0, 0, 0].set(jnp.inf)  # [L=2, E=3, D=32, R=16]
    bad = m.replace(backbone_params={**m.backbone_params, "layers": layers})
    extra = {"experts.channel_index": np.full((2, E, 16), -1, np.int32)}  # integer tensors are not checked
    save_export(tmp_path / "x", bad, extra_tensors=extra)
    with pytest.raises(CheckpointError, match=r"readme_moe.safetensors: tensor 'backbone.layers.wg' has 4 NaN / 1 Inf "
                                              r"values \(of 3072\); the checkpoint is corrupt$"):
        readme_jax.load(tmp_path / "x")
    head = m.router_params["head"]
    save_readme(tmp_path / "run" / "train" / "final", m.replace(router_params={**m.router_params,
                                                                              "head": head.at[0, 0].set(jnp.nan)}))
    with pytest.raises(CheckpointError, match=r"final/router: tensor 'head' has 1 NaN / 0 Inf values"):
        readme_jax.load(tmp_path / "run")


def _siblings(d):
    """Hidden temp/aside folders left beside ``d``."""
    return sorted(p.name for p in d.parent.iterdir() if p.name.startswith(f".{d.name}."))


def test_export_target_is_refused_or_replaced_atomically(tmp_path, monkeypatch):
    m = _model(6)
    x = tmp_path / "x"
    x.mkdir()
    save_export(x, m)  # an empty folder is fine
    with pytest.raises(CheckpointError, match=r"export target .*/x exists and is not empty \(2 entries\); "
                                              r"pass overwrite=True \(CLI: --overwrite\) to replace it$"):
        save_export(x, m)
    (x / "keep.txt").write_text("old")
    m2 = _model(7)
    save_export(x, m2, overwrite=True)  # the old folder is replaced as a whole
    assert not (x / "keep.txt").exists() and not _siblings(x)
    _same(m2, readme_jax.load(x))
    (tmp_path / "f").write_text("a file")
    with pytest.raises(CheckpointError, match=r"export target .*/f is a file; expected a folder"):
        save_export(tmp_path / "f", m, overwrite=True)
    with pytest.raises(CheckpointError, match=r"export to .*/f/sub failed \("):
        save_export(tmp_path / "f" / "sub", m)
    assert (tmp_path / "f").read_text() == "a file"

    # a failure while writing (disk full) leaves the old export whole, and no temp folder behind
    from readme_jax.checkpoints import readme_io

    def full_disk(tensors, path, *a, **k):
        open(path, "wb").write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(readme_io, "save_file", full_disk)
    with pytest.raises(CheckpointError, match=r"export to .*/x failed \(No space left on device\); "
                                              r".*/x was left as it was$"):
        save_export(x, m, overwrite=True)
    assert not _siblings(x)
    _same(m2, readme_jax.load(x))
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_export(tmp_path / "new", m)
    assert not (tmp_path / "new").exists() and not _siblings(tmp_path / "new")
    monkeypatch.undo()

    # the new folder cannot be moved in after the old one went aside: the old one is put back
    from readme_jax import fsutil

    real_replace = fsutil.os.replace

    def failing_replace(src, dst):
        if ".partial-" in str(src):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match=r"export to .*/x failed \(Input/output error\)"):
        save_export(x, m, overwrite=True)
    monkeypatch.undo()
    assert not _siblings(x)
    _same(m2, readme_jax.load(x))


@pytest.mark.parametrize("damage", ["data_files", "metadata", "truncated_data"])
def test_damaged_orbax_checkpoint_is_one_clear_error(tmp_path, damage):
    from readme_jax.checkpoints.orbax_io import restore_params, save_params

    d = save_params(tmp_path / "c", {"a": np.arange(16, dtype=np.float32).reshape(4, 4)}, {"x": 1})
    files = [p for p in (d / "params").rglob("*") if p.is_file()]
    if damage == "data_files":
        for p in files:
            if p.parent.name == "d":
                p.unlink()
    elif damage == "metadata":
        (d / "params" / "_METADATA").unlink()
    else:
        for p in files:
            if p.parent.name == "d":
                p.write_bytes(p.read_bytes()[:7])
    with pytest.raises(CheckpointError, match=r"params: the orbax checkpoint.* cannot be read .*corrupt"):
        restore_params(d)


def test_truncated_safetensors_is_one_clear_error(make_hf_dir):
    from readme_jax.checkpoints.hf import load_hf

    d, _, _ = make_hf_dir()
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"a safetensors file cannot be read .*incomplete or corrupt"):
        load_hf(d)

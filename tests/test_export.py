"""`readme-jax export` (workflow/export.py) on a small trained run folder made here (no pipeline run):
the export describes the trained checkpoint, never the config it runs under; targets are guarded."""

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import readme_jax
from readme_jax import config
from readme_jax.checkpoints.readme_io import save_readme
from readme_jax.config import RouterConfig, RunConfig, tiny_model_config, to_dict
from readme_jax.errors import CheckpointError
from readme_jax.jsonfile import write_json
from readme_jax.model.moe import MoEBackbone
from readme_jax.model.readme_model import ReadMEModel
from readme_jax.model.router import make_router
from readme_jax.workflow.export import export_workspace
from readme_jax.workflow.workspace import Workspace

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_test.yaml"
TRAINED_ROUTER = RouterConfig(width=16, n_layers=1, n_heads=2, ffn_dim=24, mlp="silu_bias", seed=7)


@pytest.fixture(scope="module")
def trained_ws(tmp_path_factory):
    """A run folder whose train/final router was built with TRAINED_ROUTER, opened under tiny_test.yaml
    (router width 32, swiglu): the run config and the checkpoint disagree on the router."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_model_config()
    bb = MoEBackbone(cfg, rngs=nnx.Rngs(0), n_experts=2, expert_dim=16, shared_dim=8)
    router = make_router(TRAINED_ROUTER, 2, cfg.vocab_size, cfg.max_seq_len, backbone_embed_VD=bb.embed[...])
    model = ReadMEModel.from_modules(router, bb, domains=("pydoc", "code"))
    save_readme(out / "train" / "final", model, router_config=TRAINED_ROUTER,
                backbone_meta={"expert_width": 24, "ffn_dim": cfg.ffn_dim, "r": 0.5})
    write_json(out / "train" / "done.json", {"rounds": 1})
    (out / "refactor").mkdir()
    L, F = cfg.n_layers, cfg.ffn_dim
    np.savez(out / "refactor" / "experts.npz", channel_index=np.zeros((L, 2, 16), np.int32),
             permanent=np.zeros((L, F), np.uint8), shared_index=np.zeros((L, 8), np.int32))
    run_cfg = config.load(RunConfig, TINY, [f"output_dir={out}"])
    assert run_cfg.router.width == 32 and run_cfg.router.mlp == "swiglu"  # really different
    return Workspace(run_cfg, progress=False, log=lambda s: None), model


def test_export_carries_the_checkpoints_router_settings(trained_ws, tmp_path):
    ws, model = trained_ws
    path = export_workspace(ws, tmp_path / "x")
    info = json.loads((path / "readme_moe.json").read_text())
    assert info["router_config"] == to_dict(TRAINED_ROUTER) != to_dict(ws.cfg.router)
    assert info["router_mlp"] == "silu_bias" and info["router_model_config"]["d_model"] == 16
    assert (info["expert_width"], info["ffn_dim"], info["r"]) == (24, 48, 0.5)
    back = readme_jax.load(path)
    assert (back.router_cfg, back.router_mlp) == (model.router_cfg, model.router_mlp)
    np.testing.assert_array_equal(np.asarray(back.router_params["head"]), np.asarray(model.router_params["head"]))


def test_export_target_guards(trained_ws, tmp_path):
    ws, _ = trained_ws
    x = tmp_path / "x"
    x.mkdir()
    (x / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"exists and is not empty \(1 entries\); pass overwrite=True"):
        export_workspace(ws, x)
    assert (x / "notes.txt").read_text() == "mine"
    export_workspace(ws, x, overwrite=True)
    assert sorted(p.name for p in x.iterdir()) == ["README.md", "readme_moe.json", "readme_moe.safetensors", "tokenizer.json",
                                                   "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no temp or aside folder left
    for target in (ws.out, ws.out.parent):
        with pytest.raises(CheckpointError, match="holds the run folder"):
            export_workspace(ws, target, overwrite=True)
    assert (ws.out / "train" / "final").is_dir()


def test_export_writes_a_model_card_from_the_export_and_the_report(trained_ws, tmp_path):
    ws, model = trained_ws
    report = ws.out / "report" / "metrics.json"
    report.parent.mkdir(exist_ok=True)
    ppl = {"dense": {"pydoc": 10.0, "code": 11.0}, "pruned_tuned": {"pydoc": 30.5, "code": 31.25},
           "readme_final": {"pydoc": 20.125, "code": 21.0}}
    write_json(report, {"ppl": ppl, "router_accuracy": 0.875, "locality": 0.5})
    try:
        path = export_workspace(ws, tmp_path / "x")
    finally:
        report.unlink()
    card = (path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: readme-jax\n") and "\n---\n" in card
    assert "Experts: 2 (0: pydoc, 1: code); layout `split`" in card
    assert "| **this model** (Read-ME, trained) | 20.12 | 21.00 |" in card
    assert "| pruned dense, same active width, tuned | 30.50 | 31.25 |" in card
    assert "Router accuracy against the domain label 0.875" in card and "rounds 1" in card
    assert f"{model.backbone_cfg.n_layers} layers, width {model.backbone_cfg.d_model}" in card
    # without a report the card still describes the model, with no table
    card2 = (export_workspace(ws, tmp_path / "y") / "README.md").read_text()
    assert "Measured" not in card2 and "readme_jax.load" in card2

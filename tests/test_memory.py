"""The memory estimator (train/memory.py): parameter bytes against hand arithmetic on a tiny config, and
the paper preset's estimate against the table docs/REPRODUCING.md documents (eval_shape; no weights)."""

import re
from pathlib import Path

import pytest

from readme_jax import config as config_mod
from readme_jax.cli import main
from readme_jax.config import MeshConfig, StageConfig, tiny_model_config
from readme_jax.errors import ConfigError
from readme_jax.train import memory

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "REPRODUCING.md"
PRESET = ROOT / "configs" / "llama2_7b_paper.yaml"


def _tiny(grad_accum=1, expert=2, remat="none", batch=4):
    cfg = tiny_model_config()  # V=97 D=32 L=2 H=4 K=2 hd=8, untied head
    return memory.Setup(model=cfg, n_experts=3, expert_dim=24, shared_dim=8,
                        stage=StageConfig(batch_size=batch, grad_accum=grad_accum, seq_len=16),
                        mesh=MeshConfig(data=1, expert=expert), n_devices=expert, remat=remat)


def test_parameter_and_optimizer_bytes_by_hand():
    V, D, L, H, K, hd, E, R, P = 97, 32, 2, 4, 2, 8, 3, 24, 8
    attn = L * (2 * D + D * H * hd + 2 * D * K * hd + H * hd * D)  # norms, wq, wk, wv, wo
    shared = L * 3 * D * P
    experts_padded = L * 4 * 3 * D * R  # E = 3 padded to 4 for the expert axis of 2
    frozen = 2 * V * D  # embed + lm_head, not trained in expert tuning
    est = memory.estimate(_tiny())
    assert est["n_params"] == frozen + D + attn + shared + L * E * 3 * D * R
    trainable_dev = D + attn + shared + experts_padded // 2  # final_norm, attention, shared: replicated
    assert est["grads"] == 4 * trainable_dev  # float32
    assert est["params"] == 4 * (trainable_dev + frozen)  # (no router given)
    assert est["optimizer"] == 2 * 4 * trainable_dev + 4  # AdamW mu, nu (param dtype) + int32 count
    est2 = memory.estimate(_tiny(grad_accum=2))  # optax.MultiSteps: + f32 accumulator + 2 int32 counters
    assert est2["optimizer"] == est["optimizer"] + 4 * trainable_dev + 8
    assert est["outputs"] == 0 and memory.estimate(
        memory.Setup(**{**_tiny().__dict__, "donate": False}))["outputs"] == est["grads"] + est["optimizer"]


def test_remat_shrinks_activations_and_bad_micro_batch_is_refused():
    long = lambda r: memory.Setup(**{**_tiny(remat=r).__dict__, "model": tiny_model_config(n_layers=12)})  # noqa: E731
    assert memory.estimate(long("layer"))["activations"] < memory.estimate(long("none"))["activations"]
    with pytest.raises(ConfigError, match="micro-batch 1"):
        memory.estimate(_tiny(batch=4, grad_accum=4))  # 1 row over data x expert = 2 devices


def _documented_table() -> dict[str, float]:
    """The rows (GiB) of the table printed by the documented `readme-jax memory` command."""
    text = DOC.read_text()
    block = text[text.index("readme-jax memory --config llama2_7b_paper"):]
    block = block[block.index("\n"):block.index("```")]  # the printout below the command
    return {m[1].strip(): float(m[2]) for m in re.finditer(r"^(\D[^\n]*?)\s+([\d.]+)$", block, re.M)}


def test_paper_preset_estimate_matches_the_documented_numbers():
    cfg = config_mod.load(config_mod.RunConfig, PRESET, [])
    assert cfg.mesh is not None and cfg.mesh.expert == 8 and cfg.train.remat == "layer"
    est = memory.estimate(memory.setup_of_run(cfg, 8, arch="llama2-7b"))
    assert 17.4e9 < est["n_params"] < 17.7e9  # 7 experts of half width: the MoE is ~17.6B parameters
    doc = _documented_table()
    assert len(doc) == 6 and "total per device" in doc, doc
    for name, gib in doc.items():
        key = {"params (trainable + frozen + router)": "params", "grads": "grads",
               "optimizer (AdamW moments, accumulator)": "optimizer", "step outputs (0: donated)": "outputs",
               "activations (estimate)": "activations", "total per device": "total"}[name]
        assert est[key] / memory.GIB == pytest.approx(gib, rel=0.03, abs=0.1), name
    assert est["total"] <= 80 * memory.GIB  # fits an 80 GB H100 (with XLA_PYTHON_CLIENT_MEM_FRACTION raised)


def test_cli_prints_the_table(capsys):
    assert main(["memory", "--config", str(PRESET), "--arch", "llama2-7b", "--device-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "total per device" in out and "fits on 80 GiB" in out
    assert main(["memory", "--config", str(PRESET), "--device-gib", "80"]) == 2  # no config.json at model=
    assert "--arch" in capsys.readouterr().err

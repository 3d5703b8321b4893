"""End to end on configs/tiny_test.yaml: every report file, resume, export, clear config errors."""

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from readme_jax import cli
from readme_jax.convert.calibrate import load_stats
from readme_jax.data import block_starts, token_stream
from readme_jax.errors import ConfigError
from readme_jax.workflow import run as run_mod
from readme_jax.workflow.workspace import Workspace

from conftest import TINY_STAGES, tiny_run_config

STAGES = TINY_STAGES


def _cfg(out, cache_dir, *extra):
    return tiny_run_config(out, cache_dir, *extra)


def test_run_writes_every_report_file(finished_run):
    out, _, _ = finished_run
    rep = out / "report"
    for f in ("report.md", "metrics.json", "ppl_final.png", "ppl_refactor.png", "training_curves.png",
              "stage_metrics.png", "expert_load.png", "hit_ratio.png", "normalized_latency_measured.png",
              "unique_experts_measured.png"):
        assert (rep / f).is_file() and (rep / f).stat().st_size > 0, f
    m = json.loads((rep / "metrics.json").read_text())
    for stage in STAGES[:-1]:
        assert stage in m, stage
    ppl = m["final_eval"]["ppl"]
    assert set(ppl) >= {"dense", "pruned_dense", "pruned_dense_tuned", "readme_oracle_untrained",
                        "readme_router_only", "readme_trained"}
    assert all(np.isfinite(v) and v > 1 for row in ppl.values() for v in row.values())
    text = (rep / "report.md").read_text()
    assert "Read-ME after all rounds" in text and "![ppl_final.png](ppl_final.png)" in text
    assert text.startswith("# Read-ME on JAX: 2 rounds; router 2 steps × batch 4 × 32 tokens")
    assert "Read-ME beats the tuned pruned dense on " in text and "## Router (held-out eval blocks)" in text
    assert "from the test split (spread); calibrated on 2 x " in text
    assert (rep / "router_accuracy.png").is_file()
    assert "### Policies (measured)" in text and "| expert_aware |" in text and "![hit_ratio.png](hit_ratio.png)" in text


def test_report_says_what_a_user_gets(finished_run):
    """The usability numbers (active parameters, perplexity and out-of-domain perplexity over dense, chat) in
    metrics.json, and every chat answer side by side in report.md."""
    out, _, _ = finished_run
    m = json.loads((out / "report" / "metrics.json").read_text())
    assert 0 < m["active_param_ratio"] < 1 and m["active_params"]["readme"] < m["active_params"]["dense"]
    assert m["ppl_ratio_geomean"] > 0 and "chat" not in m["ppl_ratio_per_domain"]
    assert set(m["ood_ppl_ratio_per_set"]) == {"ood_code", "ood_legal"} and m["ood_ppl_ratio"] > 0
    for name in ("dense", "pruned", "readme"):
        assert set(m["chat"][name]) >= {"degenerate_rate", "fact_retention", "teacher_nll"}
    answers = json.loads((out / "chat_eval" / "answers.json").read_text())
    assert len(answers["answers"]) == 4 and set(answers["answers"][0]) >= {"prompt", "dense", "pruned", "readme"}
    assert abs(sum(answers["summary"]["readme"]["expert_load"].values()) - 1) < 1e-9
    text = (out / "report" / "report.md").read_text()
    assert "## As a model to use" in text and "### Every chat answer" in text
    assert f"| {answers['answers'][0]['prompt']} |" in text
    assert "chat" in m["final_eval"]["domains"]  # the chat domain has its own expert


def test_results_carry_intervals_router_accuracy_and_wins(finished_run):
    out, _, _ = finished_run
    m = json.loads((out / "report" / "metrics.json").read_text())
    fe = m["final_eval"]
    for row, per_domain in fe["ppl"].items():  # every row, copied from refactor_eval or not, has an interval
        for d, v in per_domain.items():
            lo, hi = fe["ppl_ci"][row][d]
            assert lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9), (row, d, lo, v, hi)
            assert len(fe["nll_blocks"][row][d]) == fe["eval"]["blocks_per_domain"][d]
    assert m["ppl"]["readme_final"] == m["ppl"]["readme_trained"] == fe["ppl"]["readme_trained"]
    assert m["ppl"]["pruned_tuned"] == fe["ppl"]["pruned_dense_tuned"] and m["ppl_ci"]["readme_final"]
    for key in ("router_accuracy", "router_accuracy_router_only"):
        per_domain = fe[key.replace("accuracy", "accuracy_per_domain")]
        assert 0 <= fe[key] <= 1 and set(per_domain) == set(fe["domains"])
        assert fe[key] == pytest.approx(np.mean(list(per_domain.values())))
    assert m["router_accuracy"] == fe["router_accuracy"] and 0 <= m["locality"] <= 1
    w, comp = m["wins"], fe["comparison"]
    assert w["n_domains"] == len(comp) == len(fe["domains"])
    ppl_a, ppl_b = fe["ppl"]["readme_trained"], fe["ppl"]["pruned_dense_tuned"]
    assert w["better"] == sum(ppl_a[d] < ppl_b[d] for d in comp)
    assert w["significant"] == sum(c["hi"] < 0 for c in comp.values()) <= w["better"]
    assert all(c["lo"] <= c["mean_diff"] <= c["hi"] for c in comp.values())
    stage_seconds = [m[s]["seconds"] for s in STAGES[:-1]]
    assert m["main_job_seconds"] == pytest.approx(sum(stage_seconds), abs=0.05) and m["main_job_seconds"] > 0
    assert "report stage excluded" in m["main_job_seconds_note"]


def test_resume_skips_finished_stages(finished_run):
    out, first, second = finished_run
    assert any(line == "== baseline" for line in first)
    for stage in ("dense_eval", "refactor", "refactor_eval", "train"):
        assert any(line.startswith(f"== {stage}: done already") for line in second), (stage, second)
    for stage in ("baseline", "final_eval", "report"):
        assert f"== {stage}" in second


def test_export_is_readable_without_jax(finished_run, cache_dir, tmp_path):
    out, _, _ = finished_run
    args = cli.build_parser().parse_args(["export", "--config", "tiny_test", "--out", str(tmp_path / "x"),
                                          "--hf-experts", f"output_dir={out}", f"data.cache_dir={cache_dir}"])
    args.fn(args)
    hf = sorted(p.name for p in (tmp_path / "x" / "hf_experts").iterdir())
    assert hf == ["expert_0_pydoc", "expert_1_code", "expert_2_chat"], hf  # every expert as a standalone HF Llama
    assert (tmp_path / "x" / "hf_experts" / "expert_0_pydoc" / "model.safetensors").is_file()
    info = json.loads((tmp_path / "x" / "readme_moe.json").read_text())
    t = load_file(str(tmp_path / "x" / "readme_moe.safetensors"))
    E, Fe = info["n_experts"], info["expert_width"]
    L, D = info["model_config"]["n_layers"], info["model_config"]["d_model"]
    assert info["expert_layout"] == "split"  # the default: shared part once + expert-specific parts
    R = t["backbone.layers.wg"].shape[-1]
    assert t["backbone.layers.wg"].shape == (L, E, D, R) and t["experts.channel_index"].shape == (L, E, R)
    if "backbone.layers.shared_wg" in t:
        P = t["backbone.layers.shared_wg"].shape[-1]
        assert t["experts.shared_index"].shape == (L, P)
        # every layer: shared + specific channels (padding -1 excluded) = F_e per expert
        n = (t["experts.shared_index"] >= 0).sum(-1)[:, None] + (t["experts.channel_index"] >= 0).sum(-1)
        assert (n == Fe).all()
    else:
        assert R == Fe
    assert t["router.head"].shape[-1] == E
    assert (tmp_path / "x" / "tokenizer.json").is_file()
    from readme_jax.checkpoints import restore_params

    bp, _ = restore_params(out / "train" / "final" / "backbone")
    np.testing.assert_array_equal(t["backbone.layers.wd"], np.asarray(bp["layers"]["wd"]))


def test_config_errors_are_clear(tmp_path, cache_dir, capsys):
    with pytest.raises(ConfigError, match="unknown config key.*train.roundz"):
        _cfg(tmp_path, cache_dir, "train.roundz=3")
    rc = cli.main(["run", "--config", "tiny_test", "--no-progress", f"output_dir={tmp_path / 'o'}",
                   "model=/nonexistent/model.gguf"])
    assert rc == 2 and "model: path '/nonexistent/model.gguf' does not exist" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = cli.main(["run", "--config", "tiny_test", "--no-progress", f"output_dir={blocker / 'sub'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "is not writable" in err
    assert not (blocker / "sub").exists()
    rc = cli.main(["run", "--config", "no_such_preset"])
    assert rc == 2 and "no config file or preset named 'no_such_preset'" in capsys.readouterr().err


def test_every_preset_loads():
    for p in sorted(cli.CONFIG_DIR.glob("*.yaml")):
        cfg = cli.load_run_config(cli.build_parser().parse_args(["run", "--config", str(p)]))
        assert cfg.train.rounds >= 1, p


def test_colab_notebook_cells_run_on_cpu(finished_run, cache_dir):
    """Execute the notebook's code cells (not the Colab-only ones) with the tiny config. The run cell's
    `!readme-jax run ...` runs in this process through cli.main, its {NAME}s filled as IPython would."""
    out, _, _ = finished_run
    nb = json.loads((Path(__file__).resolve().parents[1] / "colab" / "readme_jax_tpu.ipynb").read_text())
    ns: dict = {}
    ran = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code" or "colab-only" in cell["metadata"].get("tags", []):
            continue
        src = "".join(cell["source"]).strip()
        if src.startswith("!readme-jax "):
            argv = shlex.split(src[1:].split(" || ")[0].format_map(ns))[1:]
            assert cli.main([argv[0], "--no-progress", *argv[1:]]) == 0
        else:
            exec(compile(src, "<notebook>", "exec"), ns)
        ran += 1
        if "parameters" in cell["metadata"].get("tags", []):  # papermill-style parameter injection
            ns.update(PRESET="tiny_test", OUTPUT_DIR=str(out),
                      OVERRIDES=f"data.cache_dir={cache_dir} stages=[" + ",".join(STAGES) + "]")
    assert ran >= 4
    assert (out / "report" / "report.md").is_file()


def test_calibration_and_test_blocks_are_spread_over_their_splits(finished_run):
    out, _, _ = finished_run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["convert"]["calib_sampling"] == cfg["eval"]["sampling"] == "spread"  # the defaults
    stats = load_stats(out / "refactor" / "stats.npz")
    assert stats.provenance["inputs"]["calib_sampling"] == "spread"
    ws = Workspace(tiny_run_config(out, cfg["data"]["cache_dir"]), progress=False, log=lambda _: None)
    d, L, n = ws.domains[0], cfg["eval"]["seq_len"], cfg["eval"]["blocks_per_domain"]
    stream = token_stream(d, "test", ws.tokenizer, sep_id=ws.sep_id, cache_dir=cfg["data"]["cache_dir"], progress=False)
    got = ws.eval_blocks()[d]
    starts = block_starts(len(stream), L, n, "spread")
    assert got.shape == (len(starts), L + 1)
    assert all(np.array_equal(got[i], stream[s:s + L + 1]) for i, s in enumerate(starts))
    if (len(stream) - 1) // L > n:  # a longer split than the sample: not its first blocks
        assert not np.array_equal(got, ws.blocks(d, "test", L, n, sampling="head"))

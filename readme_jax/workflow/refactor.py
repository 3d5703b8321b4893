"""Stages `refactor` and `refactor_eval`: dense -> calibrated experts -> MoE checkpoint, and the
four-way perplexity table (dense, MoE with oracle routing, MoE forced to a wrong expert, pruned
dense of the same activated width), with every row's per-block NLLs (``nll_blocks``) for intervals."""

from __future__ import annotations

import time

import numpy as np

from readme_jax import config as config_mod
from readme_jax.checkpoints import restore_params, save_params
from readme_jax.config import ModelConfig
from readme_jax.convert import experts as ex
from readme_jax.convert.calibrate import calibrate, save_stats
from readme_jax.convert.refit import refit_down_projections
from readme_jax.eval.perplexity import dense_block_nll, domain_ppl
from readme_jax.eval.routing import fixed_route_block_nll
from readme_jax.jsonfile import write_json
from readme_jax.workflow.workspace import Workspace


def run_refactor(ws: Workspace) -> dict:
    """Calibrate per domain (resumable per domain), extract experts, write the MoE checkpoint."""
    t0 = time.time()
    cfg = ws.cfg
    d = ws.stage_dir("refactor")
    model, _ = ws.dense
    dense = model.arrays()
    cc = cfg.convert
    batches = {}
    for name in ws.domains:
        blocks = ws.blocks(name, "train", cc.calib_seq_len, cc.calib_samples, sampling=cc.calib_sampling)[:, :-1]
        batches[name] = [blocks[i:i + cc.batch_size] for i in range(0, len(blocks), cc.batch_size)]
    inputs = {"calib_samples": cc.calib_samples, "calib_seq_len": cc.calib_seq_len, "batch_size": cc.batch_size,
              "calib_sampling": cc.calib_sampling,
              "data": config_mod.to_dict(cfg.data), "dtype": cfg.dtype}
    stats = calibrate(dense, model.cfg, batches, model_id=cfg.model, partial_dir=d / "calib_partial",
                      progress=ws.progress, inputs=inputs)
    save_stats(d / "stats.npz", stats)
    scores, pooled = ex.channel_scores(stats, dense["layers"]["wd"], cc.score)
    masks = ex.select_channels(scores, cc.r, pooled, cc.shared_fraction)
    moe, meta = ex.moe_arrays_from_dense(dense, masks, domains=list(stats.domains), r=cc.r, layout=cc.layout)
    pruned, pcfg = ex.pruned_dense_arrays(dense, pooled, meta["expert_width"], model.cfg)
    refit_s = 0.0
    if cc.refit:  # the same least-squares refit, on the same calibration tokens, for Read-ME and the pruned twin
        t1 = time.time()
        groups = [np.concatenate(batches[n]) for n in stats.domains]
        got = refit_down_projections(dense, model.cfg, groups, meta.get("shared_index"), meta["channel_index"],
                                     ridge=cc.refit_ridge, progress=ws.progress)
        moe["layers"].update({k: v.astype(moe["layers"][k].dtype) for k, v in got.items()})
        pidx = ex.pruned_channel_index(pooled, meta["expert_width"])
        got = refit_down_projections(dense, model.cfg, groups, pidx, None, ridge=cc.refit_ridge, progress=ws.progress)
        pruned["layers"]["wd"] = got["shared_wd"].astype(pruned["layers"]["wd"].dtype)
        refit_s = time.time() - t1
    np.savez(d / "experts.npz", masks=masks, channel_index=meta["channel_index"], permanent=meta["permanent"],
             shared_index=meta.get("shared_index", np.zeros((len(masks[0]), 0), np.int32)))
    json_meta = {"kind": "readme_moe", "model_config": config_mod.to_dict(model.cfg), "source": cfg.model,
                 "domains": meta["domains"], "n_experts": meta["n_experts"], "expert_width": meta["expert_width"],
                 "ffn_dim": meta["ffn_dim"], "r": meta["r"], "layout": meta["layout"],
                 "shared_width": int(moe["layers"]["shared_wg"].shape[-1]) if "shared_wg" in moe["layers"] else 0,
                 "specific_width": int(moe["layers"]["wg"].shape[-1]), "tokenizer_source": cfg.model}
    save_params(d / "moe", moe, json_meta, overwrite=True)
    save_params(d / "pruned", pruned, {"kind": "llama", "model_config": config_mod.to_dict(pcfg),
                                       "tokenizer_source": cfg.model}, overwrite=True)
    summary = ex.summarize(masks, model.cfg.d_model)
    summary["overlap_matrix_mean_over_layers"] = ex.expert_overlap(masks).mean(0).tolist()
    summary["calibration_tokens"] = dict(zip(stats.domains, stats.tokens_N.tolist()))
    summary.update(score=cc.score, refit=cc.refit, refit_seconds=round(refit_s, 1),
                   active=active_params(model.cfg, meta["expert_width"]))
    write_json(d / "summary.json", summary)
    ws.mark_done("refactor", {"domains": list(stats.domains), "expert_width": meta["expert_width"],
                              "permanent_per_layer": summary["permanent_per_layer"], "active": summary["active"]},
                 time.time() - t0)
    ws.log(f"refactor: {len(stats.domains)} experts of width {meta['expert_width']} "
           f"(permanent mean {np.mean(summary['permanent_per_layer']):.0f} channels/layer)")
    return summary


def active_params(cfg: ModelConfig, expert_width: int) -> dict:
    """Parameters a token uses, attention + FFN over the layers (embeddings and LM head excluded): dense
    and Read-ME (the shared part plus one expert = ``expert_width`` channels, as the pruned twin); the
    router's own transformer is counted apart. Zero padding of the split layout is not counted."""
    attn = cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.d_model
    ffn = 3 * cfg.d_model * cfg.ffn_dim
    dense = cfg.n_layers * (attn + ffn)
    readme = cfg.n_layers * (attn + 3 * cfg.d_model * expert_width)
    return {"dense": dense, "readme": readme, "ratio": readme / dense}


def load_moe(ws: Workspace):
    """``(params, cfg, meta, channel_index)`` of the refactored (untrained) MoE."""
    d = ws.out / "refactor"
    params, meta = restore_params(d / "moe")
    cfg = config_mod.from_dict(ModelConfig, meta["model_config"])
    ci = np.load(d / "experts.npz")["channel_index"]
    return params, cfg, meta, ci


def load_pruned(ws: Workspace):
    params, meta = restore_params(ws.out / "refactor" / "pruned")
    return params, config_mod.from_dict(ModelConfig, meta["model_config"])


def _dense_nll_blocks(ws: Workspace, blocks: dict, bs: int) -> dict:
    """The dense model's per-block NLLs: dense_eval's when it stored them, else computed here."""
    if ws.is_done("dense_eval") and "nll_blocks" in ws.done_info("dense_eval"):
        return ws.done_info("dense_eval")["nll_blocks"]
    model, _ = ws.dense
    return dense_block_nll(model.arrays(), model.cfg, blocks, bs, ws.progress, "dense")


def run_refactor_eval(ws: Workspace) -> dict:
    t0 = time.time()
    blocks = ws.eval_blocks()
    bs = ws.cfg.eval.batch_size
    moe, cfg, meta, _ = load_moe(ws)
    domains = meta["domains"]
    E = len(domains)
    nll = {"dense": _dense_nll_blocks(ws, blocks, bs), "moe_oracle": {}, "moe_wrong": {}}
    for d, b in blocks.items():
        if d not in domains:
            continue
        i = domains.index(d)
        nll["moe_oracle"][d] = fixed_route_block_nll(moe, cfg, ws.cfg.impl, b, i, bs)
        nll["moe_wrong"][d] = fixed_route_block_nll(moe, cfg, ws.cfg.impl, b, (i + 1) % E, bs)
    pruned, pcfg = load_pruned(ws)
    nll["pruned_dense"] = dense_block_nll(pruned, pcfg, blocks, bs, ws.progress, "pruned")
    out = {"ppl": {row: domain_ppl(v) for row, v in nll.items()},
           "nll_blocks": {row: {d: np.asarray(x).tolist() for d, x in v.items()} for row, v in nll.items()},
           "wrong_expert_rule": "domain i -> expert (i+1) mod E",
           "eval": {"split": ws.cfg.eval.split, "seq_len": ws.cfg.eval.seq_len,
                    "blocks_per_domain": {d: int(len(b)) for d, b in blocks.items()}}}
    write_json(ws.stage_dir("refactor_eval") / "table.json", out)
    ws.mark_done("refactor_eval", out, time.time() - t0)
    return out

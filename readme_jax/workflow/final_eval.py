"""Stage `final_eval`: the results table on held-out text, every row on the same blocks.

Rows: dense; pruned dense (same activated width) untuned and tuned with the experts' LM-token
budget; Read-ME with oracle (own-domain) routing before training; Read-ME with the round-0 router
and untouched experts ("router only"); Read-ME after all rounds. Every row keeps its per-block
NLLs (``nll_blocks``) and a 95 % bootstrap interval over blocks (``ppl_ci``); ``comparison`` is the
paired bootstrap of Read-ME against the tuned pruned dense per domain, summarised in ``wins``.
Router quality on the same blocks: accuracy against the domain label (domain d's expert is
``domains.index(d)``), locality and expert load per domain.
"""

from __future__ import annotations

import time

import numpy as np

from readme_jax import config as config_mod
from readme_jax.checkpoints import restore_params
from readme_jax.config import ModelConfig
from readme_jax.eval.perplexity import dense_block_nll, domain_ppl
from readme_jax.eval.routing import expert_load, locality, readme_domain_block_nll, route_accuracy, routes_for
from readme_jax.eval.spread import domain_comparison, domain_ppl_ci
from readme_jax.workflow.training import load_router_only, load_trained
from readme_jax.jsonfile import write_json
from readme_jax.workflow.workspace import Workspace

COPIED_ROWS = {"dense": "dense", "pruned_dense": "pruned_dense", "readme_oracle_untrained": "moe_oracle"}
CANDIDATE, REFERENCE = "readme_trained", "pruned_dense_tuned"


def run_final_eval(ws: Workspace) -> dict:
    t0 = time.time()
    blocks = ws.eval_blocks()
    nll, models = _row_nlls(ws, blocks)
    trained = models["readme_trained"]
    domains = list(trained.layout.domains)
    routes = {d: routes_for(trained, b, ws.cfg.eval.batch_size) for d, b in blocks.items()}
    acc = router_accuracy(routes, domains)
    out = {"ppl": {**_rows_without_blocks(ws, nll), **{row: domain_ppl(v) for row, v in nll.items()}},
           "ppl_ci": {row: domain_ppl_ci(v) for row, v in nll.items()},
           "nll_blocks": {row: {d: np.asarray(x).tolist() for d, x in v.items()} for row, v in nll.items()},
           **compare(nll),
           "router_accuracy_per_domain": acc, "router_accuracy": _mean(acc),
           "locality": {d: locality(r) for d, r in routes.items()},
           "locality_mean": _mean({d: locality(r) for d, r in routes.items()}),
           "expert_load": {d: expert_load(r, trained.n_experts).tolist() for d, r in routes.items()},
           "domains": domains,
           "eval": {"split": ws.cfg.eval.split, "seq_len": ws.cfg.eval.seq_len,
                    "blocks_per_domain": {d: int(len(b)) for d, b in blocks.items()}}}
    out["ood"] = _ood(ws, models["readme_trained"])
    if "readme_router_only" in models:
        r0 = {d: routes_for(models["readme_router_only"], b, ws.cfg.eval.batch_size) for d, b in blocks.items()}
        out["router_accuracy_per_domain_router_only"] = router_accuracy(r0, domains)
        out["router_accuracy_router_only"] = _mean(out["router_accuracy_per_domain_router_only"])
    write_json(ws.stage_dir("final_eval") / "table.json", out)
    ws.mark_done("final_eval", out, time.time() - t0)
    return out


def _row_nlls(ws: Workspace, blocks: dict) -> tuple[dict, dict]:
    """Per-block NLLs of every row (``row -> domain -> [N]``) and the Read-ME models evaluated
    (``row -> ReadMEModel``); refactor_eval's rows are reused when it stored per-block NLLs."""
    bs, impl = ws.cfg.eval.batch_size, ws.cfg.impl
    ref = ws.done_info("refactor_eval")
    nll = {row: ref["nll_blocks"][src] for row, src in COPIED_ROWS.items() if src in ref.get("nll_blocks", {})}
    if ws.is_done("baseline"):
        pp, pmeta = restore_params(ws.out / "baseline" / "pruned_tuned")
        pcfg = config_mod.from_dict(ModelConfig, pmeta["model_config"])
        nll["pruned_dense_tuned"] = dense_block_nll(pp, pcfg, blocks, bs, ws.progress, "pruned tuned")
    models = {"readme_router_only": load_router_only(ws), "readme_trained": load_trained(ws)}
    models = {row: m for row, m in models.items() if m is not None}
    for row, m in models.items():
        nll[row] = readme_domain_block_nll(m, impl, blocks, bs)
    return nll, models


def _ood(ws: Workspace, trained) -> dict:
    """Perplexity on text from none of the domains (data/ood.py) of dense, the tuned pruned twin and Read-ME,
    and each model's ratio to dense."""
    blocks, prov = ws.ood_blocks()
    if not blocks:
        return {}
    bs = ws.cfg.eval.batch_size
    dense, _ = ws.dense
    nll = {"dense": dense_block_nll(dense.arrays(), dense.cfg, blocks, bs, ws.progress, "dense ood")}
    if ws.is_done("baseline"):
        pp, pmeta = restore_params(ws.out / "baseline" / "pruned_tuned")
        pcfg = config_mod.from_dict(ModelConfig, pmeta["model_config"])
        nll["pruned_dense_tuned"] = dense_block_nll(pp, pcfg, blocks, bs, ws.progress, "pruned ood")
    nll["readme_trained"] = readme_domain_block_nll(trained, ws.cfg.impl, blocks, bs)
    routes = {d: routes_for(trained, b, bs) for d, b in blocks.items()}
    return {"ppl": {row: domain_ppl(v) for row, v in nll.items()},
            "ppl_ci": {row: domain_ppl_ci(v) for row, v in nll.items()},
            "ratio_to_dense": {row: {d: float(np.exp(np.mean(v[d]) - np.mean(nll["dense"][d]))) for d in v}
                               for row, v in nll.items() if row != "dense"},
            "expert_load": {d: expert_load(r, trained.n_experts).tolist() for d, r in routes.items()},
            "provenance": prov, "seq_len": ws.cfg.eval.seq_len,
            "blocks": {d: int(len(b)) for d, b in blocks.items()}}


def _rows_without_blocks(ws: Workspace, nll: dict) -> dict:
    """refactor_eval's perplexities for rows it stored no per-block NLLs for (older runs): no interval."""
    ref = ws.done_info("refactor_eval")["ppl"]
    return {row: ref[src] for row, src in COPIED_ROWS.items() if row not in nll and src in ref}


def compare(nll: dict, candidate: str = CANDIDATE, reference: str = REFERENCE) -> dict:
    """``comparison`` (paired bootstrap of candidate minus reference log-ppl per domain) and ``wins``
    (domains where the candidate's ppl is lower, and where that holds beyond the 95 % interval)."""
    if candidate not in nll or reference not in nll:
        return {"comparison": {}, "wins": None}
    comp, counts = domain_comparison(nll[candidate], nll[reference])
    wins = {"candidate": candidate, "reference": reference, "n_domains": len(comp),
            "better": counts["better"], "significant": counts["significant"]}
    return {"comparison": comp, "wins": wins}


def router_accuracy(routes: dict, domains: list[str]) -> dict:
    """Per domain, the fraction of its tokens routed to its own expert (``domains.index(d)``)."""
    return {d: route_accuracy(r, domains.index(d)) for d, r in routes.items() if d in domains}


def _mean(per_domain: dict) -> float:
    return float(np.mean(list(per_domain.values()))) if per_domain else float("nan")

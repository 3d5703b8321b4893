"""What a user of the trained model feels, from the finished stages: the headline numbers of metrics.json
(``active_param_ratio``, ``ppl_ratio_geomean``, ``ood_ppl_ratio``, ``chat``) and the report's section with
every chat answer of dense, the pruned twin and Read-ME side by side."""

from __future__ import annotations

import math

import numpy as np

from readme_jax.data import CHAT_DOMAIN

CHAT_KEYS = ("degenerate_rate", "fact_retention", "teacher_nll")
CHAT_COLUMNS = {"dense": "dense", "pruned": "pruned twin", "readme": "Read-ME"}


def _geomean(values) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x) and x > 0]
    return float(np.exp(np.mean(np.log(v)))) if v else None


def ppl_ratios(ppl: dict, row: str) -> dict[str, float]:
    """Per text domain (the chat domain excluded), ``row``'s perplexity over dense's."""
    dense = ppl.get("dense", {})
    return {d: ppl[row][d] / dense[d] for d in ppl.get(row, {}) if d in dense and d != CHAT_DOMAIN}


def usability_metrics(stages: dict) -> dict:
    """The headline keys of issue 27 (each present only when its stage is done)."""
    out: dict = {}
    ref = stages.get("refactor", {})
    if "active" in ref:
        out["active_param_ratio"] = ref["active"]["ratio"]
        out["active_params"] = ref["active"]
    fe = stages.get("final_eval")
    if fe:
        for row, key in (("readme_trained", "ppl_ratio_geomean"), ("pruned_dense_tuned", "ppl_ratio_geomean_pruned")):
            r = ppl_ratios(fe["ppl"], row)
            if r:
                out[key] = _geomean(r.values())
                out[key.replace("geomean", "per_domain")] = r
        ood = fe.get("ood", {}).get("ratio_to_dense", {})
        if "readme_trained" in ood:
            out["ood_ppl_ratio"] = _geomean(ood["readme_trained"].values())
            out["ood_ppl_ratio_per_set"] = ood["readme_trained"]
        if "pruned_dense_tuned" in ood:
            out["ood_ppl_ratio_pruned"] = _geomean(ood["pruned_dense_tuned"].values())
    ce = stages.get("chat_eval")
    if ce and "summary" in ce:
        out["chat"] = {name: {k: s.get(k) for k in (*CHAT_KEYS, "facts_stated", "n_facts", "empty_rate")}
                       for name, s in ce["summary"].items()}
    return out


def usability_section(metrics: dict, answers: dict | None) -> list[str]:
    """Markdown: the headline numbers, then every chat answer side by side."""
    u = usability_metrics(metrics)
    if not u:
        return []
    md = ["## As a model to use", ""]
    if "active_param_ratio" in u:
        a = u["active_params"]
        md.append(f"- Active parameters per token (attention + FFN; embeddings and LM head excluded): Read-ME "
                  f"{a['readme']:,} of dense's {a['dense']:,} = **{a['ratio']:.3f}** (the pruned twin: the same).")
    if "ppl_ratio_geomean" in u:
        md.append(f"- Perplexity over dense, geometric mean of the text domains: Read-ME "
                  f"**{u['ppl_ratio_geomean']:.2f}**, tuned pruned twin {_f(u.get('ppl_ratio_geomean_pruned'))}.")
    if "ood_ppl_ratio" in u:
        per = ", ".join(f"{k} {v:.2f}" for k, v in u["ood_ppl_ratio_per_set"].items())
        md.append(f"- Perplexity over dense on text from none of the domains: Read-ME **{u['ood_ppl_ratio']:.2f}** "
                  f"({per}); pruned twin {_f(u.get('ood_ppl_ratio_pruned'))}.")
    if "chat" in u:
        md += ["", "Chat, greedy through the model's chat template (`eval/chat_prompts.py`):", "",
               "| model | empty or degenerate | facts stated | fact retention | NLL of dense's answers (nats/token) |",
               "|---|---|---|---|---|"]
        for name, s in u["chat"].items():
            md.append(f"| {CHAT_COLUMNS.get(name, name)} | {100 * s['degenerate_rate']:.0f} % | "
                      f"{s['facts_stated']}/{s['n_facts']} | {_f(s['fact_retention'])} | {_f(s['teacher_nll'])} |")
        load = metrics.get("chat_eval", {}).get("summary", {}).get("readme", {}).get("expert_load")
        if load:
            top = sorted(load.items(), key=lambda kv: -kv[1])
            md += ["", "Read-ME's router on these chats (prompt through the template and its own answer): "
                   + ", ".join(f"{n} {100 * v:.0f} %" for n, v in top if v >= 0.005) + " of the tokens."]
    md.append("")
    if answers and answers.get("answers"):
        cols = [c for c in CHAT_COLUMNS if c in answers["answers"][0]]
        md += ["### Every chat answer", "", "| prompt | " + " | ".join(CHAT_COLUMNS[c] for c in cols) + " |",
               "|---|" + "---|" * len(cols)]
        for row in answers["answers"]:
            md.append(f"| {_cell(row['prompt'])} | " + " | ".join(_cell(row[c]) for c in cols) + " |")
        md.append("")
    return md


def _f(v, spec=".2f") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _cell(text: str, limit: int = 240) -> str:
    t = " ".join(text.split())
    t = t if len(t) <= limit else t[:limit - 1] + "…"
    return (t or "*(empty)*").replace("|", "\\|")

"""The export's model card (``README.md``): what the model is, how to load it, what it was measured at.

Written from the export's own JSON document (``readme_moe.json``) and, when the run has a report, the
measured perplexities of its ``report/metrics.json``; nothing on the card is typed by hand. The front
matter is the Hugging Face hub's model-card metadata (``library_name``, ``tags``, ``base_model``).
"""

from __future__ import annotations

from readme_jax.checkpoints.readme_io import EXPORT_INFO, EXPORT_TENSORS

FORMAT_DOC = "docs/EXPORT.md"


def _front_matter(doc: dict, base_model: str | None) -> str:
    lines = ["---", "library_name: readme-jax", "tags:", "- mixture-of-experts", "- read-me", "- jax"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    return "\n".join(lines + ["---", ""])


def _ppl_table(metrics: dict) -> list[str]:
    ppl = metrics.get("ppl") or {}
    rows = [(name, label) for name, label in (("dense", "dense source model"),
                                              ("pruned_tuned", "pruned dense, same active width, tuned"),
                                              ("readme_final", "**this model** (Read-ME, trained)"))
            if name in ppl]
    if not rows:
        return []
    domains = list(ppl[rows[0][0]])
    out = ["## Measured (held-out perplexity, lower is better)", "",
           "| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for name, label in rows:
        out.append(f"| {label} | " + " | ".join(f"{ppl[name].get(d, float('nan')):.2f}" for d in domains) + " |")
    extra = []
    if isinstance(metrics.get("router_accuracy"), (int, float)):
        extra.append(f"router accuracy against the domain label {metrics['router_accuracy']:.3f}")
    if isinstance(metrics.get("locality"), (int, float)):
        extra.append(f"locality {metrics['locality']:.3f} (share of tokens keeping the previous token's expert)")
    return out + ([""] + ["; ".join(extra).capitalize() + "."] if extra else []) + [""]


def model_card(doc: dict, *, metrics: dict | None = None, source: str | None = None, base_model: str | None = None,
               budget: dict | None = None) -> str:
    """Markdown for ``README.md`` beside an export described by ``doc`` (the ``readme_moe.json`` content);
    ``source`` is the dense model it was refactored from (free text), ``base_model`` its hub id if any."""
    mc = doc["model_config"]
    domains = doc.get("domains") or []
    experts = ", ".join(f"{i}: {d}" for i, d in enumerate(domains)) or f"{doc['n_experts']} (no domain names)"
    lines = [_front_matter(doc, base_model), "# Read-ME mixture of experts (readme-jax export)", "",
             "A dense Llama refactored into a router-decoupled mixture of experts (Read-ME, Cai et al., "
             "NeurIPS 2024): a small causal router picks one expert per token, before the backbone runs, "
             "and that expert serves the token in every layer.", "",
             "## The model", "",
             f"- Backbone: {mc['n_layers']} layers, width {mc['d_model']}, {mc['n_heads']} heads "
             f"({mc['n_kv_heads']} KV heads), vocabulary {mc['vocab_size']}.",
             f"- Experts: {doc['n_experts']} ({experts}); layout `{doc['expert_layout']}`"
             + (" (a shared FFN part every token uses, stored once, plus each expert's own part)"
                if doc["expert_layout"] == "split" else "") + ".",
             f"- Router: `router_model_config` in `{EXPORT_INFO}` ({doc['router_model_config']['n_layers']} "
             f"layer(s), width {doc['router_model_config']['d_model']}).",
             ]
    if source or base_model:
        lines.append(f"- Refactored from: {source or base_model}.")
    if budget:
        lines.append("- Training: " + ", ".join(f"{k} {v}" for k, v in budget.items()) + ".")
    lines += ["", "## Load it", "", "```python", "import readme_jax",
              "model = readme_jax.load(\"THIS_FOLDER\")      # bitwise the exported weights",
              "llm = readme_jax.LLM.open(\"THIS_FOLDER\")     # text in, text out", "```", "",
              f"Files: `{EXPORT_INFO}` (format `{doc['format']}` v{doc['version']}: configs and every tensor's "
              f"shape), `{EXPORT_TENSORS}` (tensor names in readme-jax's {FORMAT_DOC}), "
              "`tokenizer.json` when the run had one; `hf_experts/` when exported with `--hf-experts` "
              "(each expert as a standalone Llama transformers loads).", ""]
    if metrics:
        lines += _ppl_table(metrics)
    return "\n".join(lines)

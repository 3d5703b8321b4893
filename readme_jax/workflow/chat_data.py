"""Stage `chat_data`: self-distilled chat data, the ``chat`` domain (``data.chat_prompts`` > 0).

Prompts are built offline from the text domains' train splits (``data/chat_prompts.py``; none mentions
what the evaluation prompt set asks, ``eval/chat_prompts.KEY_WORDS``); the dense source model answers
each one greedily through its own chat template, once. Empty and degenerate answers (``eval/chat.py``)
are dropped. Each kept conversation, rendered as the model saw it (template, answer, and the end-of-turn
token when the model wrote one), is one document of the ``chat`` domain, cached beside the fetched
domains with its provenance: the key of everything that made it (source model files, dtype, prompts,
answer length, format). A rerun with the same key reuses it; another model or setting regenerates it.
The domain then splits, tokenizes, calibrates an expert and trains like any other.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter

from tqdm.auto import tqdm

from readme_jax.data import CHAT_DOMAIN, Document, domain_meta, load_split, write_generated_domain
from readme_jax.data.chat_prompts import FORMAT as PROMPTS_FORMAT
from readme_jax.data.chat_prompts import build_prompts, prompts_sha256
from readme_jax.errors import DataError
from readme_jax.eval.chat import is_degenerate
from readme_jax.eval.chat_prompts import KEY_WORDS
from readme_jax.model.readme_model import DenseModel
from readme_jax.serve.engine import greedy_batch
from readme_jax.workflow.workspace import Workspace

FORMAT = "readme-jax-chat-data-v1"


def chat_prompts_for(ws: Workspace) -> list[dict]:
    """The self-distillation prompts of this run (deterministic in the text domains, count and seed)."""
    docs = {d: load_split(d, "train", ws.cfg.data.cache_dir, progress=False) for d in ws.text_domains}
    return build_prompts(docs, ws.cfg.data.chat_prompts, ws.cfg.seed, exclude=KEY_WORDS)


def chat_key(ws: Workspace, prompts: list[dict]) -> str:
    """Everything the chat domain's text depends on, hashed."""
    d = ws.cfg.data
    parts = {"format": FORMAT, "prompts_format": PROMPTS_FORMAT, "prompts": prompts_sha256(prompts),
             "source": ws.settings("chat_data")["source"], "dtype": ws.cfg.dtype,
             "max_new_tokens": d.chat_max_new_tokens, "decoding": "greedy"}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cached_chat_key(ws: Workspace) -> str | None:
    meta = domain_meta(CHAT_DOMAIN, ws.cfg.data.cache_dir)
    return None if meta is None else meta.get("provenance", {}).get("key")


def run_chat_data(ws: Workspace) -> dict:
    t0 = time.time()
    d = ws.cfg.data
    ws.stage_dir("chat_data")
    if d.chat_prompts == 0:
        info = {"enabled": False}
        ws.mark_done("chat_data", info, time.time() - t0)
        return info
    prompts = chat_prompts_for(ws)
    key = chat_key(ws, prompts)
    if cached_chat_key(ws) == key:
        info = {**domain_meta(CHAT_DOMAIN, d.cache_dir)["provenance"]["summary"], "reused": True}
        ws.log(f"chat_data: reusing the cached chat domain (key {key})")
    else:
        info = {**_generate(ws, prompts, key), "reused": False}
    info.update(enabled=True, key=key)
    ws.mark_done("chat_data", info, time.time() - t0)
    return info


def _generate(ws: Workspace, prompts: list[dict], key: str) -> dict:
    model, tok = ws.dense
    if not tok.chat_template:
        raise DataError(f"chat_data: {tok.source}: the tokenizer has no chat template (a base model), so the dense "
                        "model cannot write chat answers; run with data.chat_prompts=0 (no chat domain)")
    dense = DenseModel.from_module(model)
    max_new = ws.cfg.data.chat_max_new_tokens
    rendered = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], add_generation_prompt=True)
                for p in prompts]
    ids = [tok.encode(r, add_bos=False) for r in rendered]
    bar = tqdm(total=len(ids), desc="chat_data: dense answers", unit="prompt", disable=not ws.progress)
    answers = greedy_batch(dense, ids, max_new, eos_id=tok.eos_id, progress=lambda n: bar.update(n - bar.n))
    bar.close()
    docs, dropped = [], {"empty": 0, "degenerate": 0}
    n_tokens = 0
    for p, text, out in zip(prompts, rendered, answers):
        closed = bool(out) and out[-1] == tok.eos_id
        body = out[:-1] if closed else out
        answer = tok.decode(body, skip_special=True)
        if not answer.strip():
            dropped["empty"] += 1
            continue
        if is_degenerate(body, answer):
            dropped["degenerate"] += 1
            continue
        end = tok.decode([tok.eos_id], skip_special=False) + "\n" if closed else ""
        docs.append(Document(id=p["id"], text=text + answer + end, group=p["id"]))
        n_tokens += len(body)
    if len(docs) < 3:
        raise DataError(f"chat_data: only {len(docs)} usable answers of {len(prompts)} prompts "
                        f"({dropped}); the dense model cannot make chat data")
    summary = {"prompts": len(prompts), "kept": len(docs), "dropped": dropped, "answer_tokens": n_tokens,
               "closed": sum(1 for a in answers if a and a[-1] == tok.eos_id),
               "sources": dict(sorted(Counter(p["source"] for p in prompts).items()))}
    prov = {"source": "the dense source model's greedy answers to prompts built from the text domains' train "
                      "splits (readme_jax/data/chat_prompts.py), through its chat template",
            "package": "generated by readme-jax (stage chat_data)", "license": "as the source model's outputs",
            "model": ws.cfg.model, "key": key, "format": FORMAT, "max_new_tokens": ws.cfg.data.chat_max_new_tokens,
            "summary": summary}
    write_generated_domain(CHAT_DOMAIN, docs, prov, ws.cfg.data.cache_dir)
    ws.log(f"chat_data: {len(docs)} conversations kept of {len(prompts)} ({dropped}), {n_tokens} answer tokens")
    return summary

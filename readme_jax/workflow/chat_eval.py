"""Stage `chat_eval`: what a user of the chat template gets from dense, the tuned pruned twin and Read-ME.

Every prompt of ``eval/chat_prompts.py`` goes through the dense model's chat template (its default
system prompt, as ``readme-jax generate --chat`` does); each model answers greedily, up to
``eval.chat_max_new_tokens`` tokens. Metrics per model (``eval/chat.py``): the rate of empty or
degenerate answers, the facts stated, fact retention (of the facts dense states, the share the model
states too), and ``teacher_nll``: the mean NLL per token, under the model, of the dense model's own
answers. ``chat_eval/answers.json`` keeps every answer side by side for the report.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np

from readme_jax import config as config_mod
from readme_jax.checkpoints import restore_params
from readme_jax.config import ModelConfig
from readme_jax.eval.chat import answer_nll, chat_summary
from readme_jax.eval.chat_prompts import chat_prompts
from readme_jax.jsonfile import write_json
from readme_jax.model import decoder
from readme_jax.model.readme_model import DenseModel, ReadMEModel
from readme_jax.serve.engine import greedy_batch
from readme_jax.workflow.training import load_trained
from readme_jax.workflow.workspace import Workspace

MODELS = ("dense", "pruned", "readme")  # the order of the report's columns


@functools.partial(jax.jit, static_argnames=("cfg",))
def _dense_logits(params, tokens_BT, *, cfg: ModelConfig):
    return decoder.forward(params, cfg, tokens_BT)[0]


@jax.jit
def _readme_logits(model: ReadMEModel, tokens_BT):
    return model(tokens_BT).logits


def logits_fn(model):
    """``tokens_BT -> float32 logits`` of a DenseModel or ReadMEModel (jitted once per shape)."""
    if isinstance(model, ReadMEModel):
        return functools.partial(_readme_logits, model)
    return functools.partial(_dense_logits, model.params, cfg=model.cfg)


def chat_models(ws: Workspace) -> dict:
    """``{"dense", "pruned", "readme"}``: the source model, the tuned pruned twin (when the baseline stage ran),
    the trained Read-ME."""
    dense, _ = ws.dense
    models = {"dense": DenseModel.from_module(dense)}
    if ws.is_done("baseline"):
        pp, pmeta = restore_params(ws.out / "baseline" / "pruned_tuned")
        pcfg = config_mod.from_dict(ModelConfig, pmeta["model_config"])
        models["pruned"] = DenseModel(pp, pcfg).validate("pruned twin")
    return {**models, "readme": load_trained(ws)}


def run_chat_eval(ws: Workspace) -> dict:
    t0 = time.time()
    tok = ws.tokenizer
    if not tok.chat_template:
        out = {"enabled": False, "reason": f"{tok.source}: the tokenizer has no chat template (a base model)"}
        ws.log(f"chat_eval: skipped: {out['reason']}")
        ws.mark_done("chat_eval", out, time.time() - t0)
        return out
    prompts = chat_prompts()
    if ws.cfg.eval.chat_limit:
        prompts = prompts[:ws.cfg.eval.chat_limit]
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p["prompt"]}],
                                              add_generation_prompt=True), add_bos=False) for p in prompts]
    models = chat_models(ws)
    max_new = ws.cfg.eval.chat_max_new_tokens
    answers, texts = {}, {}
    for name, m in models.items():
        ws.log(f"chat_eval: {name} answers {len(ids)} prompts")
        answers[name] = greedy_batch(m, ids, max_new, eos_id=tok.eos_id)
        texts[name] = [tok.decode(_body(a, tok.eos_id), skip_special=True) for a in answers[name]]
    summary = {}
    for name, m in models.items():
        nll = answer_nll(logits_fn(m), ids, answers["dense"], batch_size=ws.cfg.eval.batch_size)
        summary[name] = chat_summary(prompts, texts[name], [_body(a, tok.eos_id) for a in answers[name]],
                                     None if name == "dense" else texts["dense"], nll)
    summary["readme"]["expert_load"] = _expert_load(models["readme"], ids, answers["readme"])
    rows = [{**p, **{name: texts[name][i] for name in models}} for i, p in enumerate(prompts)]
    out = {"summary": summary, "max_new_tokens": max_new, "n_prompts": len(prompts),
           "template": "the model's chat template with its default system prompt, one user turn",
           "decoding": "greedy"}
    write_json(ws.stage_dir("chat_eval") / "answers.json", {**out, "answers": rows})
    ws.mark_done("chat_eval", out, time.time() - t0)
    for name, s in summary.items():
        ws.log(f"  chat {name:7s} degenerate {s['degenerate_rate']:.2f}  facts {s['facts_stated']}/{s['n_facts']}  "
               f"retention {_num(s['fact_retention'])}  teacher NLL {_num(s['teacher_nll'])}")
    return out


def _expert_load(model: ReadMEModel, prompt_ids: list, answers: list) -> dict:
    """Share of the chat tokens (prompts through the template, and Read-ME's own answers) the router sends to
    each expert, by the domain each expert was built for."""
    counts = np.zeros(model.n_experts)
    for p, a in zip(prompt_ids, answers):
        n = len(p) + len(a)
        seq = np.zeros((1, -(-n // 64) * 64), np.int32)  # padded at the end (causal): one compile per 64 tokens
        seq[0, :n] = list(p) + list(a)
        counts += np.bincount(np.asarray(_routes(model, seq))[0, :n], minlength=model.n_experts)
    names = model.layout.domains or tuple(f"expert{e}" for e in range(model.n_experts))
    return {n: float(c / counts.sum()) for n, c in zip(names, counts)}


@jax.jit
def _routes(model: ReadMEModel, tokens_BT):
    return model.routes(tokens_BT)[0]


def _num(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def _body(tokens: list[int], eos_id: int | None) -> list[int]:
    """The answer without its closing end-of-turn token."""
    return tokens[:-1] if tokens and tokens[-1] == eos_id else list(tokens)

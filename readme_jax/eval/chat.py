"""Chat quality of a model against its dense source: degenerate answers, fact retention, and the NLL of
the dense model's own answers (``teacher_nll``).

* ``degenerate``: an answer that is empty (no visible text) or repeats one token 4-gram 3 or more times;
* ``fact_retention``: of the facts the dense model states, the share the model states too (a fact is
  stated when one of its accepted answers occurs in the answer, case-insensitive);
* ``teacher_nll``: mean per-token NLL, under the model, of the dense model's greedy answers to the same
  prompts (answer tokens only, the closing end-of-turn token included when the dense model wrote it).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.model import decoder

NGRAM, REPEATS = 4, 3


def is_degenerate(token_ids: Sequence[int], text: str) -> bool:
    """Empty (no visible text), or some token ``NGRAM``-gram occurs ``REPEATS`` or more times."""
    if not text.strip():
        return True
    ids = list(token_ids)
    grams = Counter(tuple(ids[i:i + NGRAM]) for i in range(len(ids) - NGRAM + 1))
    return bool(grams) and max(grams.values()) >= REPEATS


def states(text: str, answers: Sequence[str]) -> bool:
    """Whether ``text`` contains one of the accepted ``answers`` (lower-cased substrings)."""
    low = text.lower()
    return any(a.lower() in low for a in answers)


def chat_summary(prompts: Sequence[dict], texts: Sequence[str], token_ids: Sequence[Sequence[int]],
                 dense_texts: Sequence[str] | None, answer_nll: float | None) -> dict:
    """The chat metrics of one model's answers (``prompts`` from ``eval.chat_prompts.chat_prompts()``, in order).

    ``dense_texts``: the dense model's answers to the same prompts (for ``fact_retention``; None for the
    dense model itself, whose retention is 1 by definition). ``fact_retention`` is None when dense states no fact."""
    if not (len(prompts) == len(texts) == len(token_ids)):
        raise ValueError(f"{len(prompts)} prompts, {len(texts)} answers, {len(token_ids)} token lists")
    degenerate = [is_degenerate(t, x) for t, x in zip(token_ids, texts)]
    facts = [i for i, p in enumerate(prompts) if p["answers"]]
    stated = [i for i in facts if states(texts[i], prompts[i]["answers"])]
    if dense_texts is None:
        known = stated
    else:
        known = [i for i in facts if states(dense_texts[i], prompts[i]["answers"])]
    kept = [i for i in known if i in stated]
    return {"n_prompts": len(prompts), "degenerate_rate": float(np.mean(degenerate)) if degenerate else 0.0,
            "empty_rate": float(np.mean([not x.strip() for x in texts])) if texts else 0.0,
            "facts_stated": len(stated), "n_facts": len(facts), "facts_known_to_dense": len(known),
            "fact_retention": len(kept) / len(known) if known else None,
            "teacher_nll": answer_nll, "mean_answer_tokens": float(np.mean([len(t) for t in token_ids]))}


def answer_nll(logits_fn: Callable, prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]],
               batch_size: int = 8, pad_id: int = 0) -> float | None:
    """Mean NLL per answer token of ``answer_ids[i]`` after ``prompt_ids[i]`` under ``logits_fn(tokens_BT)``
    (float32 logits ``[B, T, V]``; None without any answer token); rows are padded at the end to a multiple
    of 32 tokens (causal: the padding never reaches a scored position)."""
    rows = [(list(p), list(a)) for p, a in zip(prompt_ids, answer_ids) if a]
    if not rows:
        return None
    total, count = 0.0, 0
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        T = max(len(p) + len(a) for p, a in chunk)
        T = -(-T // 32) * 32
        tok = np.full((len(chunk), T), pad_id, np.int32)
        mask = np.zeros((len(chunk), T - 1), np.float32)
        for i, (p, a) in enumerate(chunk):
            seq = p + a
            tok[i, :len(seq)] = seq
            mask[i, len(p) - 1:len(seq) - 1] = 1.0  # position t predicts token t+1: the answer's tokens
        nll = _masked_nll(logits_fn(jnp.asarray(tok)), jnp.asarray(tok), jnp.asarray(mask))
        total += float(nll)
        count += int(mask.sum())
    return total / count


@jax.jit
def _masked_nll(logits_BTV, tokens_BT, mask_BT1):
    nll = decoder.token_nll(logits_BTV[:, :-1], tokens_BT[:, 1:])
    return jnp.sum(nll * mask_BT1)

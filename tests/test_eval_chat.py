"""Chat metrics (eval/chat.py) on hand-made answers, the teacher NLL against float64 numpy, and the prompt set."""

import jax.numpy as jnp
import numpy as np
import pytest

from readme_jax.eval.chat import answer_nll, chat_summary, is_degenerate, states
from readme_jax.eval.chat_prompts import KEY_WORDS, chat_prompts


def test_degenerate_answers():
    assert is_degenerate([], "")
    assert is_degenerate([5, 6], "  \n ")  # no visible text
    loop = [1, 2, 3, 4] * 3  # one 4-gram three times
    assert is_degenerate(loop, "the language of the language of the language of")
    assert not is_degenerate([1, 2, 3, 4] * 2 + [9], "twice is fine")
    assert not is_degenerate(list(range(40)), "Paris is the capital of France.")
    assert is_degenerate([7] * 6, "aaaaaa")  # (7,7,7,7) occurs 3 times


def test_states_is_case_insensitive_substring():
    assert states("The capital of France is PARIS.", ["paris"])
    assert states("It has 8 legs.", ["eight", "8"])
    assert not states("I do not know.", ["paris"])


def test_chat_summary_counts_and_retention():
    prompts = [{"prompt": "a", "answers": ["paris"]}, {"prompt": "b", "answers": ["tokyo"]},
               {"prompt": "c", "answers": ["7", "seven"]}, {"prompt": "d", "answers": []}]
    dense = ["Paris.", "Tokyo.", "I am not sure.", "A story."]
    model = ["It is Paris.", "Kyoto.", "Seven days.", ""]
    toks = [[1, 2], [3], [4, 5], []]
    s = chat_summary(prompts, model, toks, dense, 1.25)
    assert s["n_prompts"] == 4 and s["degenerate_rate"] == 0.25 and s["empty_rate"] == 0.25
    assert s["facts_stated"] == 2 and s["n_facts"] == 3 and s["facts_known_to_dense"] == 2
    assert s["fact_retention"] == 0.5  # dense knows paris and tokyo; the model keeps paris only
    assert s["teacher_nll"] == 1.25
    d = chat_summary(prompts, dense, [[1], [2], [3], [4]], None, 0.5)
    assert d["fact_retention"] == 1.0 and d["degenerate_rate"] == 0.0
    none = chat_summary(prompts, ["x"] * 4, [[1]] * 4, ["y"] * 4, None)
    assert none["fact_retention"] is None  # dense states no fact: nothing to retain
    with pytest.raises(ValueError):
        chat_summary(prompts, model[:2], toks, dense, None)


def test_answer_nll_matches_float64_numpy():
    rng = np.random.default_rng(int(np.random.randint(1 << 30)))
    V = 11
    table = rng.normal(size=(V, V)) * 2  # logits at a position depend on that position's token only

    def logits_fn(tok_BT):
        return jnp.asarray(table, jnp.float32)[tok_BT]

    prompts = [list(rng.integers(0, V, n)) for n in (3, 5, 2)]
    answers = [list(rng.integers(0, V, n)) for n in (4, 1, 6)]
    got = answer_nll(logits_fn, prompts, answers, batch_size=2)
    logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
    nll = []
    for p, a in zip(prompts, answers):
        seq = p + a
        nll += [-logp[seq[t - 1], seq[t]] for t in range(len(p), len(seq))]
    assert got == pytest.approx(float(np.mean(nll)), rel=1e-5)
    assert answer_nll(logits_fn, prompts, [[], [], []]) is None


def test_prompt_set_has_facts_and_every_kind():
    ps = chat_prompts()
    kinds = {p["kind"] for p in ps}
    assert len(ps) >= 40 and kinds == {"fact", "code", "instruction", "story", "domain"}
    assert len({p["prompt"] for p in ps}) == len(ps)
    facts = [p for p in ps if p["kind"] == "fact"]
    assert len(facts) >= 8 and all(p["answers"] for p in facts)
    assert all(w == w.lower() for w in KEY_WORDS)

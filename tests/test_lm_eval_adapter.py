"""The lm-evaluation-harness model ``readme-jax`` on a tiny random run folder (Read-ME, dense, pruned):
scores against a float64 reference from the model's own logits, greedy flags, stop strings, the
rolling windows, the local multiple-choice task and lm_eval's evaluator end to end."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from readme_jax import cli  # noqa: E402
from readme_jax.bench import lm_eval_adapter  # noqa: E402
from readme_jax.bench.lm_eval_adapter import ReadmeJaxLM  # noqa: E402
from readme_jax.checkpoints import save_params  # noqa: E402
from readme_jax.checkpoints.readme_io import TINY_RANDOM_SOURCE, save_readme  # noqa: E402
from readme_jax.config import tiny_model_config, to_dict  # noqa: E402
from readme_jax.eval import mc_task  # noqa: E402
from readme_jax.eval.loglik import length_buckets  # noqa: E402
from readme_jax.model import decoder  # noqa: E402

from conftest import random_llama_arrays, tiny_readme  # noqa: E402

MAX_LEN = 32
KINDS = ("readme", "dense", "pruned")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, byte_tokenizer):
    """A run folder as the workflow leaves it: config.json, train/final, tiny_model (the dense
    source, with the tokenizer) and baseline/pruned_tuned."""
    d = tmp_path_factory.mktemp("run")
    cfg = tiny_model_config(vocab_size=byte_tokenizer.vocab_size, max_seq_len=128)
    (d / "config.json").write_text(json.dumps({"model": TINY_RANDOM_SOURCE}))
    save_readme(d / "train" / "final", tiny_readme(3, 0, 1, cfg=cfg))
    save_params(d / "tiny_model", random_llama_arrays(cfg, 2), {"kind": "llama", "model_config": to_dict(cfg)},
                tokenizer=byte_tokenizer)
    pcfg = tiny_model_config(vocab_size=byte_tokenizer.vocab_size, max_seq_len=128, ffn_dim=24)
    save_params(d / "baseline" / "pruned_tuned", random_llama_arrays(pcfg, 3),
                {"kind": "llama", "model_config": to_dict(pcfg)})
    return d


@pytest.fixture(scope="module")
def lms(run_dir):
    return {k: ReadmeJaxLM(path=str(run_dir), model=k, batch_size=3, max_length=MAX_LEN) for k in KINDS}


def reference(model, tokens, n):
    """float64 ``(sum of the last n tokens' log-probs, all greedy)`` from one unpadded forward."""
    x = jnp.asarray([tokens[:-1]], jnp.int32)
    logits = model(x).logits if model.is_moe else decoder.forward(model.params, model.cfg, x)[0]
    z = np.asarray(logits, np.float64)[0]
    m = z.max(-1, keepdims=True)
    lp = z - (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))
    tgt = np.asarray(tokens[1:])
    per = lp[np.arange(len(tgt)), tgt]
    return per[-n:].sum(), bool((z.argmax(-1) == tgt)[-n:].all())


def _instance(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def test_buckets():
    assert length_buckets(256) == (32, 64, 128, 256)
    assert length_buckets(100) == (32, 64, 100)


@pytest.mark.parametrize("kind", KINDS)
def test_loglikelihood_matches_float64_reference(lms, kind):
    lm = lms[kind]
    rng = np.random.default_rng(7)
    reqs = []
    for _ in range(7):  # several lengths and buckets, some truncated on the left, a short last batch
        ctx = rng.integers(3, 259, int(rng.integers(1, 45))).tolist()
        cont = rng.integers(3, 259, int(rng.integers(1, 9))).tolist()
        reqs.append((("", ""), ctx, cont))
    got = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    for (_, ctx, cont), (lp, greedy) in zip(reqs, got):
        want, want_greedy = reference(lm.model, (ctx + cont)[-(MAX_LEN + 1):], len(cont))
        assert lp == pytest.approx(want, rel=1e-4, abs=1e-3)
        assert greedy == want_greedy


@pytest.mark.parametrize("kind", ["readme", "dense"])
def test_is_greedy(lms, kind):
    lm = lms[kind]
    ctx = [40, 50, 60, 70, 80]
    toks = list(ctx)
    for _ in range(4):  # the model's own greedy continuation
        x = jnp.asarray([toks], jnp.int32)
        logits = lm.model(x).logits if lm.model.is_moe else decoder.forward(lm.model.params, lm.model.cfg, x)[0]
        toks.append(int(np.asarray(logits)[0, -1].argmax()))
    cont = toks[len(ctx):]
    other = cont[:2] + [(cont[2] + 1) % 259 or 3] + cont[3:]
    (lp_g, g), (lp_o, o) = lm._loglikelihood_tokens([(("", ""), ctx, cont), (("", ""), ctx, other)], disable_tqdm=True)
    assert g and not o and lp_g > lp_o


def test_loglikelihood_of_text_encodes_the_pair(lms, byte_tokenizer):
    lm = lms["readme"]
    (lp, _), = lm.loglikelihood([_instance("loglikelihood", ("Hello", " world"))], disable_tqdm=True)
    ids = byte_tokenizer.encode("Hello world")
    assert lp == pytest.approx(reference(lm.model, ids, len(ids) - 5)[0], rel=1e-4, abs=1e-3)


def test_loglikelihood_rolling_sums_the_windows(lms, byte_tokenizer):
    lm = lms["dense"]
    short, long = "abc def", "the quick brown fox jumps over the lazy dog " * 2  # 88 tokens: 3 windows
    got = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (t,), i) for i, t in enumerate((short, long))],
                                   disable_tqdm=True)
    ids = byte_tokenizer.encode(short)
    assert got[0] == pytest.approx(reference(lm.model, [lm.eot_token_id] + ids, len(ids))[0], rel=1e-4, abs=1e-3)
    windows = [make_disjoint_window(w) for w in
               get_rolling_token_windows(byte_tokenizer.encode(long), lm.eot_token_id, MAX_LEN, 1)]
    assert len(windows) == 3
    want = sum(reference(lm.model, c + t, len(t))[0] for c, t in windows)
    assert got[1] == pytest.approx(want, rel=1e-4, abs=1e-3)


def test_generate_until_stops_at_the_stop_string(lms):
    lm = lms["readme"]
    free, = lm.generate_until([_instance("generate_until", ("Once upon", {"until": ["\x00"], "max_gen_toks": 12}))],
                              disable_tqdm=True)
    assert len(free) >= 4
    stop = free[2:4]
    cut = free[:free.index(stop)]
    got = lm.generate_until([_instance("generate_until", ("Once upon", {"until": [stop], "max_gen_toks": 12}), 0),
                             _instance("generate_until", ("Once upon", {"until": ["\x00"], "max_gen_toks": 3}), 1)],
                            disable_tqdm=True)
    assert got[0] == cut and stop not in got[0]
    assert free.startswith(got[1]) and len(got[1]) < len(free)  # max_gen_toks honoured (greedy: a prefix)


def test_model_args_batch_size_wins_over_lm_evals_default(run_dir):
    lm = ReadmeJaxLM.create_from_arg_string(f"path={run_dir},model=dense,batch_size=5,max_length=16",
                                            {"batch_size": 1, "max_batch_size": None, "device": "cpu"})
    assert (lm.batch_size, lm.max_length, lm.kind) == (5, 16, "dense")


def _items():
    return [{"id": f"s{i}", "domain": "synth", "context": f"Item {i}: the answer is",
             "choices": [" yes", " no", " maybe", " never"], "gold": i % 4} for i in range(6)]


def test_simple_evaluate_runs_the_local_task(run_dir, tmp_path):
    mc_task.write_task(tmp_path / "task", {"synth": _items()}, group="tiny_mc")
    out = simple_evaluate(model=lm_eval_adapter.MODEL_NAME, model_args=f"path={run_dir},model=readme,max_length=64",
                          tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path / "task")),
                          batch_size=4, log_samples=False)
    acc = out["results"]["tiny_mc_synth"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and out["results"]["tiny_mc"]["acc,none"] == pytest.approx(acc)


def test_mc_items_hold_the_true_continuation(byte_tokenizer, monkeypatch):
    text = "".join(f"line {i}: some words here. " for i in range(200)).encode()
    sep = byte_tokenizer.token_to_id("<|endoftext|>")
    stream = np.asarray(byte_tokenizer.encode(text.decode()) + [sep] + byte_tokenizer.encode("tail text"), np.int32)
    monkeypatch.setattr(mc_task, "token_stream", lambda *a, **k: stream)
    items = mc_task.domain_items("synth", byte_tokenizer, 5, ctx_len=24, cont_len=8, seed=3)
    again = mc_task.domain_items("synth", byte_tokenizer, 5, ctx_len=24, cont_len=8, seed=3)
    assert items == again and len(items) == 5
    full = byte_tokenizer.decode(stream[:len(stream) - 10].tolist())
    for it in items:
        assert len(set(it["choices"])) == 4
        assert it["context"] + it["choices"][it["gold"]] in full  # the true next text


def test_cli_hands_every_argument_to_lm_eval(monkeypatch):
    seen = []
    monkeypatch.setattr(lm_eval_adapter, "main", seen.append)
    assert cli.main(["lm-eval", "--model", "readme-jax", "--tasks", "x"]) == 0
    assert seen == [["--model", "readme-jax", "--tasks", "x"]]

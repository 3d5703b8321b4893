"""A local multiple-choice task for lm-evaluation-harness built from our own text domains (offline).

Item: a context of ``ctx_len`` tokens from a domain's held-out split, and ``n_choices`` continuations
of ``cont_len`` tokens: the true next text and distractors cut from other places of the same domain's
split. The model should give the true one the highest log-likelihood (lm_eval's ``acc``; ``acc_norm``
divides by the choice's length in bytes). Texts are decoded from the token stream at token
boundaries, so ``context + choice`` is real text; windows that cross a document separator or split a
UTF-8 character are skipped. Seeded and deterministic.

    python -m readme_jax.eval.mc_task OUT_DIR --n-per-domain 20 [--tokenizer RUN_DIR] [--seed 0]

writes ``OUT_DIR/readme_mc_<domain>.jsonl`` and a task YAML for each, plus the group ``readme_mc``
(``OUT_DIR/readme_mc.yaml``); pass ``--include_path OUT_DIR --tasks readme_mc`` to lm_eval.
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import numpy as np

from readme_jax.checkpoints.embedded import embedded_gguf_path
from readme_jax.checkpoints.readme_io import load_tokenizer_for
from readme_jax.checkpoints.tokenizer import tokenizer_from_gguf
from readme_jax.data.domains import available_domains
from readme_jax.data.pipeline import token_stream
from readme_jax.errors import DataError

GROUP = "readme_mc"

TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GROUP_YAML = """group: {group}
task:
{tasks}
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
  - metric: acc_norm
    aggregation: mean
    weight_by_size: true
metadata:
  version: 1.0
"""


def separator_id(tokenizer) -> int | None:
    """The document separator of the project's token streams (the workspace's rule): ``<|endoftext|>``
    when the vocabulary has it, else the tokenizer's eos."""
    tid = tokenizer.token_to_id("<|endoftext|>")
    return tid if tid is not None else tokenizer.eos_id


def _clean_windows(stream: np.ndarray, tokenizer, sep: int | None, length: int, split_at: int) -> list[tuple[str, str]]:
    """Non-overlapping windows of ``length`` tokens as ``(text of the first split_at tokens, text of the rest)``,
    skipping windows with a separator, a broken UTF-8 character or a decode that does not concatenate."""
    out = []
    for s in range(0, len(stream) - length + 1, length):
        ids = [int(t) for t in stream[s:s + length]]
        if sep is not None and sep in ids:
            continue
        head, tail = tokenizer.decode(ids[:split_at]), tokenizer.decode(ids[split_at:])
        if "\ufffd" in head + tail or head + tail != tokenizer.decode(ids) or not head.strip() or not tail.strip():
            continue
        out.append((head, tail))
    return out


def domain_items(domain: str, tokenizer, n: int, *, ctx_len: int = 96, cont_len: int = 32, n_choices: int = 4,
                 seed: int = 0, split: str = "test", cache_dir=None) -> list[dict]:
    """``n`` items of one domain: ``{"id", "domain", "context", "choices", "gold"}`` (fewer if the split is short)."""
    stream = token_stream(domain, split, tokenizer, sep_id=separator_id(tokenizer), cache_dir=cache_dir,
                          progress=False)
    windows = _clean_windows(stream, tokenizer, separator_id(tokenizer), ctx_len + cont_len, ctx_len)
    if len(windows) < n_choices:
        raise DataError(f"{domain}/{split}: only {len(windows)} clean windows of {ctx_len + cont_len} tokens; "
                        f"need at least {n_choices}")
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
    order = rng.permutation(len(windows))
    items = []
    for w in order[:n]:
        context, answer = windows[w]
        distractors: list[str] = []
        for o in rng.permutation(len(windows)):
            cand = windows[o][1]
            if o != w and cand != answer and cand not in distractors:
                distractors.append(cand)
            if len(distractors) == n_choices - 1:
                break
        gold = int(rng.integers(n_choices))
        choices = distractors[:gold] + [answer] + distractors[gold:]
        items.append({"id": f"{domain}-{int(w)}", "domain": domain, "context": context, "choices": choices,
                      "gold": gold})
    return items


def write_task(out_dir, items_by_domain: dict[str, list[dict]], group: str = GROUP) -> Path:
    """Write one jsonl + task YAML per domain and the group YAML into ``out_dir``; returns the group YAML."""
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for domain, items in items_by_domain.items():
        task = f"{group}_{domain}"
        data = out / f"{task}.jsonl"
        data.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
        (out / f"{task}.yaml").write_text(TASK_YAML.format(task=task, group=group, data=json.dumps(str(data))))
        names.append(task)
    path = out / f"{group}.yaml"
    path.write_text(GROUP_YAML.format(group=group, tasks="\n".join(f"  - {t}" for t in names)))
    return path


def build(out_dir, *, tokenizer_path="embedded", domains=None, n_per_domain: int = 20, ctx_len: int = 96,
          cont_len: int = 32, n_choices: int = 4, seed: int = 0, split: str = "test", cache_dir=None) -> Path:
    """Build the task for ``domains`` (default: every cached domain) with the tokenizer of ``tokenizer_path``."""
    tok = (tokenizer_from_gguf(embedded_gguf_path()) if str(tokenizer_path) == "embedded"
           else load_tokenizer_for(tokenizer_path))
    domains = list(domains or available_domains(cache_dir))
    if not domains:
        raise DataError("no cached text domains: run `readme-jax data` first")
    items = {d: domain_items(d, tok, n_per_domain, ctx_len=ctx_len, cont_len=cont_len, n_choices=n_choices,
                             seed=seed, split=split, cache_dir=cache_dir) for d in domains}
    return write_task(out_dir, items)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m readme_jax.eval.mc_task", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--tokenizer", default="embedded", help="run folder, export or dense checkpoint whose tokenizer "
                    "cuts the token windows (default: the embedded SmolLM2)")
    ap.add_argument("--domains", nargs="*", default=None, help="default: every cached domain")
    ap.add_argument("--n-per-domain", type=int, default=20)
    ap.add_argument("--ctx-len", type=int, default=96)
    ap.add_argument("--cont-len", type=int, default=32)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="test")
    ap.add_argument("--cache-dir", default=None)
    a = ap.parse_args(argv)
    path = build(a.out_dir, tokenizer_path=a.tokenizer, domains=a.domains, n_per_domain=a.n_per_domain,
                 ctx_len=a.ctx_len, cont_len=a.cont_len, n_choices=a.choices, seed=a.seed, split=a.split,
                 cache_dir=a.cache_dir)
    print(path)


if __name__ == "__main__":
    main()

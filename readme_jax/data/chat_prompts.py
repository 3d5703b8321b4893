"""Chat prompts built offline from the text domains' TRAIN splits, for self-distilled chat data.

The dense model answers these prompts once (``workflow/chat_data.py``); its answers, rendered through
its own chat template, become the ``chat`` domain: text that covers what users do with the model
(questions, explanations, short stories) in the format they do it in (Self-Data Distillation,
Thangarasa et al. 2024). Prompts are a pure function of the domains' documents, the count and the
seed. Only train splits are read, and no template asks the kind of question the evaluation prompt
set (``eval/chat_prompts.py``) asks with the same words.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence

from readme_jax.data.sources import Document

FORMAT = "readme-jax-chat-prompts-v1"

WORD_TEMPLATES = (
    "What does the word '{w}' mean?",
    "Use the word '{w}' in a sentence.",
    "Write a short story that uses the word '{w}'.",
    "Explain the word '{w}' to a child.",
    "Write a short poem about {w}.",
    "Give me a synonym for the word '{w}'.",
    "Tell me something interesting about {w}.",
    "Write two sentences about {w}.",
)
CODE_TEMPLATES = (
    "What does this Python code do?\n\n```python\n{x}\n```",
    "Explain this Python function in a few sentences:\n\n```python\n{x}\n```",
    "Is there anything that could be improved in this code?\n\n```python\n{x}\n```",
)
MODULE_TEMPLATES = (
    "What is the Python module {x} used for?",
    "Show me a short example that uses Python's {x} module.",
)
TOPIC_TEMPLATES = (
    "Explain {x} in Python in simple terms.",
    "Give a short example of {x} in Python.",
)
PARAGRAPH_TEMPLATES = (
    "Summarize this paragraph from the Python documentation:\n\n{x}",
    "Explain this part of the Python documentation in plain words:\n\n{x}",
)
VERSE_TEMPLATES = (
    "Explain this passage in plain modern English:\n\n{x}",
    "What is the speaker saying here?\n\n{x}",
    "Continue this passage in the same style:\n\n{x}",
)
TITLE_TEMPLATES = (
    "What is Shakespeare's play {x} about?",
    "Who are the main characters in {x}?",
)
BIBLE_TEMPLATES = (
    "What does this Bible verse mean?\n\n{x}",
    "Explain this verse in simple words:\n\n{x}",
)

# share of the prompts each source gets (renormalised over the sources present)
SOURCE_SHARES = {"words": 0.35, "code": 0.15, "pydoc": 0.10, "shakespeare": 0.10, "folio": 0.05, "milton": 0.05,
                 "bible": 0.10, "dictionary": 0.10}


def _code_snippets(docs: Sequence[Document], rng: random.Random, n: int) -> list[str]:
    """Top-level ``def`` blocks of 3-14 lines from the code domain."""
    out = []
    for d in rng.sample(list(docs), min(len(docs), 4 * n + 8)):
        for m in re.finditer(r"^def [^\n]+\n(?:(?:    [^\n]*|)\n)+", d.text, re.M):
            block = m.group(0).rstrip()
            lines = block.split("\n")
            if 3 <= len(lines) <= 14 and max(len(x) for x in lines) <= 100:
                out.append(block)
                break
        if len(out) >= n:
            break
    return out


def _passages(docs: Sequence[Document], rng: random.Random, n: int, lines: int = 4) -> list[str]:
    """Runs of ``lines`` consecutive non-empty lines of 20-90 characters (verse, prose, scripture)."""
    out = []
    for _ in range(40 * n):
        if len(out) >= n:
            break
        text = rng.choice(docs).text.split("\n")
        if len(text) <= lines:
            continue
        i = rng.randrange(len(text) - lines)
        chunk = [x.strip() for x in text[i:i + lines]]
        if all(20 <= len(x) <= 90 for x in chunk):
            out.append("\n".join(chunk))
    return out


def _paragraphs(docs: Sequence[Document], rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(40 * n):
        if len(out) >= n:
            break
        paras = [p.strip() for p in rng.choice(docs).text.split("\n\n")]
        paras = [p for p in paras if 150 <= len(p) <= 600 and not p.startswith(("   ", ">>>")) and "::=" not in p]
        if paras:
            out.append(rng.choice(paras))
    return out


def _verses(docs: Sequence[Document], rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(20 * n):
        if len(out) >= n:
            break
        lines = [re.sub(r"^\d+\s+", "", x).strip() for x in rng.choice(docs).text.split("\n")]
        lines = [x for x in lines if 40 <= len(x) <= 200]
        if lines:
            out.append(rng.choice(lines))
    return out


def common_words(docs_by_domain: Mapping[str, Sequence[Document]], limit: int = 4000) -> list[str]:
    """Dictionary headwords that also occur in the other domains' prose (common English words), or,
    without the dictionary, the most frequent alphabetic words of the prose domains."""
    counts: Counter = Counter()
    for name in ("shakespeare", "bible", "pydoc", "milton"):
        for d in docs_by_domain.get(name, ()):
            counts.update(w.lower() for w in re.findall(r"[A-Za-z]{4,12}", d.text))
    if "dictionary" in docs_by_domain:
        heads = {d.id.split("@")[0].lower() for d in docs_by_domain["dictionary"]}
        words = [w for w, c in counts.most_common() if c >= 3 and w in heads]
    else:
        words = [w for w, c in counts.most_common() if c >= 3]
    return sorted(words[:limit])


def build_prompts(docs_by_domain: Mapping[str, Sequence[Document]], n: int, seed: int = 0,
                  exclude: Sequence[str] = ()) -> list[dict]:
    """About ``n`` prompts ``{"id", "source", "prompt"}`` from the given (train-split) documents; deterministic.

    A prompt containing any word of ``exclude`` (case-insensitive, whole words: the key words of the
    evaluation prompts) is dropped, so the evaluation asks about nothing the chat data was made from."""
    rng = random.Random(f"{FORMAT}:{seed}")
    banned = {w.lower() for w in exclude}
    words = [w for w in common_words(docs_by_domain) if w not in banned]
    present = {s: w for s, w in SOURCE_SHARES.items()
               if (s == "words" and words) or docs_by_domain.get(s)}
    total = sum(present.values())
    counts = {s: int(round(n * w / total)) for s, w in present.items()}
    first = next(iter(counts), None)
    if first is not None:
        counts[first] += n - sum(counts.values())
    out: list[tuple[str, str]] = []
    for source, k in counts.items():
        docs = list(docs_by_domain.get(source, ()))
        if source == "words":
            items = [rng.choice(WORD_TEMPLATES).format(w=w) for w in rng.sample(words, min(k, len(words)))]
        elif source == "code":
            items = [rng.choice(CODE_TEMPLATES).format(x=x) for x in _code_snippets(docs, rng, k - k // 4)]
            modules = sorted({d.id.split("/")[0].removesuffix(".py") for d in docs if not d.id.startswith("_")})
            items += [rng.choice(MODULE_TEMPLATES).format(x=m) for m in rng.sample(modules, min(k // 4, len(modules)))]
        elif source == "pydoc":
            topics = [d.id.replace("-", " ") for d in docs]
            items = [rng.choice(TOPIC_TEMPLATES).format(x=t) for t in rng.sample(topics, min(k // 2, len(topics)))]
            items += [rng.choice(PARAGRAPH_TEMPLATES).format(x=p) for p in _paragraphs(docs, rng, k - len(items))]
        elif source in ("shakespeare", "folio", "milton"):
            titles = [] if source == "milton" else [d.id.replace("_", " ").title() for d in docs]
            n_titles = min(k // 4, len(titles))
            items = [rng.choice(TITLE_TEMPLATES).format(x=t) for t in rng.sample(titles, n_titles)]
            items += [rng.choice(VERSE_TEMPLATES).format(x=p) for p in _passages(docs, rng, k - n_titles)]
        elif source == "bible":
            items = [rng.choice(BIBLE_TEMPLATES).format(x=v) for v in _verses(docs, rng, k)]
        else:  # dictionary: its own headwords, less common ones included
            heads = sorted({d.id.split("@")[0] for d in docs if re.fullmatch(r"[A-Za-z]{4,14}", d.id.split("@")[0])})
            items = [rng.choice(WORD_TEMPLATES[:4]).format(w=w) for w in rng.sample(heads, min(k, len(heads)))]
        out += [(source, p) for p in items]
    out = [(s, p) for s, p in out if not banned & {w.lower() for w in re.findall(r"[A-Za-z']+", p)}]
    return [{"id": f"{s}-{i:04d}", "source": s, "prompt": p} for i, (s, p) in enumerate(out)]


def prompts_sha256(prompts: Sequence[dict]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), sort_keys=True).encode()).hexdigest()

"""Tokenizer rebuilt from a tiny GGUF vocab: ids vs independent references, exact round trips, errors."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from readme_jax.checkpoints.tokenizer import Tokenizer, bytes_to_unicode, tokenizer_from_gguf, tokenizer_from_hf
from readme_jax.errors import CheckpointError, ShapeError

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = "<think>"
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\n\tclass A: pass\n",
    "x = 12345 and 2024, 3.14159 a1b2c3 0x1F 1,000,000.00$",
    "Ünïcödé — 日本語のテキスト 🤖👍🏽 café naïve Ωmega",
    "   leading spaces\t\ttabs\n\n\r\n trailing   ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "a<|im_end|>b<|endoftext|><think>reasoning</think> done",
    "it's they're we've I'm you'll he'd 'quoted' \"double\"",
    "", " ", "\n", "  \n  ", "x² ½ ٣ ①",
]


def _corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = (stdlib / "json" / "__init__.py").read_text() + (stdlib / "textwrap.py").read_text()
    return [text, "Ünïcödé café naïve 日本語 テキスト numbers 2024 3.14 " * 20]


@pytest.fixture(scope="module")
def trained():
    """A tiny byte-level BPE trained here with SmolLM2's pre-tokenizer (digits, then byte level)."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tk.to_str())["model"]
    vocab = model["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    # digit merges the digit split must never apply (SmolLM2's real vocab has none: this makes it observable)
    tokens += [USER_DEFINED, "12", "Ġ1"]
    types = [3 if t in SPECIALS else 4 if t == USER_DEFINED else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]] + ["1 2", "Ġ 1"]
    tk.add_tokens([USER_DEFINED])
    return {"hf": tk, "tokens": tokens, "types": types, "merges": merges}


@pytest.fixture(scope="module")
def gguf_path(trained, tmp_path_factory, gguf_writer):
    path = tmp_path_factory.mktemp("tok") / "tiny.gguf"
    gguf_writer(path, metadata={"llama.block_count": 1}, tokenizer={
        "tokens": trained["tokens"], "types": trained["types"], "merges": trained["merges"], "pre": "smollm",
        "bos": 1, "eos": 2, "chat_template": TEMPLATE})
    return path


@pytest.fixture(scope="module")
def tok(gguf_path) -> Tokenizer:
    return tokenizer_from_gguf(gguf_path)


def llama_cpp_pieces(text: str) -> list[str]:
    """llama.cpp's `smollm` pre-tokenizer: isolate each \\p{N}, then GPT-2's regex; gaps kept."""
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")
    out = []
    for part in regex.split(r"(\p{N})", text):
        pos = 0
        for m in gpt2.finditer(part):
            if m.start() > pos:
                out.append(part[pos:m.start()])
            out.append(m.group())
            pos = m.end()
        if pos < len(part):
            out.append(part[pos:])
    return [p for p in out if p]


def reference_ids(trained, text: str) -> list[int]:
    """Independent reference: split special tokens, pre-split llama.cpp's way, BPE each piece."""
    specials = SPECIALS + [USER_DEFINED]
    bpe = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(trained["tokens"]) if t != USER_DEFINED},
                                 merges=[tuple(m.split(" ")) for m in trained["merges"]]))
    spell = bytes_to_unicode()
    ids = []
    for chunk in regex.split("(" + "|".join(regex.escape(s) for s in specials) + ")", text):
        if chunk in specials:
            ids.append(trained["tokens"].index(chunk))
            continue
        for piece in llama_cpp_pieces(chunk):
            ids += [t.id for t in bpe.model.tokenize("".join(spell[b] for b in piece.encode()))]
    return ids


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_references(tok, trained, text):
    ids = tok.encode(text)
    assert ids == reference_ids(trained, text)
    assert ids == trained["hf"].encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_matches_transformers_gguf_loader(tok, gguf_path):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for text in TEXTS:
        if regex.search(r"\p{N}", text):
            continue  # transformers' GGUF loader skips smollm's digit split (see test_digits_split_one_by_one)
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
    assert tok.decode(tok.encode(TEXTS[5])) == ref.decode(ref.encode(TEXTS[5], add_special_tokens=False))


def test_digits_split_one_by_one(tok):
    # merges "1 2" and "Ġ 1" exist, but every \p{N} is its own pre-token, as in llama.cpp's smollm
    ids = tok.encode(" 12 x²")
    assert [tok.id_to_token(i) for i in ids[:3]] == ["Ġ", "1", "2"]
    assert tok.token_to_id("12") is not None and tok.token_to_id("Ġ1") is not None
    assert tok.decode(ids) == " 12 x²"


def test_special_tokens_and_ids(tok, trained):
    assert tok.vocab_size == len(trained["tokens"])
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.bos_token == "<|im_start|>"
    assert tok.special_ids == {0, 1, 2}
    think = trained["tokens"].index(USER_DEFINED)
    assert tok.encode("x<think>y")[1] == think and think not in tok.special_ids
    ids = tok.encode("<|im_start|>hi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special=True) == "hi"
    assert tok.encode("hi", add_bos=True)[0] == 1 and tok.encode("hi")[0] != 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=30), st.sampled_from(SPECIALS + [USER_DEFINED, "12 34", " \n\t "])),
                max_size=6))
def test_round_trip_random_text(tok, parts):
    text = "".join(parts)
    assert tok.decode(tok.encode(text)) == text


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    out = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert out == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(out).count(1) == 3


def test_hf_round_trip(tok, tmp_path):
    tok.save_hf(tmp_path)
    back = tokenizer_from_hf(tmp_path)
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text)
    assert (back.bos_id, back.eos_id, back.chat_template, back.special_ids) == \
        (tok.bos_id, tok.eos_id, tok.chat_template, tok.special_ids)


def test_errors(tmp_path, trained, tok, gguf_writer):
    write_gguf = gguf_writer
    with pytest.raises(CheckpointError, match="GGUF file not found"):
        tokenizer_from_gguf(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        tokenizer_from_gguf(tmp_path / "junk.gguf")
    base = {"tokens": trained["tokens"], "types": trained["types"], "merges": trained["merges"]}
    write_gguf(tmp_path / "pre.gguf", tokenizer={**base, "pre": "qwen2"})
    with pytest.raises(CheckpointError, match="tokenizer.ggml.pre 'qwen2' is not supported"):
        tokenizer_from_gguf(tmp_path / "pre.gguf")
    write_gguf(tmp_path / "none.gguf", metadata={"llama.block_count": 1})
    with pytest.raises(CheckpointError, match="missing metadata key 'tokenizer.ggml.model'"):
        tokenizer_from_gguf(tmp_path / "none.gguf")
    with pytest.raises(ShapeError, match=r"token ids \[9999\] outside vocabulary"):
        tok.decode([5, 9999])
    with pytest.raises(CheckpointError, match="missing tokenizer.json"):
        tokenizer_from_hf(tmp_path)

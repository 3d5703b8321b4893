"""GGUF tokenizers beyond SmolLM2's: SentencePiece (``tokenizer.ggml.model = "llama"``, Llama 1/2) and
Llama 3's byte-level BPE (``pre = "llama-bpe"``). Tiny vocabularies are trained here, written into
tiny GGUFs, and our ids compared with the sentencepiece library and with transformers' GGUF loader."""

from __future__ import annotations

import io
import json
import sysconfig
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from readme_jax.checkpoints.gguf_vocab import LLAMA3_SPLIT, merges_from_scores
from readme_jax.checkpoints.tokenizer import tokenizer_from_gguf, tokenizer_from_hf
from readme_jax.errors import CheckpointError

spm = pytest.importorskip("sentencepiece")

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\n\tclass A:\n\t\tpass\n",
    "x = 12345 and 3.14, 1,000,000.00$ a1b2c3 0x1F 2024",
    "naïve café 東京 😀 Ünïcödé — 日本語",
    "   leading spaces", "trailing spaces   ", "multiple    inner     spaces", "\ttab first",
    "line one\nline two\r\n\nline four\n",
    "it's they're we've I'm you'll he'd 'quoted' \"double\"",
    "", " ", "  ", "\n", " \n ", "x",
]


def _lines() -> list[str]:
    """A few hundred lines of real text (standard-library sources), no CJK or emoji: those take byte fallback."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = (stdlib / "textwrap.py").read_text() + (stdlib / "json" / "decoder.py").read_text()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines + ["naïve café résumé déjà vu", "numbers 12345 and 3.14 and 2024"] * 5


# ----------------------------------------------------------------------------- SentencePiece (llama)


@pytest.fixture(scope="module")
def sp():
    return train_sentencepiece()


def train_sentencepiece():
    """A tiny SentencePiece BPE trained with Llama 2's settings (byte fallback, digits split, identity
    normalization, whitespace kept, dummy prefix)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_lines()), model_writer=buf, model_type="bpe", vocab_size=700, hard_vocab_limit=False,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def sp_vocab(sp) -> dict:
    """tokens / scores / llama.cpp token types of a SentencePiece model, as convert_hf_to_gguf writes them."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 5 if sp.is_unused(i) else 1)
    return {"model": "llama", "pre": None, "tokens": tokens, "scores": scores, "types": types,
            "bos": 1, "eos": 2, "unk": 0}


@pytest.fixture(scope="module")
def sp_gguf(sp, tmp_path_factory, gguf_writer):
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    return gguf_writer(path, metadata={"llama.block_count": 1}, tokenizer=sp_vocab(sp))


@pytest.fixture(scope="module")
def sp_tok(sp_gguf):
    return tokenizer_from_gguf(sp_gguf)


def transformers_tokenizer(gguf_path):
    """transformers' own reading of a GGUF's tokenizer (the reference)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def sp_ref(sp_gguf):
    return transformers_tokenizer(sp_gguf)


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_ids_match_sentencepiece_and_transformers(sp_tok, sp, sp_ref, text):
    ids = sp_tok.encode(text, add_bos=False)
    assert ids == sp.encode(text)
    assert sp_tok.decode(ids) == text == sp.decode(ids)
    if not text.startswith(" "):  # transformers' Metaspace adds no dummy prefix to text starting with " "
        assert ids == sp_ref.encode(text, add_special_tokens=False)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), st.sampled_from([" ", "  ", "\t", "\n", "the ", "12345", "é"])),
                max_size=8))
def test_sentencepiece_random_text_matches_sentencepiece(sp_tok, sp, parts):
    text = "".join(parts)
    ids = sp_tok.encode(text, add_bos=False)
    assert ids == sp.encode(text)
    assert sp_tok.decode(ids) == text


def test_sentencepiece_byte_fallback_spaces_and_bos(sp_tok, sp):
    assert sp_tok.add_bos and (sp_tok.bos_id, sp_tok.eos_id) == (1, 2)  # llama.cpp's default for SentencePiece
    ids = sp_tok.encode("東京😀")
    assert ids[0] == 1 and sp_tok.decode(ids, skip_special=True) == "東京😀"
    pieces = [sp_tok.id_to_token(i) for i in ids[1:]]
    assert pieces[0] == "\u2581" and all(regex.fullmatch(r"<0x[0-9A-F]{2}>", p) for p in pieces[1:])
    assert len(pieces) == 1 + len("東京😀".encode())  # one byte token per UTF-8 byte
    assert sp_tok.id_to_token(sp_tok.encode("the", add_bos=False)[0]).startswith("\u2581")  # dummy prefix
    assert sp_tok.special_ids == {0, 1, 2}
    assert sp_tok.encode("a</s>b", add_bos=False)[1:2] == [2]  # control tokens written in text stay whole
    assert not any(sp.is_byte(i) for i in sp_tok.encode("12345 3.14", add_bos=False))


def test_sentencepiece_special_tokens_like_llama_cpp(sp_tok, sp):
    """llama.cpp: special tokens written in the text stay whole, and each text piece after one gets the
    dummy prefix space again (sentencepiece encodes each piece on its own)."""
    for before, special, after in [("", "<s>", "hello"), ("a ", "</s>", " b"), ("x", "<unk>", "")]:
        want = sp.encode(before) + [sp.piece_to_id(special)] + sp.encode(after)
        assert sp_tok.encode(before + special + after, add_bos=False) == want


def test_sentencepiece_without_prefix_space(sp, tmp_path, gguf_writer):
    """add_space_prefix false (SentencePiece add_dummy_prefix false): compared with sentencepiece itself
    on the same model with that flag cleared (transformers' GGUF loader ignores the flag)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    ref = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    path = gguf_writer(tmp_path / "np.gguf", tokenizer={**sp_vocab(sp), "add_space_prefix": False, "add_bos": False})
    tok = tokenizer_from_gguf(path)
    assert not tok.add_bos
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == text
    assert not tok.id_to_token(tok.encode("the")[0]).startswith("\u2581")


def test_sentencepiece_hf_round_trip(sp_tok, tmp_path):
    sp_tok.save_hf(tmp_path)
    back = tokenizer_from_hf(tmp_path)
    assert back.add_bos and back.bos_id == 1
    for text in TEXTS:
        assert back.encode(text) == sp_tok.encode(text)
        assert back.decode(back.encode(text), skip_special=True) == text


def test_merges_follow_scores():
    toks = ["a", "b", "c", "ab", "bc", "abc"]
    merges = merges_from_scores(toks, [0, 0, 0, -2.0, -1.0, -3.0], [1] * 6)
    assert merges == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]
    assert merges_from_scores(toks, [0] * 6, [1, 1, 1, 3, 1, 1]) == [("b", "c"), ("a", "bc")]  # control: no merge


# ----------------------------------------------------------------------------- Llama 3 byte-level BPE


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def l3_gguf(tmp_path_factory, gguf_writer):
    """A tiny byte-level BPE trained with Llama 3's split, plus digit merges that only the split's
    groups of 3 make observable: "3 4" ranks first, so "12345" unsplit would give 12|34|5."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(_lines(), trainer=trainers.BpeTrainer(
        vocab_size=500, special_tokens=LLAMA3_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tk.to_str())["model"]
    tokens = [None] * len(model["vocab"])
    for t, i in model["vocab"].items():
        tokens[i] = t
    digit = [m for m in ("34", "12", "123", "45") if m not in tokens]
    tokens += digit
    merges = ["3 4", "1 2", "12 3", "4 5"] + [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    merges = list(dict.fromkeys(merges))
    types = [3 if t in LLAMA3_SPECIALS else 1 for t in tokens]
    path = tmp_path_factory.mktemp("l3") / "l3.gguf"
    gguf_writer(path, metadata={"llama.block_count": 1}, tokenizer={
        "tokens": tokens, "types": types, "merges": merges, "pre": "llama-bpe", "bos": 0, "eos": 2, "add_bos": True})
    return path


@pytest.fixture(scope="module")
def l3_tok(l3_gguf):
    return tokenizer_from_gguf(l3_gguf)


@pytest.fixture(scope="module")
def l3_ref(l3_gguf):
    return transformers_tokenizer(l3_gguf)


def test_llama3_ids_match_transformers(l3_tok, l3_ref):
    tok, ref = l3_tok, l3_ref
    assert tok.add_bos and tok.bos_token == "<|begin_of_text|>"
    for text in TEXTS + ["<|begin_of_text|>hi<|eot_id|>", "a<|end_of_text|>  b"]:
        ids = tok.encode(text, add_bos=False)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
    assert tok.encode("x")[0] == 0


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), st.sampled_from(LLAMA3_SPECIALS + [" 1234567", "\r\n", "  x", "'S"])),
                max_size=6))
def test_llama3_random_text_matches_transformers(l3_tok, l3_ref, parts):
    text = "".join(parts)
    ids = l3_tok.encode(text, add_bos=False)
    assert ids == l3_ref.encode(text, add_special_tokens=False)
    assert l3_tok.decode(ids) == text


def test_llama3_digits_in_groups_of_three(l3_tok):
    tok = l3_tok
    ids = tok.encode("12345 3.14", add_bos=False)
    assert [tok.id_to_token(i) for i in ids][:2] == ["123", "45"]
    assert tok.decode(ids) == "12345 3.14"


# ----------------------------------------------------------------------------- errors


def test_unsupported_models_and_pre_tokenizers(sp, tmp_path, gguf_writer):
    base = sp_vocab(sp)
    gguf_writer(tmp_path / "bert.gguf", tokenizer={**base, "model": "bert"})
    with pytest.raises(CheckpointError, match=r"tokenizer.ggml.model 'bert' is not supported \(supported: "
                                              r"'gpt2' = byte-level BPE, 'llama' = SentencePiece BPE\)"):
        tokenizer_from_gguf(tmp_path / "bert.gguf")
    gguf_writer(tmp_path / "q.gguf", tokenizer={"tokens": ["a", "b", "ab"], "types": [1, 1, 1], "merges": ["a b"],
                                                 "pre": "qwen2", "bos": 0, "eos": 1})
    with pytest.raises(CheckpointError, match=r"tokenizer.ggml.pre 'qwen2' is not supported \(supported: .*llama-bpe"):
        tokenizer_from_gguf(tmp_path / "q.gguf")
    gguf_writer(tmp_path / "ns.gguf", tokenizer={k: v for k, v in base.items() if k != "scores"})
    with pytest.raises(CheckpointError, match="missing metadata key 'tokenizer.ggml.scores'"):
        tokenizer_from_gguf(tmp_path / "ns.gguf")
    cut = {**base, "tokens": base["tokens"][:-1], "scores": base["scores"][:-1], "types": base["types"][:-1]}
    cut["tokens"] = [t for t in base["tokens"] if t != "<0x41>"][:len(cut["types"])]
    gguf_writer(tmp_path / "nb.gguf", tokenizer=cut)
    with pytest.raises(CheckpointError, match="<0x41> .* byte fallback needs all 256"):
        tokenizer_from_gguf(tmp_path / "nb.gguf")

"""The ``tokenizers.Tokenizer`` a GGUF's vocabulary describes (``tokenizer.ggml.*`` metadata).

Two vocabulary kinds (``tokenizer.ggml.model``):

- ``gpt2``: byte-level BPE. Tokens are spelled in GPT-2's byte alphabet (:func:`bytes_to_unicode`),
  merges come from ``tokenizer.ggml.merges``; ``tokenizer.ggml.pre`` picks how text is split before
  BPE (:data:`PRE_TOKENIZERS`).
- ``llama``: SentencePiece BPE (Llama 1/2, Mistral v0.1, TinyLlama...). No merges are stored:
  llama.cpp merges, again and again, the adjacent pair whose concatenation is a token with the
  highest ``tokenizer.ggml.scores``. That is BPE with the merges ranked by the merged token's score
  (:func:`merges_from_scores`). Spaces are spelled ``▁`` and one is put in front of the text when
  ``tokenizer.ggml.add_space_prefix`` (default true, SentencePiece's ``add_dummy_prefix``); a
  character that is no token is spelled with the byte tokens ``<0xNN>`` (type BYTE, byte fallback).
  As in llama.cpp the prefix space also goes in front of text that follows a special token;
  transformers' GGUF loader (``Metaspace(prepend_scheme="first")``) adds none there, and none to
  text that already starts with a space, where SentencePiece and llama.cpp do.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from readme_jax.errors import CheckpointError

# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581"  # SentencePiece's spelling of " "

# llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3 split: letters with one leading non-letter, digits in groups
# of up to 3, punctuation runs with trailing newlines, newline runs, other whitespace
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level(use_regex: bool):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


# tokenizer.ggml.pre -> pre-tokenizer of a byte-level BPE
PRE_TOKENIZERS = {
    "default": lambda: _byte_level(True),
    "gpt2": lambda: _byte_level(True),
    "gpt-2": lambda: _byte_level(True),
    # SmolLM2's own tokenizer.json: ASCII digits one by one, then GPT-2's byte-level split
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level(True)]),
    # Llama 3: its own split regex, then bytes -> byte alphabet without GPT-2's regex
    "llama-bpe": lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                  _byte_level(False)]),
}
MODELS = ("gpt2", "llama")


def _check_lengths(tokens, types, where):
    if len(types) != len(tokens):
        raise CheckpointError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries, "
                              f"tokenizer.ggml.tokens has {len(tokens)}")


def _add_tokens(tk: HFTokenizer, tokens, types, special_types, keep=lambda t: True) -> None:
    """Tokens of ``special_types`` as special added tokens, user-defined ones as plain added tokens
    (both are matched whole in text before the model sees it)."""
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True)
                           for t, ty in zip(tokens, types) if ty in special_types and keep(t)])
    tk.add_tokens([AddedToken(t, normalized=False, special=False)
                   for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED and keep(t)])


def _check_size(tk: HFTokenizer, n: int, where: str) -> HFTokenizer:
    got = tk.get_vocab_size(with_added_tokens=True)
    if got != n:
        raise CheckpointError(f"{where}: rebuilt tokenizer has {got} tokens, the file lists {n} "
                              "(duplicate token strings?)")
    return tk


def byte_level_bpe(tokens: list[str], types: list[int], merges: list[str], pre: str | None,
                   where: str) -> HFTokenizer:
    """``tokenizer.ggml.model = "gpt2"``: byte-level BPE with the pre-tokenizer ``pre`` names."""
    _check_lengths(tokens, types, where)
    make_pre = PRE_TOKENIZERS.get("default" if pre is None else pre)
    if make_pre is None:
        raise CheckpointError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported "
                              f"(supported: {', '.join(PRE_TOKENIZERS)})")
    spell = bytes_to_unicode()
    alphabet = set(spell.values())
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        key = t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))
        vocab.setdefault(key, i)
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{where}: merge {m!r} is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tk.pre_tokenizer = make_pre()
    tk.decoder = decoders.ByteLevel()
    # a control token spelled outside the byte alphabet is a llama.cpp mislabel of a normal token
    _add_tokens(tk, tokens, types, {TOKEN_CONTROL}, keep=lambda t: set(t) <= alphabet and t in vocab)
    return _check_size(tk, len(tokens), where)


def merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece/llama.cpp's greedy "merge the best-scoring pair": every
    split ``(a, b)`` of a normal token ``a + b`` whose halves are normal tokens too, best merged score
    first (ties: lower merged id, then lower ids of the halves)."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] == TOKEN_NORMAL}
    found = []
    for t, i in ids.items():
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in ids and b in ids:
                found.append((-float(scores[i]), i, ids[a], ids[b], a, b))
    found.sort()
    return [(a, b) for *_, a, b in found]


def sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int], add_space_prefix: bool,
                      where: str) -> HFTokenizer:
    """``tokenizer.ggml.model = "llama"``: SentencePiece BPE with byte fallback, as a ``tokenizers`` BPE."""
    _check_lengths(tokens, types, where)
    if len(scores) != len(tokens):
        raise CheckpointError(f"{where}: tokenizer.ggml.scores has {len(scores)} entries, "
                              f"tokenizer.ggml.tokens has {len(tokens)}")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk = next((t for t, ty in zip(tokens, types) if ty == TOKEN_UNKNOWN), None)
    byte_fallback = any(ty == TOKEN_BYTE for ty in types)
    if byte_fallback:
        missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
        if missing:
            raise CheckpointError(f"{where}: tokenizer.ggml.token_type marks byte tokens but {missing[0]} "
                                  f"(and {len(missing) - 1} more) is missing: byte fallback needs all 256")
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges_from_scores(tokens, scores, types), unk_token=unk,
                                fuse_unk=True, byte_fallback=byte_fallback))
    # a normalizer, not Metaspace: Metaspace adds no prefix to text that already starts with a space,
    # SentencePiece and llama.cpp always do (also to text after a special token, as llama.cpp does)
    spell = normalizers.Replace(" ", SPACE)
    tk.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), spell]) if add_space_prefix else spell
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    _add_tokens(tk, tokens, types, {TOKEN_CONTROL, TOKEN_UNKNOWN})
    return _check_size(tk, len(tokens), where)

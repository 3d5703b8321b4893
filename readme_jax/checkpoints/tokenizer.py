"""Tokenizer: a thin wrapper over a ``tokenizers.Tokenizer`` plus ids, chat template, loaders.

Two sources:

- :func:`tokenizer_from_gguf` rebuilds the byte-level BPE a GGUF describes from its own metadata
  (``tokenizer.ggml.tokens/merges/token_type/pre``); control tokens become special tokens and
  user-defined tokens plain added tokens, so both stay whole in text.
- :func:`tokenizer_from_hf` reads ``tokenizer.json`` (+ ``tokenizer_config.json``).

Pre-tokenizer ``smollm`` follows SmolLM2's own ``tokenizer.json``: ASCII digits split one by one
(``Digits(individual_digits=True)``), then GPT-2 byte-level splitting. llama.cpp isolates every
``\\p{N}`` character instead, which differs only on non-ASCII numerals such as "²".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from readme_jax.checkpoints.gguf import gguf_field as _field
from readme_jax.checkpoints.gguf import open_gguf
from readme_jax.errors import CheckpointError, ShapeError

# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer:
    """Text <-> token ids, with BOS/EOS/pad ids, special token ids and an optional chat template."""

    def __init__(self, tk: HFTokenizer, *, bos_id: int | None, eos_id: int | None, pad_id: int | None = None,
                 chat_template: str | None = None, add_bos: bool = False, source: str = "<tokenizer>"):
        self.tk = tk
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.source = source
        added = tk.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        for name, i in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id)):
            if i is not None and not 0 <= i < self.vocab_size:
                raise CheckpointError(f"{source}: {name} id {i} outside vocabulary of {self.vocab_size}")

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.tk.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.tk.id_to_token(self.eos_id)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in the text map to their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of ``ids``; special tokens are written out unless ``skip_special``."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ShapeError(f"{self.source}: token ids {bad[:5]} outside vocabulary of {self.vocab_size}")
        return self.tk.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(int(i))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kw) -> str:
        """Render ``messages`` (dicts with role/content) with the checkpoint's Jinja chat template."""
        if not self.chat_template:
            raise CheckpointError(f"{self.source}: this tokenizer has no chat template")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)

        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kw)

    def save_hf(self, path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into directory ``path``."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(d / "tokenizer.json"))
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos,
                "bos_token": self.bos_token, "eos_token": self.eos_token,
                "pad_token": None if self.pad_id is None else self.tk.id_to_token(self.pad_id)}
        if self.chat_template:
            conf["chat_template"] = self.chat_template
        (d / "tokenizer_config.json").write_text(json.dumps(conf, indent=2, ensure_ascii=False))


# ----------------------------------------------------------------------------- GGUF


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


def _pre_tokenizer(pre: str | None, where: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in (None, "default", "gpt2", "gpt-2"):
        return byte_level
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise CheckpointError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported (supported: smollm, gpt2, default)")


def tokenizer_from_gguf(path_or_reader) -> Tokenizer:
    """Build the byte-level BPE tokenizer stored in a GGUF file's metadata."""

    reader, where = open_gguf(path_or_reader)
    kind = _field(reader, "tokenizer.ggml.model", where)
    if kind != "gpt2":
        raise CheckpointError(f"{where}: tokenizer.ggml.model must be 'gpt2' (byte-level BPE), found {kind!r}")
    tokens = list(_field(reader, "tokenizer.ggml.tokens", where))
    merges = list(_field(reader, "tokenizer.ggml.merges", where))
    types = list(_field(reader, "tokenizer.ggml.token_type", where, [TOKEN_NORMAL] * len(tokens)))
    if len(types) != len(tokens):
        raise CheckpointError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries, "
                              f"tokenizer.ggml.tokens has {len(tokens)}")
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
    tk.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", where, None), where)
    tk.decoder = decoders.ByteLevel()
    special = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == TOKEN_CONTROL and set(t) <= alphabet]
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
            if ty == TOKEN_USER_DEFINED and t in vocab]
    tk.add_special_tokens(special)
    tk.add_tokens(user)
    if tk.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise CheckpointError(f"{where}: rebuilt tokenizer has {tk.get_vocab_size(with_added_tokens=True)} "
                              f"tokens, the file lists {len(tokens)} (duplicate token strings?)")

    def opt_id(key):
        v = _field(reader, key, where, None)
        return None if v is None else int(v)

    return Tokenizer(tk, bos_id=opt_id("tokenizer.ggml.bos_token_id"), eos_id=opt_id("tokenizer.ggml.eos_token_id"),
                     pad_id=opt_id("tokenizer.ggml.padding_token_id"),
                     chat_template=_field(reader, "tokenizer.chat_template", where, None),
                     add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", where, False)), source=where)


# ----------------------------------------------------------------------------- HF


def _token_str(v):
    if isinstance(v, dict):
        return v.get("content")
    return v


def tokenizer_from_hf(path) -> Tokenizer:
    """Load ``tokenizer.json`` (and ``tokenizer_config.json`` / ``chat_template.jinja`` if present)."""
    d = Path(path)
    tj = d / "tokenizer.json"
    if not tj.is_file():
        raise CheckpointError(f"{d}: missing tokenizer.json")
    try:
        tk = HFTokenizer.from_file(str(tj))
    except Exception as e:  # tokenizers raises plain Exception on bad JSON
        raise CheckpointError(f"{tj}: cannot parse tokenizer ({e})") from None
    conf = {}
    cp = d / "tokenizer_config.json"
    if cp.is_file():
        try:
            conf = json.loads(cp.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cp}: invalid JSON ({e})") from None
    template = conf.get("chat_template")
    if (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text()

    def tid(name):
        tok = _token_str(conf.get(name))
        if tok is None:
            return None
        i = tk.token_to_id(tok)
        if i is None:
            raise CheckpointError(f"{cp}: {name} {tok!r} is not in the vocabulary of {tj}")
        return i

    return Tokenizer(tk, bos_id=tid("bos_token"), eos_id=tid("eos_token"), pad_id=tid("pad_token"),
                     chat_template=template, add_bos=bool(conf.get("add_bos_token", False)), source=str(d))

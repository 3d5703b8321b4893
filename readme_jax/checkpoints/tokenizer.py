"""Tokenizer: a thin wrapper over a ``tokenizers.Tokenizer`` plus ids, chat template, loaders.

Two sources:

- :func:`tokenizer_from_gguf` rebuilds the tokenizer a GGUF describes from its own metadata
  (``tokenizer.ggml.*``, built in :mod:`readme_jax.checkpoints.gguf_vocab`): ``model = "gpt2"``
  (byte-level BPE; pre-tokenizers ``gpt2``/``default``, ``smollm``, ``llama-bpe``) or
  ``model = "llama"`` (SentencePiece BPE with byte fallback, merges ranked by
  ``tokenizer.ggml.scores``, ``▁`` for spaces, a dummy prefix space unless
  ``tokenizer.ggml.add_space_prefix`` is false; BOS added unless ``add_bos_token`` is false).
  Control tokens become special tokens and user-defined tokens plain added tokens, so both stay
  whole in text. Any other model or pre-tokenizer raises CheckpointError naming the supported ones.
- :func:`tokenizer_from_hf` reads ``tokenizer.json`` (+ ``tokenizer_config.json``).

Pre-tokenizer ``smollm`` follows SmolLM2's own ``tokenizer.json``: ASCII digits split one by one
(``Digits(individual_digits=True)``), then GPT-2 byte-level splitting. llama.cpp isolates every
``\\p{N}`` character instead, which differs only on non-ASCII numerals such as "²". ``llama-bpe``
is Llama 3's split regex (digits in groups of up to 3) followed by byte-level spelling.

SentencePiece follows the sentencepiece library and llama.cpp where transformers' GGUF loader
differs: the dummy prefix space goes also in front of text that already starts with a space, and
(llama.cpp) in front of text that follows a special token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from readme_jax.checkpoints.gguf import gguf_field as _field
from readme_jax.checkpoints.gguf import open_gguf
from readme_jax.checkpoints.gguf_vocab import (MODELS, TOKEN_NORMAL, bytes_to_unicode, byte_level_bpe,
                                               sentencepiece_bpe)
from readme_jax.errors import CheckpointError, ShapeError

__all__ = ["Tokenizer", "tokenizer_from_gguf", "tokenizer_from_hf", "bytes_to_unicode"]


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
        """Token ids of each text, never with BOS (whatever ``add_bos``): the data pipeline adds its own."""
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


def tokenizer_from_gguf(path_or_reader) -> Tokenizer:
    """Build the tokenizer a GGUF file's metadata describes (byte-level BPE or SentencePiece BPE)."""
    reader, where = open_gguf(path_or_reader)
    kind = _field(reader, "tokenizer.ggml.model", where)
    if kind not in MODELS:
        raise CheckpointError(f"{where}: tokenizer.ggml.model {kind!r} is not supported (supported: "
                              "'gpt2' = byte-level BPE, 'llama' = SentencePiece BPE)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens", where))
    types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type", where, [TOKEN_NORMAL] * len(tokens))]
    if kind == "gpt2":
        tk = byte_level_bpe(tokens, types, list(_field(reader, "tokenizer.ggml.merges", where)),
                            _field(reader, "tokenizer.ggml.pre", where, None), where)
    else:
        tk = sentencepiece_bpe(tokens, list(_field(reader, "tokenizer.ggml.scores", where)), types,
                               bool(_field(reader, "tokenizer.ggml.add_space_prefix", where, True)), where)

    def opt_id(key):
        v = _field(reader, key, where, None)
        return None if v is None else int(v)

    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", where, kind == "llama"))
    return Tokenizer(tk, bos_id=opt_id("tokenizer.ggml.bos_token_id"), eos_id=opt_id("tokenizer.ggml.eos_token_id"),
                     pad_id=opt_id("tokenizer.ggml.padding_token_id"),
                     chat_template=_field(reader, "tokenizer.chat_template", where, None),
                     add_bos=add_bos, source=where)


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

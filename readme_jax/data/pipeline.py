"""Tokenized streams and grain pipelines of packed token blocks, per domain and mixed.

A split of a domain becomes one token stream: for each document in order,
``[bos_id]`` (only if ``add_bos``) + ``tokenizer.encode(text)`` + ``[sep_id]`` (default
``tokenizer.eos_id``). Streams are cached as ``.npy`` per (tokenizer fingerprint, domain content,
split, packing), so repeated runs do not re-tokenize. Block ``i`` of a stream is
``stream[i*T : i*T + T + 1]`` (inputs and shifted targets), so every token is a target once.

Batches are ``{"tokens": int32[B, T+1], "domain": int32[B]}`` where ``domain`` is the position of
the domain in the list given to the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import grain
import numpy as np
from tqdm.auto import tqdm

from readme_jax.config.choices import BLOCK_SAMPLINGS
from readme_jax.data.domains import cache_root, domain_meta, load_domain, load_split, prepare_domains
from readme_jax.data.splits import LINKED, SPLITS
from readme_jax.errors import DataError


@runtime_checkable
class TokenizerLike(Protocol):
    """What the pipeline needs from a tokenizer. Optional extras: ``encode_batch(list[str])`` (used
    for speed) and ``fingerprint: str`` (a stable id of the vocabulary, used as cache key)."""

    eos_id: int | None
    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...


_PROBE = ("def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n"
          "Hor. What art thou that vsurp'st this time of night, Together with that Faire\n"
          "Ge1:1 In the beginning God created the heaven and the earth.\n"
          "Calorie \\Cal\"o*rie\\, n. [F., fr. L. calor heat.] (Physics)\n"
          "naïve café — ñ 東京 😀 \t\r\n 0123456789 <|endoftext|> <s></s>")


def tokenizer_fingerprint(tokenizer: TokenizerLike) -> str:
    """``tokenizer.fingerprint`` if it has one, else a hash of its class, special ids, vocab size
    and its encoding of a fixed probe text (distinguishes real tokenizers in practice)."""
    fp = getattr(tokenizer, "fingerprint", None)
    if isinstance(fp, str) and fp:
        return hashlib.sha256(fp.encode()).hexdigest()[:16]
    parts = [type(tokenizer).__module__ + "." + type(tokenizer).__qualname__,
             repr(getattr(tokenizer, "eos_id", None)), repr(getattr(tokenizer, "bos_id", None)),
             repr(getattr(tokenizer, "vocab_size", None)), repr(list(tokenizer.encode(_PROBE)))]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _check_tokenizer(tokenizer, sep_id, add_bos, where):
    if not callable(getattr(tokenizer, "encode", None)):
        raise DataError(f"{where}: tokenizer must have encode(str) -> list[int], got {type(tokenizer).__name__}")
    sep = getattr(tokenizer, "eos_id", None) if sep_id is None else sep_id
    if sep is None:
        raise DataError(f"{where}: no document separator: tokenizer.eos_id is None and sep_id was not given")
    bos = getattr(tokenizer, "bos_id", None)
    if add_bos and bos is None:
        raise DataError(f"{where}: add_bos=True but tokenizer.bos_id is None")
    return int(sep), (int(bos) if add_bos else None)


def _encode_docs(tokenizer, texts: list[str], bar) -> list[list[int]]:
    out: list[list[int]] = []
    batch_fn = getattr(tokenizer, "encode_batch", None)
    step = 64
    for i in range(0, len(texts), step):
        chunk = texts[i:i + step]
        out.extend(batch_fn(chunk) if callable(batch_fn) else [tokenizer.encode(t) for t in chunk])
        bar.update(sum(len(t) for t in chunk))
    return out


def _stream_path(root: Path, tokenizer, domain: str, split: str, sep: int, bos: int | None) -> Path:
    metas = {m: domain_meta(m, root) for m in LINKED.get(domain, (domain,))}
    content = hashlib.sha256("".join(m["sha256"] for m in metas.values()).encode()).hexdigest()[:12]
    tag = f"sep{sep}" + ("" if bos is None else f"-bos{bos}")
    return root / "_tokens" / tokenizer_fingerprint(tokenizer) / f"{domain}.{content}" / f"{split}.{tag}.npy"


def token_stream(domain: str, split: str, tokenizer: TokenizerLike, *, sep_id: int | None = None,
                 add_bos: bool = False, cache_dir=None, progress: bool = True) -> np.ndarray:
    """The int32 token stream of one split of one domain (cached on disk; memory-mapped on reuse)."""
    if split not in SPLITS:
        raise DataError(f"token_stream: split must be one of {SPLITS}, got {split!r}")
    sep, bos = _check_tokenizer(tokenizer, sep_id, add_bos, f"token_stream({domain!r}, {split!r})")
    root = cache_root(cache_dir)
    if any(domain_meta(m, root) is None for m in LINKED.get(domain, (domain,))):
        load_domain(domain, root, progress=progress)  # fetch first
    path = _stream_path(root, tokenizer, domain, split, sep, bos)
    if path.exists():
        return np.load(path, mmap_mode="r")
    docs = load_split(domain, split, root, progress=progress)
    texts = [d.text for d in docs]
    with tqdm(total=sum(map(len, texts)), unit="char", unit_scale=True, disable=not progress,
              desc=f"tokenizing {domain}/{split}") as bar:
        encoded = _encode_docs(tokenizer, texts, bar)
    pieces = []
    for ids in encoded:
        pieces.append(np.asarray(([bos] if bos is not None else []) + list(ids) + [sep], dtype=np.int64))
    stream = np.concatenate(pieces) if pieces else np.zeros((0,), np.int64)
    if stream.size and (stream.min() < 0 or stream.max() >= 2**31):
        raise DataError(f"token_stream({domain!r}, {split!r}): token ids must lie in [0, 2**31), "
                        f"found range [{stream.min()}, {stream.max()}]")
    stream = stream.astype(np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.part")
    with open(tmp, "wb") as f:
        np.save(f, stream)
    os.replace(tmp, path)
    info = dict(domain=domain, split=split, n_docs=len(docs), n_tokens=int(stream.size),
                n_chars=sum(map(len, texts)), sep_id=sep, bos_id=bos, tokenizer=type(tokenizer).__name__)
    path.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return np.load(path, mmap_mode="r")


def block_starts(n_tokens: int, seq_len: int, n: int, sampling: str = "head", offset: int = 0) -> np.ndarray:
    """Start offsets (int64 ``[m]``, ``m = min(n, available)``) of packed ``seq_len + 1``-token blocks of a
    stream of ``n_tokens`` tokens, blocks laid at stride ``seq_len`` and the first ``offset`` skipped.

    ``head``: the first ``m`` blocks. ``spread``: ``m`` blocks evenly spaced over the whole stream (the
    centre of each of ``m`` equal stretches), so a sample sees the whole split: a stream in document
    order starts with one part of a domain (the dictionary's numerals, Genesis), which ``head`` would
    take for the whole domain. Both are deterministic and never overlap beyond the shared boundary token."""
    if sampling not in BLOCK_SAMPLINGS:
        raise DataError(f"block sampling must be one of {BLOCK_SAMPLINGS}, got {sampling!r}")
    if seq_len < 1 or n < 1 or offset < 0:
        raise DataError(f"block_starts: need seq_len >= 1, n >= 1, offset >= 0, got {seq_len}, {n}, {offset}")
    have = (n_tokens - 1) // seq_len - offset
    if have < 1:
        raise DataError(f"{n_tokens} tokens, not enough for one block of {seq_len + 1} after {offset} blocks")
    m = min(n, have)
    if sampling == "head":
        slots = np.arange(m, dtype=np.int64)
    else:
        slots = (2 * np.arange(m, dtype=np.int64) + 1) * have // (2 * m)
    return (offset + slots) * seq_len


def held_out_sample(domain: str, split: str, n_tokens: int, tokenizer: TokenizerLike, *,
                    sep_id: int | None = None, add_bos: bool = False, cache_dir=None,
                    progress: bool = True) -> np.ndarray:
    """The first ``n_tokens`` tokens (int32) of a split's stream: a deterministic evaluation sample."""
    if n_tokens <= 0:
        raise DataError(f"held_out_sample: n_tokens must be > 0, got {n_tokens}")
    stream = token_stream(domain, split, tokenizer, sep_id=sep_id, add_bos=add_bos, cache_dir=cache_dir,
                          progress=progress)
    if stream.size < n_tokens:
        raise DataError(f"held_out_sample: {domain}/{split} has {stream.size} tokens, asked for {n_tokens}")
    return np.array(stream[:n_tokens], dtype=np.int32)


class BlockSource:
    """Random-access packed blocks of one stream: item i = {"tokens": int32[T+1], "domain": int32}."""

    def __init__(self, stream: np.ndarray, seq_len: int, domain_id: int, name: str = "<stream>"):
        if seq_len <= 0:
            raise DataError(f"{name}: seq_len must be > 0, got {seq_len}")
        self.stream, self.seq_len, self.domain_id, self.name = stream, int(seq_len), int(domain_id), name
        self.n = max(0, (int(stream.shape[0]) - 1) // self.seq_len)
        if self.n == 0:
            raise DataError(f"{name}: {stream.shape[0]} tokens cannot fill one block of seq_len+1 = "
                            f"{seq_len + 1} tokens")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(f"{self.name}: block {i} out of range [0, {self.n})")
        a = i * self.seq_len
        return {"tokens": np.array(self.stream[a:a + self.seq_len + 1], dtype=np.int32),
                "domain": np.int32(self.domain_id)}

    def __repr__(self) -> str:
        return f"BlockSource({self.name}, blocks={self.n}, seq_len={self.seq_len})"

    def __getstate__(self):  # a memory-mapped stream travels to grain workers as its file name
        state = dict(self.__dict__)
        path = getattr(self.stream, "filename", None)
        if path:
            state["stream"] = str(path)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if isinstance(self.stream, str):
            self.stream = np.load(self.stream, mmap_mode="r")


def _seed32(*xs: int) -> int:
    return int(np.random.SeedSequence([int(x) for x in xs]).generate_state(1)[0])


def mixture_counts(weights: Sequence[float], window: int) -> np.ndarray:
    """Examples per domain in each window: largest-remainder rounding of ``weights * window``."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise DataError(f"mixture weights must be a non-empty list of positive numbers, got {list(weights)}")
    exact = w / w.sum() * window
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: window - counts.sum()]] += 1
    if np.any(counts == 0):
        raise DataError(f"mixture window {window} is too small for weights {list(weights)}: some domain "
                        f"gets 0 examples per window; raise `window`")
    return counts


class StratifiedMixMap(grain.transforms.DatasetSelectionMap):
    """Global index -> (domain, index within that domain's stream of blocks).

    Each window of ``window`` consecutive examples holds exactly ``mixture_counts(weights)[d]``
    examples of domain ``d``, in an order shuffled per window from ``seed``. Stateless apart from a
    memo of the last windows; deterministic; picklable."""

    def __init__(self, weights: Sequence[float], seed: int, window: int = 1024):
        self.counts = mixture_counts(weights, window)
        self.window, self.seed = int(window), int(seed)
        self._base = np.repeat(np.arange(len(self.counts)), self.counts)
        self._memo: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return sys.maxsize

    def _pattern(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        got = self._memo.get(k)
        if got is None:
            dom = np.random.default_rng([self.seed, k]).permutation(self._base)
            rank = np.empty_like(dom)
            for d in range(len(self.counts)):
                pos = np.flatnonzero(dom == d)
                rank[pos] = np.arange(pos.size)
            got = (dom, rank)
            if len(self._memo) > 8:
                self._memo.clear()
            self._memo[k] = got
        return got

    def __getitem__(self, index: int) -> tuple[int, int]:
        k, j = divmod(int(index), self.window)
        dom, rank = self._pattern(k)
        d = int(dom[j])
        return d, k * int(self.counts[d]) + int(rank[j])

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_memo"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._memo = {}


def domain_blocks(domain: str, tokenizer: TokenizerLike, *, seq_len: int, split: str = "validation",
                  domain_id: int = 0, sep_id: int | None = None, add_bos: bool = False, cache_dir=None,
                  progress: bool = True) -> grain.MapDataset:
    """The blocks of one split of one domain, in stream order (finite, unshuffled)."""
    stream = token_stream(domain, split, tokenizer, sep_id=sep_id, add_bos=add_bos, cache_dir=cache_dir,
                          progress=progress)
    return grain.MapDataset.source(BlockSource(stream, seq_len, domain_id, name=f"{domain}/{split}"))


def eval_batches(domain: str, tokenizer: TokenizerLike, *, seq_len: int, batch_size: int,
                 split: str = "validation", max_blocks: int | None = None, domain_id: int = 0,
                 drop_remainder: bool = False, **kw) -> grain.MapDataset:
    """Batches of the first ``max_blocks`` (default all) blocks of a split, in order: for perplexity."""
    ds = domain_blocks(domain, tokenizer, seq_len=seq_len, split=split, domain_id=domain_id, **kw)
    if max_blocks is not None:
        ds = ds[: int(max_blocks)]
    return ds.batch(batch_size, drop_remainder=drop_remainder)


def mixture_batches(domains: Sequence[str], tokenizer: TokenizerLike, *, seq_len: int, batch_size: int,
                    split: str = "train", weights: Sequence[float] | None = None, seed: int = 0,
                    window: int = 1024, shard_index: int = 0, shard_count: int = 1,
                    sep_id: int | None = None, add_bos: bool = False, cache_dir=None,
                    progress: bool = True) -> grain.MapDataset:
    """An endless, deterministic grain dataset of mixed-domain batches.

    Each domain's blocks are shuffled (differently every epoch) and repeated forever; domains are
    interleaved by ``StratifiedMixMap`` (weights default equal); ``shard_index/shard_count`` take
    every ``shard_count``-th example for multi-host loading. Resume with
    ``it = iter(ds); state = it.get_state(); ...; it2 = iter(ds); it2.set_state(state)``."""
    if isinstance(domains, str) or not domains:
        raise DataError(f"mixture_batches: domains must be a non-empty list of names, got {domains!r}")
    if len(set(domains)) != len(domains):
        raise DataError(f"mixture_batches: duplicate domains in {list(domains)}")
    if weights is None:
        weights = [1.0] * len(domains)
    if len(weights) != len(domains):
        raise DataError(f"mixture_batches: {len(weights)} weights for {len(domains)} domains {list(domains)}")
    if batch_size <= 0 or not 0 <= shard_index < shard_count:
        raise DataError(f"mixture_batches: need batch_size > 0 and 0 <= shard_index < shard_count, got "
                        f"batch_size={batch_size}, shard_index={shard_index}, shard_count={shard_count}")
    missing = [d for d in domains if domain_meta(d, cache_root(cache_dir)) is None]
    if missing:
        prepare_domains(missing, cache_dir=cache_dir, progress=progress)
    parents = []
    for i, name in enumerate(domains):
        ds = domain_blocks(name, tokenizer, seq_len=seq_len, split=split, domain_id=i, sep_id=sep_id,
                           add_bos=add_bos, cache_dir=cache_dir, progress=progress)
        parents.append(ds.shuffle(seed=_seed32(seed, i)).repeat())
    mixed = grain.MapDataset.select_from_datasets(parents, StratifiedMixMap(weights, _seed32(seed, 10**6), window))
    if shard_count > 1:
        mixed = mixed[shard_index::shard_count]
    return mixed.batch(batch_size, drop_remainder=True)

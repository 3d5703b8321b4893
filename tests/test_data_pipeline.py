"""Token streams, packing, mixtures and resumable grain iterators (readme_jax/data/pipeline.py)."""

import json

import numpy as np
import pytest

from readme_jax.data import domains as dom
from readme_jax.data import pipeline as pl
from readme_jax.data.sources import Document
from readme_jax.errors import DataError

NAMES = ["code", "pydoc", "milton", "bible"]  # cached here with synthetic text (no fetching)
ALPHABETS = ["abcdef ", "ghijklm ", "nopqrs\n", "tuvwxyz."]  # disjoint bytes per domain


class ByteTokenizer:
    """Bytes as ids 0..255; eos 256, bos 257."""

    eos_id, bos_id, vocab_size = 256, 257, 258

    def __init__(self, fingerprint="bytes-v1"):
        self.fingerprint = fingerprint
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return list(text.encode("utf-8"))


class ShiftTokenizer:
    """Like ByteTokenizer with ids shifted by one; no fingerprint attribute."""

    eos_id, bos_id = 0, None

    def encode(self, text):
        return [b + 1 for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    rng = np.random.default_rng(0)
    for d, (name, alpha) in enumerate(zip(NAMES, ALPHABETS)):
        n_docs = 12 if d == 3 else 40
        docs = []
        for i in range(n_docs):
            k = int(rng.integers(30, 300))
            docs.append(Document(id=f"{name}-{i}", text="".join(rng.choice(list(alpha), size=k)), group=f"{name}-{i}"))
        dom._write_domain(root, name, docs, {"source": "synthetic"})
    return root


def _reference(cache, name, split, tok, sep=None, bos=None):
    ref = []
    for d in dom.load_split(name, split, cache):
        ref += ([bos] if bos is not None else []) + tok.encode(d.text) + [tok.eos_id if sep is None else sep]
    return np.array(ref, dtype=np.int64)


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_stream_and_blocks_match_python_reference(cache, split):
    tok = ByteTokenizer()
    ref = _reference(cache, "code", split, tok)
    stream = pl.token_stream("code", split, tok, cache_dir=cache, progress=False)
    assert stream.dtype == np.int32 and np.array_equal(stream, ref)
    T = 16
    src = pl.BlockSource(stream, T, domain_id=3)
    n = (len(ref) - 1) // T
    assert len(src) == n
    blocks = np.stack([src[i]["tokens"] for i in range(n)])
    assert blocks.shape == (n, T + 1) and blocks.dtype == np.int32
    for i in range(n):
        assert np.array_equal(blocks[i], ref[i * T:i * T + T + 1])
    # inputs tile the stream, targets are the inputs shifted by one
    assert np.array_equal(blocks[:, :-1].reshape(-1), ref[:n * T])
    assert np.array_equal(blocks[:, 1:].reshape(-1), ref[1:n * T + 1])
    assert src[0]["domain"] == 3 and src[0]["domain"].dtype == np.int32
    with pytest.raises(IndexError):
        src[n]


def test_block_source_pickles_by_file_name(cache):
    import pickle
    stream = pl.token_stream("code", "train", ByteTokenizer(), cache_dir=cache, progress=False)
    src = pl.BlockSource(stream, 8, domain_id=1)
    blob = pickle.dumps(src)
    assert len(blob) < 1000 and stream.nbytes > 10_000  # the file name, not the tokens
    back = pickle.loads(blob)
    assert len(back) == len(src) and np.array_equal(back[3]["tokens"], src[3]["tokens"])
    mem = pl.BlockSource(np.array(stream), 8, domain_id=1)  # an in-memory stream pickles by value
    assert np.array_equal(pickle.loads(pickle.dumps(mem))[3]["tokens"], src[3]["tokens"])


def test_stream_cache_is_reused_and_keyed(cache):
    tok = ByteTokenizer("bytes-cache-test")
    a = pl.token_stream("pydoc", "train", tok, cache_dir=cache, progress=False)
    calls = tok.calls
    assert calls > 0
    b = pl.token_stream("pydoc", "train", tok, cache_dir=cache, progress=False)
    assert tok.calls == calls and np.array_equal(a, b)  # no re-tokenization
    files = list((cache / "_tokens").rglob("train.sep256.npy"))
    assert files and json.loads(files[0].with_suffix(".json").read_text())["n_tokens"] > 0
    # other packing options give other files, with the right content
    c = pl.token_stream("pydoc", "train", tok, sep_id=7, add_bos=True, cache_dir=cache, progress=False)
    assert np.array_equal(c, _reference(cache, "pydoc", "train", tok, sep=7, bos=257))
    # a different tokenizer (no fingerprint attribute) gets its own stream
    d = pl.token_stream("pydoc", "train", ShiftTokenizer(), cache_dir=cache, progress=False)
    assert np.array_equal(d, _reference(cache, "pydoc", "train", ShiftTokenizer()))


def test_fingerprint():
    assert pl.tokenizer_fingerprint(ByteTokenizer("x")) == pl.tokenizer_fingerprint(ByteTokenizer("x"))
    assert pl.tokenizer_fingerprint(ByteTokenizer("x")) != pl.tokenizer_fingerprint(ByteTokenizer("y"))
    a = pl.tokenizer_fingerprint(ShiftTokenizer())
    assert a == pl.tokenizer_fingerprint(ShiftTokenizer())

    class Shift2(ShiftTokenizer):
        def encode(self, text):
            return [b + 2 for b in text.encode("utf-8")]

    assert pl.tokenizer_fingerprint(Shift2()) != a


def test_held_out_sample(cache):
    tok = ByteTokenizer()
    ref = _reference(cache, "milton", "validation", tok)
    got = pl.held_out_sample("milton", "validation", 100, tok, cache_dir=cache, progress=False)
    assert got.dtype == np.int32 and np.array_equal(got, ref[:100])
    with pytest.raises(DataError, match=f"milton/validation has {len(ref)} tokens, asked for {len(ref) + 1}"):
        pl.held_out_sample("milton", "validation", len(ref) + 1, tok, cache_dir=cache, progress=False)


@pytest.mark.parametrize("n_tokens,seq_len,n,offset", [(1000, 100, 3, 0), (1001, 100, 9, 0), (1001, 100, 10, 0),
                                                         (5000, 7, 16, 3), (65, 8, 100, 1), (2, 1, 1, 0)])
def test_block_starts_head_and_spread(n_tokens, seq_len, n, offset):
    have = (n_tokens - 1) // seq_len - offset  # blocks of seq_len + 1 tokens at stride seq_len
    m = min(n, have)
    head = pl.block_starts(n_tokens, seq_len, n, "head", offset)
    assert head.tolist() == [(offset + i) * seq_len for i in range(m)]
    spread = pl.block_starts(n_tokens, seq_len, n, "spread", offset)
    # reference: the block whose slot holds the centre of each of m equal stretches of the `have` slots
    ref = [(offset + int(np.floor((i + 0.5) * have / m))) * seq_len for i in range(m)]
    assert spread.tolist() == ref
    assert len(set(spread.tolist())) == m and np.all(np.diff(spread) >= seq_len)  # distinct, no overlap
    assert spread[0] >= offset * seq_len and spread[-1] + seq_len + 1 <= n_tokens
    if m == have:  # asked for at least every block: both are all of them
        assert spread.tolist() == head.tolist()
    else:  # spread reaches the last stretch of the stream; head stops at its first m blocks
        assert spread[-1] >= (offset + have - have / m) * seq_len > head[-1] or m == 1


def test_block_starts_rejects_bad_input():
    with pytest.raises(DataError, match="block sampling must be one of"):
        pl.block_starts(1000, 10, 4, "random")
    with pytest.raises(DataError, match="not enough for one block of 11"):
        pl.block_starts(10, 10, 4, "spread")
    with pytest.raises(DataError, match="need seq_len >= 1"):
        pl.block_starts(1000, 10, 0, "head")


def _mixture(cache, **kw):
    args = dict(seq_len=16, batch_size=10, seed=0, cache_dir=cache, progress=False)
    args.update(kw)
    return pl.mixture_batches(NAMES, ByteTokenizer(), **args)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_mixture_proportions_and_labels(cache):
    weights = [3.0, 2.0, 1.0, 4.0]
    ds = _mixture(cache, weights=weights, window=100)
    batches = _take(iter(ds), 300)
    assert batches[0]["tokens"].shape == (10, 17) and batches[0]["tokens"].dtype == np.int32
    assert batches[0]["domain"].shape == (10,) and batches[0]["domain"].dtype == np.int32
    dom_ids = np.concatenate([b["domain"] for b in batches])
    frac = np.bincount(dom_ids, minlength=4) / dom_ids.size
    np.testing.assert_allclose(frac, np.array(weights) / sum(weights), atol=0.01)
    # every example's bytes come from its labelled domain's alphabet (or are the eos separator)
    allowed = [set(a.encode()) | {256} for a in ALPHABETS]
    for b in batches[:50]:
        for toks, d in zip(b["tokens"], b["domain"]):
            assert set(toks.tolist()) <= allowed[d]
    # the order inside each window is random, not a fixed pattern
    assert not np.array_equal(dom_ids[:100], dom_ids[100:200])


def test_mixture_deterministic_and_seeded(cache):
    a = _take(iter(_mixture(cache)), 5)
    b = _take(iter(_mixture(cache)), 5)
    c = _take(iter(_mixture(cache, seed=1)), 5)
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


def test_each_domain_epoch_covers_every_block_once(cache):
    tok = ByteTokenizer()
    stream = pl.token_stream("bible", "train", tok, cache_dir=cache, progress=False)
    n = len(pl.BlockSource(stream, 16, 0))
    seen = []
    it = iter(_mixture(cache, batch_size=1))
    while len(seen) < 2 * n:
        b = next(it)
        if b["domain"][0] == 3:
            seen.append(b["tokens"][0].tobytes())
    want = sorted(stream[i * 16:i * 16 + 17].astype(np.int32).tobytes() for i in range(n))
    assert sorted(seen[:n]) == want and sorted(seen[n:]) == want  # each epoch is a permutation
    assert seen[:n] != seen[n:]  # reshuffled per epoch


def test_iterator_resume_equals_continue(cache):
    ds = _mixture(cache)
    it = iter(ds)
    _take(it, 7)
    state = it.get_state()
    json.dumps(state)  # storable next to a training checkpoint
    cont = _take(it, 6)
    it2 = iter(_mixture(cache))
    it2.set_state(state)
    resumed = _take(it2, 6)
    for x, y in zip(cont, resumed):
        assert np.array_equal(x["tokens"], y["tokens"]) and np.array_equal(x["domain"], y["domain"])


def test_sharding_partitions_the_stream(cache):
    full = _take(iter(_mixture(cache, batch_size=1)), 40)
    s0 = _take(iter(_mixture(cache, batch_size=1, shard_index=0, shard_count=2)), 20)
    s1 = _take(iter(_mixture(cache, batch_size=1, shard_index=1, shard_count=2)), 20)
    for i in range(20):
        assert np.array_equal(s0[i]["tokens"], full[2 * i]["tokens"])
        assert np.array_equal(s1[i]["tokens"], full[2 * i + 1]["tokens"])


def test_eval_batches_in_order(cache):
    tok = ByteTokenizer()
    ref = _reference(cache, "code", "test", tok)
    T, B = 8, 4
    n = (len(ref) - 1) // T
    batches = list(pl.eval_batches("code", tok, seq_len=T, batch_size=B, split="test", cache_dir=cache,
                                   progress=False))
    assert len(batches) == -(-n // B)
    got = np.concatenate([b["tokens"] for b in batches])
    assert np.array_equal(got, np.stack([ref[i * T:i * T + T + 1] for i in range(n)]))
    two = list(pl.eval_batches("code", tok, seq_len=T, batch_size=B, split="test", max_blocks=5,
                               cache_dir=cache, progress=False))
    assert [b["tokens"].shape[0] for b in two] == [4, 1]


def test_mixture_counts():
    np.testing.assert_array_equal(pl.mixture_counts([1, 1, 1], 10), [4, 3, 3])
    np.testing.assert_array_equal(pl.mixture_counts([0.7, 0.2, 0.1], 1000), [700, 200, 100])
    with pytest.raises(DataError, match="window 10 is too small"):
        pl.mixture_counts([1000, 1], 10)
    with pytest.raises(DataError, match="positive numbers"):
        pl.mixture_counts([1, -1], 10)


def test_bad_inputs(cache):
    tok = ByteTokenizer()
    with pytest.raises(DataError, match="2 weights for 4 domains"):
        _mixture(cache, weights=[1, 2])
    with pytest.raises(DataError, match="duplicate domains"):
        pl.mixture_batches(["code", "code"], tok, seq_len=8, batch_size=2, cache_dir=cache, progress=False)
    with pytest.raises(DataError, match="shard_index < shard_count"):
        _mixture(cache, shard_index=2, shard_count=2)
    with pytest.raises(DataError, match="cannot fill one block of seq_len\\+1 = 100001"):
        pl.domain_blocks("code", tok, seq_len=100_000, split="test", cache_dir=cache, progress=False)
    with pytest.raises(DataError, match="split must be one of"):
        pl.token_stream("code", "dev", tok, cache_dir=cache)

    class NoEos:
        eos_id, bos_id = None, None

        def encode(self, text):
            return [1]

    with pytest.raises(DataError, match="tokenizer.eos_id is None and sep_id was not given"):
        pl.token_stream("code", "test", NoEos(), cache_dir=cache)
    assert np.array_equal(pl.token_stream("code", "test", NoEos(), sep_id=5, cache_dir=cache, progress=False)[:2],
                          [1, 5])


def test_real_pydoc_packing(tmp_path):
    """The offline pydoc domain through the whole path: fetch, split, tokenize, pack."""
    tok = ByteTokenizer()
    ds = pl.eval_batches("pydoc", tok, seq_len=64, batch_size=8, split="validation", cache_dir=tmp_path,
                         progress=False)
    ref = _reference(tmp_path, "pydoc", "validation", tok)
    first = next(iter(ds))["tokens"]
    assert np.array_equal(first, np.stack([ref[i * 64:i * 64 + 65] for i in range(8)]))

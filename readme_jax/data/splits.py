"""Deterministic train/validation/test splits at document-group granularity.

Rule (see docs/DATA.md): order the groups of a domain by ``sha256(SALT + group)``; walk that order
filling ``test`` up to 5 % of the domain's characters, then ``validation`` up to 5 %, skipping a group
that would overshoot its split's quota to more than twice the quota; everything else is ``train``. A
split the walk leaves empty gets the smallest remaining group. Every split of a domain with >= 3
groups is therefore non-empty, the splits are disjoint, and they depend only on the documents.

Linked domains (``shakespeare`` and ``folio`` hold the same plays) are split jointly over the groups
they share, so a play is in the same split in both; groups only one of them has go to ``train``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from readme_jax.data.sources import Document
from readme_jax.errors import DataError

SPLITS = ("train", "validation", "test")
SALT = "readme-jax/split/v1:"
DEFAULT_FRACTIONS = {"validation": 0.05, "test": 0.05}
LINKED = {"shakespeare": ("shakespeare", "folio"), "folio": ("shakespeare", "folio")}


def group_hash(group: str) -> int:
    """Stable 64-bit hash of a group name (sha256; independent of PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.sha256((SALT + group).encode("utf-8")).digest()[:8], "big")


def assign_groups(sizes: Mapping[str, int], fractions: Mapping[str, float] | None = None,
                  where: str = "") -> dict[str, str]:
    """{group: split} for groups of the given char sizes, by the quota walk described above."""
    fr = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
    if set(fr) != {"validation", "test"} or any(not 0 < f < 0.5 for f in fr.values()) or sum(fr.values()) >= 1:
        raise DataError(f"{where}: split fractions must be {{'validation': f, 'test': f}} with 0 < f < 0.5 "
                        f"and sum < 1, got {fr}")
    if len(sizes) < 3:
        raise DataError(f"{where}: need >= 3 document groups for train/validation/test, found {len(sizes)}")
    order = sorted(sizes, key=lambda g: (group_hash(g), g))
    total = sum(sizes.values())
    out: dict[str, str] = {}
    for split, reserve in (("test", 2), ("validation", 1)):
        quota, got = fr[split] * total, 0
        for g in order:
            if got >= quota or len(sizes) - len(out) <= reserve:
                break
            if g not in out and got + sizes[g] <= 2 * quota:
                out[g] = split
                got += sizes[g]
        if got == 0 and not any(s == split for s in out.values()):
            rest = [g for g in order if g not in out]
            out[min(rest, key=lambda g: (sizes[g], group_hash(g), g))] = split
    for g in order:
        out.setdefault(g, "train")
    return out


def _group_sizes(docs: Sequence[Document]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for d in docs:
        sizes[d.group] = sizes.get(d.group, 0) + len(d.text)
    return sizes


def split_documents(docs_by_domain: Mapping[str, Sequence[Document]], domain: str,
                    fractions: Mapping[str, float] | None = None) -> dict[str, list[Document]]:
    """{split: documents of ``domain`` in their original order}. ``docs_by_domain`` must hold the
    domain and, for a linked domain, its partners (``LINKED``)."""
    if domain not in docs_by_domain:
        raise DataError(f"split_documents: domain {domain!r} not among {sorted(docs_by_domain)}")
    members = LINKED.get(domain, (domain,))
    missing = [m for m in members if m not in docs_by_domain]
    if missing:
        raise DataError(f"split_documents: {domain!r} is split jointly with {missing}; pass their documents too")
    if len(members) == 1:
        assignment = assign_groups(_group_sizes(docs_by_domain[domain]), fractions, where=f"domain {domain!r}")
    else:
        per = [_group_sizes(docs_by_domain[m]) for m in members]
        shared = set(per[0]).intersection(*per[1:])
        sizes = {g: sum(p[g] for p in per) for g in shared}
        assignment = assign_groups(sizes, fractions, where=f"domains {'+'.join(members)} (shared groups)")
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs_by_domain[domain]:
        out[assignment.get(d.group, "train")].append(d)
    for s in SPLITS:
        if not out[s]:
            raise DataError(f"domain {domain!r}: split {s!r} came out empty ({len(docs_by_domain[domain])} docs)")
    return out


def split_chars(splits: Mapping[str, Sequence[Document]]) -> dict[str, int]:
    """{split: number of characters}."""
    return {s: sum(len(d.text) for d in docs) for s, docs in splits.items()}

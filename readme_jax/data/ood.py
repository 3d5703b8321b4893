"""Held-out text from none of the domains (out-of-domain perplexity, ``eval.ood_tokens``).

Two genres no split holds, both already on any machine that installed readme-jax (no download):

* ``ood_code``: the Python source of Jinja2, a declared dependency (third-party code: the ``code``
  domain is the standard library);
* ``ood_legal``: the license texts shipped with jax, scipy and matplotlib (English legal prose: no
  domain is legal text).

Files are read in sorted order and concatenated; the provenance records each package's version and the
text's sha256, so two runs can tell whether they scored the same text.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
from pathlib import Path

from readme_jax.errors import DataError

OOD_SETS = ("ood_code", "ood_legal")
_LEGAL_PACKAGES = ("jax", "scipy", "matplotlib")


def _package_files(dist: str, keep) -> list[Path]:
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        raise DataError(f"out-of-domain text: package {dist!r} is not installed") from None
    return sorted(Path(str(f.locate())) for f in (d.files or []) if keep(str(f)))


def ood_text(name: str) -> tuple[str, dict]:
    """``(text, provenance)`` of one out-of-domain set (``OOD_SETS``)."""
    if name == "ood_code":
        files = _package_files("jinja2", lambda f: f.startswith("jinja2/") and f.endswith(".py"))
        packages = {"jinja2": md.version("jinja2")}
    elif name == "ood_legal":
        files, packages = [], {}
        seen = set()
        for p in _LEGAL_PACKAGES:
            for f in _package_files(p, lambda f: ".dist-info/" in f and ("licen" in f.lower() or "copying" in f.lower())):
                text = f.read_text(encoding="utf-8", errors="replace")
                if text not in seen:  # one copy of a license text shipped twice
                    seen.add(text)
                    files.append(f)
            packages[p] = md.version(p)
    else:
        raise DataError(f"unknown out-of-domain set {name!r}; expected one of {list(OOD_SETS)}")
    if not files:
        raise DataError(f"out-of-domain set {name!r}: no files found in {sorted(packages)}")
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    prov = {"packages": packages, "files": [f.name for f in files], "chars": len(text),
            "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return text, prov

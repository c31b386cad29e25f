"""Tests of tools/corpus.py on synthetic package trees (offline, no Debian packages)."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest
from moegrow.tools import corpus

FORTUNES = "usr/share/games/fortunes"


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def _fortune_file(entries: list[str]) -> str:
    return "\n%\n".join(entries) + "\n%\n"


def _fake_base(root: Path) -> None:
    src = root / "usr/share/doc/python3.11/html/_sources"
    _write(src / "tutorial/intro.rst.txt",
           "Intro\n=====\n\n" + "Python is an easy to learn language. " * 8 + "\n\nShort.\n")
    _write(src / "library/os.html", "<p>not a reST source</p>")
    doc = root / "usr/share/doc/gnu-standards"
    _write(doc / "standards.text.gz", gzip.compress(("GNU coding standards text. " * 10).encode()))
    _write(doc / "maintain.text.gz", gzip.compress(("Maintainers information. " * 10).encode()))
    ref = root / "usr/share/debian-reference"
    _write(ref / "ch01.en.html", "<html><head><title>T</title></head><body>"
           "<p>Debian &amp; APT " + "package management " * 12 + "</p></body></html>")
    _write(ref / "index.en.html", "<p>TABLE OF CONTENTS ONLY " + "x " * 200 + "</p>")


# ---------------------------------------------------------------- pure helpers

def test_heldout_split_is_deterministic_and_about_one_fifth() -> None:
    entries = [f"synthetic entry {i}: the quick brown fox {i * 7 % 13}" for i in range(5000)]
    first = [corpus.is_heldout(e) for e in entries]
    assert first == [corpus.is_heldout(e) for e in entries]
    assert 0.18 < sum(first) / len(first) < 0.22
    # only the stripped text counts
    assert [corpus.is_heldout(f"  {e}\n") for e in entries[:200]] == first[:200]


def test_split_fortunes_on_percent_lines_only() -> None:
    text = ("First entry,\nline two.\n%\n100% sure %\nstill the second\n%\n%\n"
            "  third\n\n  with a blank line\r\n%\n%%\nfourth\n")
    assert corpus.split_fortunes(text) == [
        "First entry,\nline two.",
        "100% sure %\nstill the second",
        "third\n  with a blank line",
        "%%\nfourth",
    ]
    assert corpus.split_fortunes("%\n\n%\n") == []


def test_html_to_text_drops_scripts_and_unescapes() -> None:
    html = """<html><head><title>Page title</title><style>p {color: red}</style></head>
    <body><div class="navheader"><table><tr><td>Prev</td><td>Next</td></tr></table></div>
    <div class="toc"><p>Table of contents<div><p>nested</div></div>
    <h1>Caf&eacute;   &amp; bar</h1>
    <script>var x = "<p>hidden</p>";</script>
    <p>Use   <code>a &lt; b</code>
       and&nbsp;&#8212; done.</p><p>Line one<br/>line two</p>
    <pre>  code    here
  more</pre></body></html>"""
    text = corpus.html_to_text(html)
    assert text == ("Café & bar\n\nUse a < b and — done.\n\nLine one\nline two\n\n"
                    "code here\nmore")
    for gone in ("hidden", "var x", "color", "Page title", "Prev", "contents", "nested"):
        assert gone not in text


def test_paragraphs_merge_short_blocks_deterministically() -> None:
    long_block = "word " * 60
    text = f"Title\n=====\n\nshort one\n\n  \n{long_block}\n\n\nA\n\nB\n\n{long_block}\n\ntail\n"
    entries = corpus.paragraphs(text, min_chars=200)
    assert entries == corpus.paragraphs(text, min_chars=200)
    assert entries == [
        f"Title\n=====\nshort one\n{long_block.strip()}",
        f"A\nB\n{long_block.strip()}\ntail",
    ]
    assert all("\n\n" not in e and len(e) >= 200 for e in entries)
    assert corpus.paragraphs("only\n\ntiny") == ["only\ntiny"]


# ---------------------------------------------------------------- extraction from a tree

def test_extract_fortunes_prefers_u8_and_skips_dat_links_and_subdirs(tmp_path: Path) -> None:
    d = tmp_path / FORTUNES
    _write(d / "science", _fortune_file(["legacy copy"]))
    _write(d / "science.u8", _fortune_file(["E = mc²", "Schrödinger's cat"]))
    _write(d / "science.dat", b"\x00\x00\x00\x02\xff\xfe%binary")
    _write(d / "law", _fortune_file(["Objection!", "Sustained."]))
    (d / "law.u8").symlink_to("law")
    (d / "law.dat").symlink_to("science.dat")
    _write(d / "off/rude", _fortune_file(["offensive"]))
    _write(d / "de/witze", _fortune_file(["ein Witz"]))
    domains = corpus.extract(tmp_path, "fortunes")
    assert domains == {
        "fortunes-law": ["Objection!", "Sustained."],
        "fortunes-science": ["E = mc²", "Schrödinger's cat"],
    }


def test_extract_fortunes_de_decodes_latin1_and_merges_files(tmp_path: Path) -> None:
    d = tmp_path / FORTUNES / "de"
    _write(d / "witze", "Grüße aus Köln\n%\nZweiter Witz\n".encode("latin-1"))
    _write(d / "zitate", _fortune_file(["Zitat über Mäßigung"]))
    (d / "zitate.u8").symlink_to("zitate")
    _write(tmp_path / "usr/share/games/fortunes-de/zitate.dat", b"\x00\x01")
    assert corpus.extract(tmp_path, "fortunes-de") == {
        "fortunes-de": ["Grüße aus Köln", "Zweiter Witz", "Zitat über Mäßigung"]}


def test_extract_base_combines_the_three_packages(tmp_path: Path) -> None:
    _fake_base(tmp_path)
    (entries,) = corpus.extract(tmp_path, "base").values()
    text = "\n".join(entries)
    for expected in ("Python is an easy", "GNU coding standards", "Maintainers information",
                     "Debian & APT package management"):
        assert expected in text
    for unwanted in ("not a reST source", "TABLE OF CONTENTS", "<p>"):
        assert unwanted not in text
    (tmp_path / "usr/share/doc/gnu-standards/standards.text.gz").unlink()
    (tmp_path / "usr/share/doc/gnu-standards/maintain.text.gz").unlink()
    with pytest.raises(corpus.CorpusError, match="not found in package.*gnu-standards"):
        corpus.extract(tmp_path, "base")


def test_extract_empty_tree_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(corpus.CorpusError, match="no text entries"):
        corpus.extract(tmp_path, "fortunes-es")


# ---------------------------------------------------------------- fetch and output

def test_unknown_name_raises_before_writing_anything(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    with pytest.raises(corpus.CorpusError, match="unknown corpus name.*nope"):
        corpus.fetch(["fortunes", "nope"], out)
    with pytest.raises(corpus.CorpusError, match="no corpus names"):
        corpus.fetch([], out)
    assert not out.exists()


def test_unwritable_out_dir_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(corpus.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    blocker = _write(tmp_path / "not-a-dir", "a file")
    with pytest.raises(corpus.CorpusError, match="cannot create output dir"):
        corpus.fetch(["fortunes"], blocker / "corpus")
    assert blocker.read_text() == "a file"


def test_missing_apt_get_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(corpus.shutil, "which", lambda tool: None)
    with pytest.raises(corpus.CorpusError, match="apt-get"):
        corpus.fetch(["fortunes"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_download_failure_tells_what_to_run(tmp_path: Path, monkeypatch) -> None:
    def fake_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package fortunes\n")
    monkeypatch.setattr(corpus.subprocess, "run", fake_run)
    with pytest.raises(corpus.CorpusError, match="run `apt-get update`|try `apt-get update`"):
        corpus._unpack("fortunes", tmp_path, tmp_path / "root")


def test_fetch_writes_train_and_heldout(tmp_path: Path, monkeypatch) -> None:
    entries = [f"fortune number {i}\nsecond line {i}" for i in range(300)]
    fake = tmp_path / "fake"
    _write(fake / FORTUNES / "work", _fortune_file(entries))
    _write(fake / FORTUNES / "work.dat", b"\x00")
    _fake_base(fake)
    monkeypatch.setattr(corpus.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    unpacked: list[str] = []

    def fake_unpack(pkg: str, work: Path, root: Path) -> None:
        unpacked.append(pkg)
        shutil.copytree(fake, root, symlinks=True, dirs_exist_ok=True)

    monkeypatch.setattr(corpus, "_unpack", fake_unpack)
    messages: list[str] = []
    out = tmp_path / "out"
    stats = corpus.fetch(["fortunes", "base", "fortunes"], out, progress=messages.append)
    assert unpacked == ["fortunes", "fortunes-min", "python3.11-doc", "gnu-standards",
                        "debian-reference-en"]
    assert set(stats) == {"fortunes-work", "base"} and messages
    train = corpus.read_entries(out / "fortunes-work/train.txt")
    held = corpus.read_entries(out / "fortunes-work/heldout.txt")
    assert sorted(train + held) == sorted(entries)
    assert all(corpus.is_heldout(e) for e in held) and not any(map(corpus.is_heldout, train))
    assert stats["fortunes-work"] == {
        "train_entries": len(train), "heldout_entries": len(held),
        "train_bytes": (out / "fortunes-work/train.txt").stat().st_size,
        "heldout_bytes": (out / "fortunes-work/heldout.txt").stat().st_size}
    assert (out / "fortunes-work/train.txt").read_text().startswith(train[0] + "\n\n")
    assert stats["base"]["train_entries"] + stats["base"]["heldout_entries"] >= 3


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    corpus.write_domain(tmp_path, "d", ["old entry"])
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(corpus.os, "replace", broken_replace)
    with pytest.raises(corpus.CorpusError, match="No space left"):
        corpus.write_domain(tmp_path, "d", ["new entry"] * 3)
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == before
    monkeypatch.undo()
    corpus.write_domain(tmp_path, "d", ["new entry"])
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["heldout.txt", "train.txt"]
    assert "new entry" in "".join(p.read_text() for p in (tmp_path / "d").iterdir())

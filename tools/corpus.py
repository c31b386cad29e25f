"""Fetch the benchmark corpora (real text from Debian packages) into train/held-out files.

See BENCHMARKS.md, section "Corpora". Each corpus name maps to Debian packages, fetched with
`apt-get download` (no root needed once package lists exist) and unpacked with `dpkg -x`.
Names and the domains they produce:

- ``base``: one domain ``base`` (Python 3.11 docs reST sources, GNU coding standards and
  maintainers' guide, Debian Reference chapters as text); entries are paragraphs, short ones
  merged so an entry has at least ~200 characters.
- ``fortunes``: one domain ``fortunes-<category>`` per fortune file of ``fortunes`` and
  ``fortunes-min`` (the categories are split across the two packages).
- ``fortunes-de``, ``fortunes-es``: one domain each, all fortune files of the package.
  Offensive subdirectories (``off/``) are never read.

Output format: ``OUT/<domain>/train.txt`` and ``OUT/<domain>/heldout.txt``, UTF-8. Each entry is
stripped, has no blank lines inside (they are removed), and is followed by ``"\\n\\n"``, so
``read_entries`` (a split on blank lines) gives the entries back. An entry is held out iff
``sha256(entry) % 5 == 0`` (deterministic, ~20 %); identical entries always land on the same side.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

NAMES = ("base", "fortunes", "fortunes-de", "fortunes-es")
PACKAGES = {
    "base": ("python3.11-doc", "gnu-standards", "debian-reference-en"),
    "fortunes": ("fortunes", "fortunes-min"),
    "fortunes-de": ("fortunes-de",),
    "fortunes-es": ("fortunes-es",),
}
_FORTUNE_DIRS = {
    "fortunes": "usr/share/games/fortunes",
    "fortunes-de": "usr/share/games/fortunes/de",
    "fortunes-es": "usr/share/games/fortunes/es",
}
_PY_SOURCES = "usr/share/doc/python3.11/html/_sources"


class CorpusError(Exception):
    """Any failure to fetch or write a corpus; the message says what to do."""


def _squeeze(entry: str) -> str:
    """Strip an entry and drop its blank lines, so that blank lines can separate entries."""
    return "\n".join(line.rstrip() for line in entry.strip().split("\n") if line.strip())


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # Old fortune files are often Latin-1; every byte string decodes as Latin-1.
        return data.decode("latin-1")


def is_heldout(entry: str) -> bool:
    """True iff the entry belongs to the held-out 20 % (hash of the stripped entry)."""
    return int(hashlib.sha256(entry.strip().encode()).hexdigest(), 16) % 5 == 0


def split_fortunes(text: str) -> list[str]:
    """Entries of a fortune file: blocks separated by a line holding exactly ``%``."""
    return [e for e in map(_squeeze, re.split(r"(?m)^%\r?$", text)) if e]


def paragraphs(text: str, min_chars: int = 200) -> list[str]:
    """Blocks separated by blank lines; consecutive short ones merged to >= min_chars."""
    blocks = [b for b in (_squeeze(x) for x in re.split(r"\n\s*\n", text)) if b]
    out: list[str] = []
    current: list[str] = []
    for block in blocks:
        current.append(block)
        if sum(len(b) + 1 for b in current) - 1 >= min_chars:
            out.append("\n".join(current))
            current = []
    if current:  # a short tail joins the previous entry rather than standing alone
        out[-1:] = ["\n".join(out[-1:] + current)]
    return out


_VOID = {"area", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
_BREAKS = (dict.fromkeys("p div pre h1 h2 h3 h4 h5 h6 blockquote ul ol dl table section article "
                         "header footer figure caption hr".split(), "\n\n")
           | dict.fromkeys(["li", "dt", "dd", "tr", "br"], "\n") | {"td": " ", "th": " "})
_DROP_TAGS = {"script", "style", "title"}
# DocBook navigation bars and tables of contents only repeat headings.
_DROP_CLASSES = {"navheader", "navfooter", "toc"}


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.pre = 0
        self.skip_tag: str | None = None
        self.skip_depth = 0  # only tags named skip_tag are counted: tolerates unclosed <p>

    def _brk(self, tag: str) -> None:
        self.parts.append(_BREAKS.get(tag, ""))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_tag is not None:
            self.skip_depth += tag == self.skip_tag
            return
        if tag in _VOID:
            self._brk(tag)
            return
        classes = set((dict(attrs).get("class") or "").split())
        if tag in _DROP_TAGS or classes & _DROP_CLASSES:
            self.skip_tag, self.skip_depth = tag, 1
            return
        self.pre += tag == "pre"
        self._brk(tag)

    def handle_endtag(self, tag: str) -> None:
        if self.skip_tag is not None:
            self.skip_depth -= tag == self.skip_tag
            if self.skip_depth == 0:
                self.skip_tag = None
            return
        if tag in _VOID:
            return
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        self._brk(tag)

    def handle_data(self, data: str) -> None:
        if self.skip_tag is None:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """Plain text of an HTML page: no script/style/title, entities unescaped, blocks separated
    by blank lines, whitespace runs within a line collapsed (so <pre> loses indentation)."""
    parser = _TextParser()
    parser.feed(html)
    parser.close()
    lines = (re.sub(r"[^\S\n]+", " ", line).strip() for line in "".join(parser.parts).split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _fortune_files(folder: Path) -> dict[str, Path]:
    """category -> file; the .u8 copy wins over the plain file, symlinks and subdirs skipped."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.is_symlink() or not path.is_file() or path.suffix == ".dat":
            continue
        category = path.name.removesuffix(".u8")
        if path.name.endswith(".u8") or category not in files:
            files[category] = path
    return files


def _base_docs(root: Path) -> list[str]:
    rst = [_decode(p.read_bytes()) for p in sorted(root.glob(f"{_PY_SOURCES}/**/*.rst.txt"))]
    gnu = [gzip.decompress(p.read_bytes()).decode("utf-8", "replace")
           for stem in ("standards", "maintain") for p in sorted(root.rglob(f"{stem}.text.gz"))[:1]]
    pages = [html_to_text(_decode(p.read_bytes()))
             for p in sorted(root.rglob("debian-reference/*.html")) if p.name[:6] != "index."]
    found = {"python3.11-doc": rst, "gnu-standards": gnu, "debian-reference-en": pages}
    missing = [pkg for pkg, docs in found.items() if not docs]
    if missing:
        raise CorpusError(f"expected text not found in package(s) {', '.join(missing)} "
                          f"unpacked under {root}")
    return rst + gnu + pages


def extract(root: Path, name: str) -> dict[str, list[str]]:
    """Domain -> entries, read from a tree where the packages of ``name`` were unpacked."""
    if name not in NAMES:
        raise CorpusError(f"unknown corpus name {name!r}; known: {', '.join(NAMES)}")
    if name == "base":
        domains = {"base": [e for doc in _base_docs(root) for e in paragraphs(doc)]}
    else:
        files = _fortune_files(root / _FORTUNE_DIRS[name])
        if name == "fortunes":
            domains = {f"fortunes-{cat}": split_fortunes(_decode(p.read_bytes()))
                       for cat, p in files.items()}
        else:
            domains = {name: [e for p in files.values() for e in split_fortunes(
                _decode(p.read_bytes()))]}
    domains = {d: entries for d, entries in domains.items() if entries}
    if not domains:
        raise CorpusError(f"no text entries found for {name!r} under {root}")
    return domains


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CorpusError(f"cannot write {path}: {e.strerror or e}") from e


def write_domain(out: Path, domain: str, entries: list[str]) -> dict[str, int]:
    """Write OUT/domain/{train,heldout}.txt atomically; return entry and byte counts."""
    clean = [e for e in map(_squeeze, entries) if e]
    parts = {"train": [e for e in clean if not is_heldout(e)],
             "heldout": [e for e in clean if is_heldout(e)]}
    folder = out / domain
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CorpusError(f"cannot create {folder}: {e.strerror or e}") from e
    stats: dict[str, int] = {}
    for part, items in parts.items():
        data = "".join(e + "\n\n" for e in items).encode("utf-8")
        _atomic_write(folder / f"{part}.txt", data)
        stats[f"{part}_entries"], stats[f"{part}_bytes"] = len(items), len(data)
    return stats


def read_entries(path: Path) -> list[str]:
    """The entries of a train.txt / heldout.txt written by this module."""
    return [e for e in path.read_text(encoding="utf-8").split("\n\n") if e.strip()]


def _unpack(pkg: str, work: Path, root: Path) -> None:
    """apt-get download PKG into work/, then dpkg -x it into root/."""
    debs = work / "debs"
    debs.mkdir(exist_ok=True)
    r = subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True)
    if r.returncode != 0 and "Unable to locate package" in r.stderr:
        if not any(Path("/var/lib/apt/lists").glob("*_Packages*")):
            raise CorpusError(f"cannot find package {pkg}: run `apt-get update` first "
                              "(package lists are missing)")
        raise CorpusError(f"package {pkg} is not in the package lists "
                          "(try `apt-get update`; this release may not ship it)")
    if r.returncode != 0:
        errs = [ln for ln in r.stderr.splitlines() if ln.startswith("E:")] or [r.stderr.strip()]
        raise CorpusError(f"`apt-get download {pkg}` failed: {errs[-1] or r.returncode}")
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    if not found:
        raise CorpusError(f"`apt-get download {pkg}` produced no .deb file in {debs}")
    r = subprocess.run(["dpkg", "-x", str(found[-1]), str(root)], capture_output=True, text=True)
    if r.returncode != 0:
        raise CorpusError(f"`dpkg -x` failed on {found[-1].name}: {r.stderr.strip()}")


def fetch(names: list[str], out: Path,
          progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Download, extract and split each named corpus into OUT; return stats per domain."""
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        what = f"unknown corpus name(s): {', '.join(unknown)}" if names else "no corpus names"
        raise CorpusError(f"{what}; known: {', '.join(NAMES)}")
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise CorpusError(f"`{tool}` not found: corpora come from Debian packages, "
                              "run this on a Debian or Ubuntu system")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CorpusError(f"cannot create output dir {out}: {e.strerror or e}") from e
    if not os.access(out, os.W_OK):
        raise CorpusError(f"output dir {out} is not writable")
    say = progress or (lambda _msg: None)
    stats: dict[str, dict] = {}
    for name in dict.fromkeys(names):
        with tempfile.TemporaryDirectory(prefix="moegrow-corpus-") as tmp:
            for pkg in PACKAGES[name]:
                say(f"{name}: fetching {pkg}")
                _unpack(pkg, Path(tmp), Path(tmp) / "root")
            domains = extract(Path(tmp) / "root", name)
        for domain, entries in domains.items():
            stats[domain] = write_domain(out, domain, entries)
            say(f"{domain}: {stats[domain]['train_entries']} train / "
                f"{stats[domain]['heldout_entries']} held-out entries")
    return stats

"""Bundle v1 on disk: a folder with `manifest.json`, `tokenizer.model` and the programs.

`load` reads the manifest, checks its format version, and verifies the size and SHA-256 of
every file it names before anything is handed to an engine, so a truncated, corrupt or
foreign bundle fails here with the file named, never inside an engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moegrow.device_kernels.manifest import FORMAT, FORMAT_VERSION, MANIFEST, sha256

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "Bundle", "BundleError", "load", "sha256"]


class BundleError(Exception):
    """A bundle that is missing, corrupt, foreign, or from another format version."""


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def context(self) -> int:
        return self.manifest["context"]

    @property
    def tokenizer(self) -> Path:
        return self.path / self.manifest["tokenizer"]["file"]

    def engines(self) -> list[str]:
        return sorted({e for p in self.manifest["programs"].values() for e in p})

    def programs(self, engine: str) -> dict[str, Path]:
        return {name: self.path / p[engine]["file"]
                for name, p in self.manifest["programs"].items() if engine in p}


def _verify(root: Path, entry: dict) -> None:
    path = root / entry["file"]
    if not path.is_file():
        raise BundleError(f"{path}: missing from the bundle")
    if path.stat().st_size != entry["bytes"]:
        raise BundleError(f"{path}: {path.stat().st_size} bytes, the manifest says "
                          f"{entry['bytes']} (truncated or replaced)")
    if sha256(path) != entry["sha256"]:
        raise BundleError(f"{path}: checksum mismatch (corrupt or modified)")


def load(path: str | Path) -> Bundle:
    root = Path(path)
    file = root / MANIFEST
    if not file.is_file():
        raise BundleError(f"{root}: not a bundle (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{file}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{file}: not a moegrow bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{file}: unknown format version {manifest.get('format_version')!r} "
                          f"(this moegrow reads {FORMAT_VERSION})")
    try:
        entries = [manifest["tokenizer"]] + [e for p in manifest["programs"].values()
                                             for e in p.values()]
        for entry in entries:
            _verify(root, entry)
    except (KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"{file}: malformed manifest ({e!r})") from None
    return Bundle(root, manifest)

"""A bundle on disk: `manifest.json`, `tokenizer.model`, the programs and their weight files.

`load` reads the manifest, checks its format version, and verifies the size and SHA-256 of
every file it names before anything is handed to an engine, so a truncated, corrupt or
foreign bundle fails here with the file named, never inside an engine.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from moegrow.device_kernels import layout
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

    def initializers(self, engine: str) -> dict[str, list]:
        """Per program, where its weights lie in the engine's weight file ([name, dtype,
        shape, offset, bytes] each; ONNX programs of bundles exported since 2026-12-01)."""
        return {name: p[engine]["initializers"] for name, p in self.manifest["programs"].items()
                if "initializers" in p.get(engine, {})}

    def live(self, engine: str) -> set[str]:
        """The ONNX programs that load with constant folding off (`"fold": false`: the
        deepening programs of bundles exported since 2026-12-02). They read the expert
        weights from the weight file at every run, so growth's in-place writes reach them
        without a reload."""
        return {name for name, p in self.manifest["programs"].items()
                if p.get(engine, {}).get("fold") is False}

    def weights(self, engine: str) -> Path:
        """The engine's current weight file (`weights/vN.ptd` or `weights/vN.onnx.data`)."""
        return self.path / self.manifest["weights"]["files"][engine]["file"]


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
    return verify(root, manifest)


def verify(root: Path, manifest: dict) -> Bundle:
    """The bundle at `root` as `manifest` describes it, once every file it names has its
    size and checksum and every located expert its bytes (a manifest being loaded, or an
    older version's before a rollback makes it current)."""
    file = root / MANIFEST
    try:
        entries = [manifest["tokenizer"], *manifest["weights"]["files"].values()]
        guard = (manifest.get("calibration") or {}).get("guard")  # growth's base text
        entries += [guard] if guard else []
        entries += [e for p in manifest["programs"].values() for e in p.values()]
        for entry in {e["file"]: e for e in entries}.values():  # one .pte serves 3 programs
            _verify(root, entry)
        bundle = Bundle(root, manifest)
        _verify_config(bundle)
        _verify_experts(bundle)
    except (LookupError, TypeError, AttributeError, ValueError) as e:
        raise BundleError(f"{file}: malformed manifest ({e!r})") from None
    return bundle


def _count(config: dict, *keys: str, least: int = 1) -> int:
    """The first of `keys` the config sets (else the last), an integer >= `least`."""
    key = next((k for k in keys if config.get(k) is not None), keys[-1])
    value = config.get(key)
    if type(value) is not int or value < least:
        raise BundleError(f"config {key!r} is {value!r}: an integer >= {least} is needed")
    return value


def _verify_config(bundle: Bundle) -> None:
    """The sizes the runtime reads from the config are integers in range (the context too)."""
    c = bundle.config
    for key in ("num_hidden_layers", "hidden_size", "num_key_value_heads"):
        _count(c, key)
    experts = _count(c, "num_local_experts", "num_experts")
    _count(c, "moe_intermediate_size", "intermediate_size")
    _count(c, "head_dim", "num_attention_heads")
    for key in ("spare_experts", "pool_experts"):
        if key in c:
            _count(c, key, least=0)
    if _count(c, "num_experts_per_tok") > experts:
        raise BundleError(f"config routes {c['num_experts_per_tok']} experts per token of "
                          f"{experts}")
    _count(bundle.manifest, "context")


def _verify_experts(bundle: Bundle) -> None:
    """The budget holds, and every located expert's bytes match its row in the table."""
    budget, experts = bundle.manifest["budget"], bundle.manifest["experts"]
    if budget["experts"] + budget.get("learning", 0) > budget["bytes"]:
        raise BundleError(f"{bundle.path}: experts take {budget['experts']} bytes and "
                          f"learning state {budget.get('learning', 0)}, over the budget of "
                          f"{budget['bytes']}")
    dims = layout.dims(bundle.config)
    cells = {(row["layer"], row["slot"]) for row in experts["table"]
             if type(row["layer"]) is int and type(row["slot"]) is int}
    if cells != {(i, j) for i in range(bundle.config["num_hidden_layers"])
                 for j in range(dims[0])} or len(cells) != len(experts["table"]):
        raise BundleError(f"{bundle.path}: the expert table's (layer, slot) rows do not match "
                          f"the config's {bundle.config['num_hidden_layers']} layers of "
                          f"{dims[0]} slots")
    for engine, where in experts["layout"].items():
        with open(bundle.weights(engine), "rb") as f:
            whole = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = np.frombuffer(whole, np.uint8)
        for row in experts["table"]:
            if row.get("sha256") is None:  # a quantized base expert: not checked
                continue
            if hasattr(mmap, "MADV_DONTNEED"):  # each expert is read once: its pages leave
                # the process (the default fp32 file's experts: 35 MB of a commit's peak)
                whole.madvise(mmap.MADV_DONTNEED)
            copies = layout.views(buf, where, row["layer"], row["slot"], dims)
            agree = all(all(np.array_equal(w, copies[p][0]) for w in copies[p])
                        for p in layout.PROJS)  # both forms of down_proj hold the same
            served = layout.values(buf, where, row["layer"], row["slot"], dims)  # a pool
            # slot's: its dequantized codes
            if not agree or served is None or layout.sha256(served) != row["sha256"]:
                raise BundleError(f"{bundle.weights(engine)}: expert ({row['layer']}, "
                                  f"{row['slot']}) does not match its checksum")

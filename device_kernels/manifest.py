"""What a bundle manifest records, shared by the writer (`export`) and the reader (`runtime`).

Files are named by their path inside the bundle, size and SHA-256; engines by the file
suffix of their programs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FORMAT = "moegrow-bundle"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
ENGINES = {"executorch": "pte", "onnxruntime": "onnx"}
# The name every .onnx program gives its external data; the runtime hands ONNX Runtime the
# current weights/vN.onnx.data under this name.
ONNX_DATA = "weights.onnx.data"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(root: Path, path: Path) -> dict:
    """The manifest's record of a file: its path in the bundle, size and checksum."""
    return {"file": path.relative_to(root).as_posix(), "bytes": path.stat().st_size,
            "sha256": sha256(path)}

"""`moegrow export`: lower a checkpoint's device programs into a bundle v1 folder.

The bundle is built in a temporary sibling folder and renamed into place, so an export that
fails leaves nothing behind. Programs: `prefill` and `decode` (static KV cache of `context`
positions, passed in and out) and `score`, for each engine asked for.

Not yet (issue 3): weights as data (today every weight is a constant
inside each program, so a new expert version needs a new export).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from moegrow.device_kernels import manifest
from moegrow.device_kernels.manifest import ENGINES

from . import checkpoint, programs, quantize


class BundleError(Exception):
    """An export request that cannot be carried out (unknown engine, existing folder)."""


PROGRAMS = {"prefill": programs.Prefill, "decode": programs.Decode, "score": programs.Score}


def export(target: str | os.PathLike, out: str | os.PathLike,
           engines: tuple[str, ...] = ("executorch", "onnxruntime"),
           progress: Callable[[str], None] | None = None, bits: int = 32) -> dict:
    """Write the bundle; returns its manifest. `bits` 8 or 4 quantizes the attention and
    expert weights (router, norms, embedding and head stay fp32)."""
    if bits not in (32, *quantize.BITS):
        raise BundleError(f"bits must be 32, 8 or 4, got {bits}")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise BundleError(f"unknown engine(s) {', '.join(unknown) or '(none)'} "
                                         f"(choose from {', '.join(ENGINES)})")
    out = Path(out)
    if out.exists():
        raise BundleError(f"{out}: already exists (choose a new folder)")
    model = checkpoint.load(target)
    tok = checkpoint.load_tokenizer(target, model.args.vocab_size)
    context = model.args.max_position_embeddings
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "programs").mkdir()
        shutil.copyfile(tok.path, tmp / checkpoint.TOKENIZER)
        table: dict[str, dict] = {}
        for name, cls in PROGRAMS.items():
            program = cls(model)
            inputs, shapes = program.example(context)
            for engine in engines:
                if progress:
                    progress(f"lowering {name} to {engine}")
                path = tmp / "programs" / f"{name}.{ENGINES[engine]}"
                try:
                    if engine == "executorch":
                        quantize.to_pte(program, inputs, path, shapes, bits=bits)
                    else:
                        quantize.to_onnx(program, inputs, path, shapes, program.outputs,
                                         bits=bits)
                except ValueError as e:  # a shape the quantized format cannot take
                    raise BundleError(f"{target}: {e}") from None
                table.setdefault(name, {})[engine] = manifest.file_entry(tmp, path)
        written = {
            "format": manifest.FORMAT, "format_version": manifest.FORMAT_VERSION,
            "config": model.args.to_hf(), "context": context, "bits": bits,
            # quantized programs run every expert densely (neither engine quantizes gathers)
            "decode_moe": "gather" if bits == 32 else "dense",
            "tokenizer": manifest.file_entry(tmp, tmp / checkpoint.TOKENIZER),
            "programs": table}
        (tmp / manifest.MANIFEST).write_text(json.dumps(written, indent=2) + "\n")
        tmp.chmod(0o755)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written

"""Expert weights as data: read an expert from a bundle, or write new versions of experts.

Each engine's weight file holds every expert's bytes where `manifest["experts"]["layout"]`
says (`device_kernels.layout`). `write` (called by `versions.commit`, which logs it) writes
the next version of every engine's weight file with the changed experts' bytes replaced,
then the manifest that names it; the programs stay as they are. Order (DESIGN.md rule 5):
new files written and fsynced under new names, then the manifest replaced atomically, so a
crash at any point leaves the previous version loaded by the previous manifest. Older weight
files are kept (`versions.py` logs every version and rolls back). Router rows and expert-
table fields (spawned slots) commit the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from moegrow.device_kernels import layout
from moegrow.device_kernels.manifest import MANIFEST, file_entry

from . import bundle as bundle_format

__all__ = ["ExpertError", "check", "domains", "read", "views", "write"]


class ExpertError(ValueError):
    """An expert that does not exist, weights that do not fit it, or a bundle whose experts
    cannot be replaced."""


def _layout(bundle: bundle_format.Bundle, engine: str) -> list[dict]:
    where = bundle.manifest["experts"]["layout"].get(engine)
    if not where:
        raise ExpertError(f"{bundle.path}: the {engine} weight file of this int"
                          f"{bundle.manifest['bits']} bundle has no expert layout (a quantized "
                          "bundle has one when exported with --deepen and spare slots)")
    return where


def _check_slot(bundle: bundle_format.Bundle, layer: int, slot: int) -> None:
    experts, _, _ = layout.dims(bundle.config)
    layers = bundle.config["num_hidden_layers"]
    if not (0 <= layer < layers and 0 <= slot < experts):
        raise ExpertError(f"no expert ({layer}, {slot}): the bundle has {layers} layers of "
                          f"{experts} experts")


def read(bundle: bundle_format.Bundle, layer: int, slot: int, engine: str | None = None,
         path: Path | None = None) -> list[np.ndarray]:
    """Expert `slot` of `layer` as fp32 [gate [F, C], up [F, C], down [C, F]] copies, from
    the engine's weight file (or `path`, a working copy of it); a quantized expert's
    dequantized values."""
    _check_slot(bundle, layer, slot)
    engine = engine or bundle.engines()[0]
    buf = np.memmap(path or bundle.weights(engine), np.uint8, mode="r")
    out = layout.values(buf, _layout(bundle, engine), layer, slot, layout.dims(bundle.config))
    if out is None:
        raise ExpertError(f"expert ({layer}, {slot}) is quantized and the {engine} weight file "
                          "does not locate it (export with --deepen)")
    return out


def _pooled(bundle: bundle_format.Bundle, slot: int) -> bool:
    """Whether `slot` is one of the pool's (quantized slots after the spare ones)."""
    slots, _, _ = layout.dims(bundle.config)
    return slot >= slots - bundle.config.get("pool_experts", 0)


def write_in_place(buf: np.ndarray, bundle: bundle_format.Bundle, engine: str, layer: int,
                   slot: int, weights: list[np.ndarray]) -> list[np.ndarray]:
    """Expert `slot` of `layer` overwritten in `buf`, a writable map of a working copy of the
    engine's weight file (growth's; a version's own files are never written in place), or
    a version's new file before it is named; returns the values it now serves (a pool
    slot's are quantized: `layout.quantize_into`)."""
    where, dims = _layout(bundle, engine), layout.dims(bundle.config)
    if _pooled(bundle, slot):
        entries = {e["proj"]: e for e in where if e["layer"] == layer
                   and e["form"][0] == "q" and layout.holds(e, slot, dims[0])}
        if len(entries) != len(layout.PROJS):
            raise ExpertError(f"pool slot ({layer}, {slot}) is not located in the {engine} "
                              "weight file")
        return [layout.quantize_into(buf, entries[p], slot, dims, w)
                for p, w in zip(layout.PROJS, weights, strict=True)]
    copies = layout.views(buf, where, layer, slot, dims)
    for p, w in zip(layout.PROJS, weights, strict=True):
        for view in copies[p]:
            view[...] = w
    return [np.asarray(w, np.float32) for w in weights]


def views(buf: np.ndarray, bundle: bundle_format.Bundle, engine: str, layer: int,
          slot: int) -> list[np.ndarray] | None:
    """Expert `slot` of `layer` as fp32 [gate, up, down] views of `buf` (a map of a working
    copy of the engine's weight file: a slice's trained experts are read there, not copied;
    `write_in_place` writes every form, these included), each its stacked form where the file
    has one (contiguous), else its dense form (strided: an engine copies it for the run);
    None where the file holds it quantized (a pool slot, a quantized base expert)."""
    _check_slot(bundle, layer, slot)
    if _pooled(bundle, slot):
        return None
    copies = layout.views(buf, _layout(bundle, engine), layer, slot, layout.dims(bundle.config))
    if not all(copies[p] for p in layout.PROJS):
        return None
    return [next((v for v in copies[p] if v.flags.c_contiguous), copies[p][0])
            for p in layout.PROJS]


def router_entry(manifest: dict, engine: str, layer: int) -> dict:
    """Where `layer`'s router weight lies in the engine's weight file."""
    return next(e for e in manifest["experts"]["routers"][engine] if e["layer"] == layer)


def router(bundle: bundle_format.Bundle, layer: int, engine: str | None = None,
           buf: np.ndarray | None = None) -> np.ndarray:
    """`layer`'s router weight [slots, C], one row per expert slot: a copy from the engine's
    weight file, or with `buf` (a writable map of a working copy) a view whose rows can be
    assigned."""
    engine = engine or bundle.engines()[0]
    view = layout.router(np.memmap(bundle.weights(engine), np.uint8, mode="r") if buf is None
                         else buf, router_entry(bundle.manifest, engine, layer),
                         layout.dims(bundle.config))
    return np.array(view) if buf is None else view


def domains(bundle: bundle_format.Bundle, engine: str | None = None,
            buf: np.ndarray | None = None, path: Path | None = None) -> np.ndarray:
    """The domain gate's class table [V, D] (`export.programs.with_spare`): a copy read from
    the engine's weight file (or the file at `path`: a working copy), or with `buf` (a
    writable map of a working copy) a view whose columns can be assigned. Raises
    ExpertError for a bundle without one."""
    engine = engine or bundle.engines()[0]
    entry = (bundle.manifest["experts"].get("domains") or {}).get(engine)
    if not entry:
        raise ExpertError(f"{bundle.path}: no domain gate table (a bundle exported before "
                          "moegrow had one, or without spare slots): export it again to grow")
    rows, cols = entry["shape"]
    if buf is None:  # one read, no map left open (a keystroke asks: `Runtime.form`)
        return np.fromfile(path or bundle.weights(engine), np.float32, rows * cols,
                           offset=entry["offset"]).reshape(rows, cols)
    return buf[entry["offset"]:entry["offset"] + 4 * rows * cols].view(np.float32).reshape(
        rows, cols)


def _checked(bundle: bundle_format.Bundle, changes: dict) -> dict:
    _, hidden, width = layout.dims(bundle.config)
    bits = {(r["layer"], r["slot"]): r.get("bits", 32) for r in bundle.manifest["experts"]["table"]}
    out = {}
    for (layer, slot), weights in changes.items():
        _check_slot(bundle, layer, slot)
        if bits.get((layer, slot), 32) != 32 and not _pooled(bundle, slot):
            raise ExpertError(f"expert ({layer}, {slot}) is int{bits[layer, slot]} and frozen: "
                              "a quantized bundle grows clones in its fp32 spare slots")
        if len(weights) != len(layout.PROJS):
            raise ExpertError(f"expert ({layer}, {slot}): give gate, up and down weights")
        arrays = []
        for proj, w in zip(layout.PROJS, weights, strict=True):
            w = np.asarray(w, np.float32)
            want = layout.shape(proj, hidden, width)
            if w.shape != want:
                raise ExpertError(f"expert ({layer}, {slot}) {proj}: shape {w.shape}, the "
                                  f"bundle needs {want}")
            if not np.isfinite(w).all():
                raise ExpertError(f"expert ({layer}, {slot}) {proj}: NaN or inf in the weights")
            arrays.append(w)
        out[layer, slot] = arrays
    return out


@contextlib.contextmanager
def _replacing(path: Path):
    """A temporary name beside `path` to write the new file at: when the block ends it is
    fsynced and renamed into place; if the block raises, it is removed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, buf: np.ndarray, mode: int = 0o666) -> None:
    """`buf`'s bytes as `path` (`_replacing`); `mode`: the new file's permissions (less the
    umask), as `os.open` takes them."""
    with _replacing(path) as tmp, os.fdopen(
            os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
        buf.tofile(f)


def _write_edited(current: Path, path: Path, edit: Callable[[np.ndarray], None]) -> None:
    """`current`'s bytes with `edit(writable map)` applied, as `path` (`_replacing`): copied
    by the kernel, then edited in place. Only the pages the edit changes come into this
    process's memory, not the whole file (the default fp32 weight file is 56 MB: a commit
    held it twice, read and mapped, docs/benchmarks.md)."""
    with _replacing(path) as tmp:
        shutil.copyfile(current, tmp)
        buf = np.memmap(tmp, np.uint8, mode="r+")
        edit(buf)
        buf.flush()
        del buf


def check(bundle: bundle_format.Bundle, changes: dict[tuple[int, int], list[np.ndarray]],
          routers: dict[tuple[int, int], np.ndarray],
          table: np.ndarray | None = None) -> tuple[dict, dict]:
    """`changes` ({(layer, slot): [gate, up, down]}), `routers` ({(layer, slot): [C]}) and
    the domain gate's `table` checked against the bundle (slots, shapes, finite values;
    every engine's file has an expert layout; nobody committed since `bundle` was loaded)
    and made fp32; raises ExpertError before anything is touched."""
    for engine in bundle.engines():
        _layout(bundle, engine)
    changes = _checked(bundle, changes)
    _, _, width = layout.dims(bundle.config)
    for (layer, slot), row in routers.items():
        _check_slot(bundle, layer, slot)
        if np.shape(row) != (width,) or not np.isfinite(row).all():
            raise ExpertError(f"router row ({layer}, {slot}): needs {width} finite values")
    if table is not None:
        want = domains(bundle).shape
        if np.shape(table) != want or not np.isfinite(table).all():
            raise ExpertError(f"domain gate table: needs {want} finite values")
    try:  # the version only: the bundle written is verified in full when it is loaded
        on_disk = json.loads((bundle.path / MANIFEST).read_text())["weights"]["version"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExpertError(f"{bundle.path / MANIFEST}: unreadable ({e})") from None
    if on_disk != bundle.manifest["weights"]["version"]:
        raise ExpertError(f"{bundle.path}: weights are at version "
                          f"{on_disk} since this bundle was loaded at "
                          f"{bundle.manifest['weights']['version']}; load it again")
    return changes, {key: np.asarray(row, np.float32) for key, row in routers.items()}


def write(bundle: bundle_format.Bundle, changes: dict, routers: dict, rows: dict, version: int,
          record: Callable[[dict], None], table: np.ndarray | None = None
          ) -> bundle_format.Bundle:
    """Write version `version` with the (checked) experts in `changes`, router rows in
    `routers` and the domain gate's `table` (if given) replaced in every engine's weight
    file, and the expert table's rows updated
    with `rows` ({(layer, slot): fields; a field None is removed}); returns the reloaded
    bundle. A pool slot's weights are quantized (`write_in_place`), its checksum is of the
    values it serves. `record(manifest)`
    runs once the new files are on disk and before the manifest names them (the version
    log's transaction); if it raises, nothing is committed. Only `versions.commit` calls
    this: it checks first and logs every version."""
    manifest = json.loads(json.dumps(bundle.manifest))
    dims = layout.dims(bundle.config)
    written, served = [], {}
    try:
        for engine in bundle.engines():
            current = bundle.weights(engine)

            def edit(buf: np.ndarray, engine: str = engine) -> None:
                for (layer, slot), weights in changes.items():
                    served[layer, slot] = write_in_place(buf, bundle, engine, layer, slot,
                                                         weights)
                for (layer, slot), row in routers.items():
                    layout.router(buf, router_entry(bundle.manifest, engine, layer),
                                  dims)[slot] = row
                if table is not None:
                    domains(bundle, engine, buf)[...] = table
            path = current.with_name(f"v{version}.{current.name.split('.', 1)[1]}")
            written.append(path)
            _write_edited(current, path, edit)
            manifest["weights"]["files"][engine] = file_entry(bundle.path, path)
        manifest["weights"]["version"] = version
        for row in manifest["experts"]["table"]:
            key = (row["layer"], row["slot"])
            if key in changes:
                row.update(version=version, sha256=layout.sha256(served[key]))
            for field, value in rows.get(key, {}).items():  # None: the field is dropped
                if value is None:
                    row.pop(field, None)
                else:
                    row[field] = value
        record(manifest)
        write_atomic(bundle.path / MANIFEST,
                     np.frombuffer((json.dumps(manifest, indent=2) + "\n").encode(), np.uint8))
    except BaseException:
        for path in written:  # not referenced by any manifest yet
            path.unlink(missing_ok=True)
        raise
    fd = os.open(bundle.path, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames themselves
    finally:
        os.close(fd)
    return bundle_format.load(bundle.path)

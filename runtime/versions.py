"""The version log: every committed weights version of a bundle, and rollback.

A version is the manifest that names its weight files (`weights/vN.*`, never deleted).
`manifest.json` is the pointer to the current one; the log (table `versions` in the bundle's
state database) keeps every version's manifest and what produced it. A commit
(`experts.commit`) writes the new weight files, then inserts the log row in one SQLite
transaction (`record`), then replaces `manifest.json`: a crash before the transaction leaves
unreferenced files; after it, a logged version that was never made current (still loadable,
and `rollback --to` can make it current). Version 1 (the export) is logged on first use.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import numpy as np
from moegrow.device_kernels.manifest import MANIFEST

from . import bundle as bundle_format
from . import errormap, experts

__all__ = ["VersionError", "log", "record", "rollback"]


class VersionError(ValueError):
    """A version that is not in the log, or whose files are gone."""


def _db(bundle: bundle_format.Bundle) -> tuple[errormap.Store, sqlite3.Connection]:
    store = errormap.Store(bundle.path)
    db = store.connect()
    if db.execute("SELECT COUNT(*) FROM versions").fetchone()[0] == 0:  # the export
        current = json.loads((bundle.path / MANIFEST).read_text())
        if current["weights"]["version"] == 1:
            db.execute("INSERT OR IGNORE INTO versions VALUES (1, ?, ?, ?)",
                       (time.time(), json.dumps(current), json.dumps({"what": "export"})))
    return store, db


def record(bundle: bundle_format.Bundle, report: dict):
    """`experts.commit`'s `record`: log the new manifest with `report` in one transaction."""
    def write(manifest: dict) -> None:
        store, db = _db(bundle)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO versions VALUES (?, ?, ?, ?)",
                       (manifest["weights"]["version"], time.time(), json.dumps(manifest),
                        json.dumps(report)))
            db.execute("COMMIT")
        except sqlite3.Error as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise store._error(e) from None
        finally:
            db.close()
    return write


def next_version(bundle: bundle_format.Bundle) -> int:
    """One past every version logged or current (a rolled-back version's number is never
    reused)."""
    store, db = _db(bundle)
    try:
        top = db.execute("SELECT COALESCE(MAX(version), 0) FROM versions").fetchone()[0]
    finally:
        db.close()
    return max(top, bundle.manifest["weights"]["version"]) + 1


def log(bundle: bundle_format.Bundle) -> list[dict]:
    """[{"version", "created", "current", "report", "files_present"}] oldest first."""
    store, db = _db(bundle)
    try:
        rows = db.execute("SELECT version, created, manifest, report FROM versions "
                          "ORDER BY version").fetchall()
    except sqlite3.Error as e:
        raise store._error(e) from None
    finally:
        db.close()
    current = bundle.manifest["weights"]["version"]
    out = []
    for version, created, manifest, report in rows:
        files = json.loads(manifest)["weights"]["files"].values()
        out.append({"version": version, "created": created, "current": version == current,
                    "report": json.loads(report),
                    "files_present": all((bundle.path / f["file"]).is_file() for f in files)})
    return out


def rollback(bundle: bundle_format.Bundle, to: int | None = None) -> bundle_format.Bundle:
    """Make version `to` (default: the newest logged version older than the current one)
    current again; its files are verified first. Returns the reloaded bundle."""
    rows = {r["version"]: r for r in log(bundle)}
    current = bundle.manifest["weights"]["version"]
    if to is None:
        older = [v for v in rows if v < current]
        if not older:
            raise VersionError(f"{bundle.path}: version {current} has no older version to "
                               "roll back to")
        to = max(older)
    if to not in rows:
        raise VersionError(f"{bundle.path}: no version {to} (logged: "
                           f"{', '.join(map(str, sorted(rows))) or 'none'})")
    store, db = _db(bundle)
    try:
        manifest = json.loads(db.execute("SELECT manifest FROM versions WHERE version = ?",
                                         (to,)).fetchone()[0])
    finally:
        db.close()
    candidate = bundle_format.Bundle(bundle.path, manifest)
    try:
        for entry in manifest["weights"]["files"].values():
            bundle_format._verify(bundle.path, entry)
        bundle_format._verify_experts(candidate)
    except bundle_format.BundleError as e:
        raise VersionError(f"cannot roll back to version {to}: {e}") from None
    experts._write(bundle.path / MANIFEST,
                   np.frombuffer((json.dumps(manifest, indent=2) + "\n").encode(), np.uint8))
    return bundle_format.load(Path(bundle.path))

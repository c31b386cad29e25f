"""The version log: every committed weights version of a bundle, and rollback.

A version is the manifest that names its weight files (`weights/vN.*`, never deleted).
`manifest.json` is the pointer to the current one; the log (table `versions` in the bundle's
state database, `state.py`) keeps every version's manifest and what produced it. `commit` is
the only way to make a version (`Runtime.set_experts` and growth both call it): it checks
the change, writes the new weight files (`experts.write`), inserts the log row in one SQLite
transaction, then replaces `manifest.json`: a crash before the transaction leaves
unreferenced files; after it, a logged version that was never made current (still loadable,
and `rollback --to` can make it current). Version 1 (the export) is logged on first use.

Retention: each version is a whole weight file per engine, so the disk is bounded by keeping
the files of version 1 (the export: `rollback --to 1` always works), of the current version
and of the `KEEP` newest ones; after every commit the files of older versions (and of any
unreferenced leftover) are deleted (`prune`). Their log rows stay (what changed, when, the
manifest); `log` says `files_present` false and `rollback` to them is refused.
"""

from __future__ import annotations

import json
import time

import numpy as np
from moegrow.device_kernels.manifest import MANIFEST

from . import bundle as bundle_format
from . import errormap, experts, state

__all__ = ["KEEP", "VersionError", "commit", "log", "next_version", "prune", "rollback"]

KEEP = 4  # the newest versions whose weight files stay (besides version 1 and the current)


class VersionError(ValueError):
    """A version that is not in the log, or whose files are gone."""


def _log_export(bundle: bundle_format.Bundle, db) -> None:
    """Log version 1 (the export) when the log is empty and it is current."""
    if db.execute("SELECT COUNT(*) FROM versions").fetchone()[0] == 0:
        current = json.loads((bundle.path / MANIFEST).read_text())
        if current["weights"]["version"] == 1:
            db.execute("INSERT OR IGNORE INTO versions VALUES (1, ?, ?, ?)",
                       (time.time(), json.dumps(current), json.dumps({"what": "export"})))


def _rows(bundle: bundle_format.Bundle, sql: str, args: tuple = ()) -> list[tuple]:
    """A read of the log, with version 1 in it when it is empty: inserted in a transaction
    that is rolled back (a read writes nothing; a bundle without a state database yet is
    read from an empty one in memory)."""
    with state.connection(bundle.path, create=False) as db:
        db.execute("BEGIN")
        try:
            _log_export(bundle, db)
            return db.execute(sql, args).fetchall()
        finally:
            db.execute("ROLLBACK")


def _record(bundle: bundle_format.Bundle, report: dict):
    """`experts.write`'s `record`: log the new manifest with `report` in one transaction."""
    def write(manifest: dict) -> None:
        with state.connection(bundle.path, write=True) as db:
            _log_export(bundle, db)
            db.execute("INSERT INTO versions VALUES (?, ?, ?, ?)",
                       (manifest["weights"]["version"], time.time(), json.dumps(manifest),
                        json.dumps(report)))
    return write


def commit(bundle: bundle_format.Bundle, changes: dict[tuple[int, int], list[np.ndarray]],
           routers: dict[tuple[int, int], np.ndarray] | None = None,
           rows: dict[tuple[int, int], dict] | None = None,
           report: dict | None = None,
           table: np.ndarray | None = None) -> bundle_format.Bundle:
    """Make the bundle's next weights version: the experts in `changes` ({(layer, slot):
    [gate, up, down]}), the router rows in `routers` ({(layer, slot): [C]}), the domain
    gate's class `table` [V, D] if given, and the expert table's rows updated with `rows`;
    logged with `report` (what produced it). Bad changes
    raise `experts.ExpertError` before anything on disk is touched. Returns the new bundle
    (the caller's runtime reloads it)."""
    changes, routers = experts.check(bundle, changes, routers or {}, table)
    version = next_version(bundle)
    new = experts.write(bundle, changes, routers, rows or {}, version,
                        _record(bundle, {**(report or {}), "version": version}),
                        None if table is None else np.asarray(table, np.float32))
    prune(new)
    return new


def prune(bundle: bundle_format.Bundle, keep: int = KEEP) -> list[str]:
    """Delete the weight files no kept version names (the module docstring's retention:
    version 1, the current one, the `keep` newest); returns their names. Run after a commit,
    when `manifest.json` already names the new files."""
    manifests = dict(_rows(bundle, "SELECT version, manifest FROM versions"))
    current = bundle.manifest["weights"]["version"]
    kept = {1, current, *sorted(manifests)[-keep:]} if keep else {1, current}
    named = {bundle.path / f["file"] for v in kept if v in manifests
             for f in json.loads(manifests[v])["weights"]["files"].values()}
    named |= {bundle.path / f["file"] for f in bundle.manifest["weights"]["files"].values()}
    folder = bundle.weights(bundle.engines()[0]).parent
    gone = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("v") and path not in named:
            path.unlink(missing_ok=True)
            gone.append(path.name)
    return gone


def next_version(bundle: bundle_format.Bundle) -> int:
    """One past every version logged or current (a rolled-back version's number is never
    reused)."""
    top = _rows(bundle, "SELECT COALESCE(MAX(version), 0) FROM versions")[0][0]
    return max(top, bundle.manifest["weights"]["version"]) + 1


def log(bundle: bundle_format.Bundle) -> list[dict]:
    """[{"version", "created", "current", "report", "files_present"}] oldest first."""
    current = bundle.manifest["weights"]["version"]
    out = []
    for version, created, manifest, report in _rows(
            bundle, "SELECT version, created, manifest, report FROM versions ORDER BY version"):
        files = json.loads(manifest)["weights"]["files"].values()
        out.append({"version": version, "created": created, "current": version == current,
                    "report": json.loads(report),
                    "files_present": all((bundle.path / f["file"]).is_file() for f in files)})
    return out


def rollback(bundle: bundle_format.Bundle, to: int | None = None) -> bundle_format.Bundle:
    """Make version `to` (default: the newest logged version older than the current one)
    current again; its files are verified first, and the error map's statistics follow the
    clones to their slots there (`_follow`). Returns the reloaded bundle."""
    manifests = {v: m for v, m in _rows(bundle, "SELECT version, manifest FROM versions")}
    current = bundle.manifest["weights"]["version"]
    if to is None:  # the newest older version whose files are kept (`prune`)
        older = [v for v in manifests if v < current and all(
            (bundle.path / f["file"]).is_file()
            for f in json.loads(manifests[v])["weights"]["files"].values())]
        if not older:
            raise VersionError(f"{bundle.path}: version {current} has no older version to "
                               "roll back to")
        to = max(older)
    if to not in manifests:
        raise VersionError(f"{bundle.path}: no version {to} (logged: "
                           f"{', '.join(map(str, sorted(manifests))) or 'none'})")
    manifest = json.loads(manifests[to])
    try:
        bundle_format.verify(bundle.path, manifest)
    except bundle_format.BundleError as e:
        raise VersionError(f"cannot roll back to version {to}: {e}") from None
    experts.write_atomic(bundle.path / MANIFEST,
                         np.frombuffer((json.dumps(manifest, indent=2) + "\n").encode(),
                                       np.uint8))
    _follow(bundle.path, bundle.manifest, manifest)
    return bundle_format.load(bundle.path)


def _follow(path, old: dict, new: dict) -> None:
    """The error map's statistics follow each clone to the slot version `new` holds it in
    (a rolled-back compression: from its pool slot back to its spare slot; forward again:
    back to the pool). A clone is its (layer, domain, parent); whatever the target slot had
    is dropped (`errormap.Store.move`). A retired expert's statistics were dropped when it
    was retired: rolled back, it starts without any."""
    where = {(r["layer"], r.get("domain"), r.get("parent")): r["slot"]
             for r in new["experts"]["table"] if r.get("kind") == "spawned"}
    moves = [(r["layer"], r["slot"], to) for r in old["experts"]["table"]
             if r.get("kind") == "spawned"
             and (to := where.get((r["layer"], r.get("domain"), r.get("parent")))) is not None
             and to != r["slot"]]
    if moves:
        errormap.Store(path).move(moves)

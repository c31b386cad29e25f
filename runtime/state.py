"""A bundle's state database: one SQLite file under `state/` that holds the error map
(`errormap.py`), the version log (`versions.py`) and the guard's base NLL per version
(`guard.py`). This module owns the file: where it
lives, its permissions (user only), how it is opened (WAL, busy timeout), its schema and the
migrations from older files (`PRAGMA user_version`), and how SQLite's failures reach the
caller (`StateError`: locked, corrupt, unwritable). The other modules only run SQL on the
connections it hands out.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

DB = "errormap.db"  # the name predates the version log; kept so existing bundles open
BUSY_MS = 10000


def _add_nll_sq(db: sqlite3.Connection) -> None:
    if "nll_sq" not in [r[1] for r in db.execute("PRAGMA table_info(domains)")]:
        db.execute("ALTER TABLE domains ADD COLUMN nll_sq REAL DEFAULT 0")


# Migration i takes a file from user_version i to i + 1. Files made before user_version was
# kept are at 0 with some of the tables already there: every step tolerates that.
MIGRATIONS = [
    """CREATE TABLE IF NOT EXISTS stats (
        layer INTEGER, expert INTEGER, domain TEXT, count INTEGER, sum REAL, sumsq REAL,
        ema REAL, last_seen REAL, PRIMARY KEY (layer, expert, domain));
    CREATE TABLE IF NOT EXISTS domains (
        domain TEXT PRIMARY KEY, tokens INTEGER, nll_sum REAL, last_seen REAL);
    CREATE TABLE IF NOT EXISTS replay (
        id INTEGER PRIMARY KEY AUTOINCREMENT, domain TEXT, tokens BLOB, length INTEGER);
    CREATE TABLE IF NOT EXISTS versions (
        version INTEGER PRIMARY KEY, created REAL, manifest TEXT, report TEXT);""",
    _add_nll_sq,  # the spread of each domain's NLL (verdicts)
    # per domain and cache weight, the NLL the learnability probe saved (`learnable.py`)
    """CREATE TABLE IF NOT EXISTS learnable (
        domain TEXT, lam REAL, tokens INTEGER, saved REAL, saved_sq REAL,
        PRIMARY KEY (domain, lam))""",
    # per domain, its token count when its last growth slice was refused (NULL: committed)
    "ALTER TABLE domains ADD COLUMN refused_at INTEGER",
    # per weights version and engine, the base guard text's NLL (`guard.base`)
    """CREATE TABLE IF NOT EXISTS guard_base (
        version INTEGER, engine TEXT, nll REAL, tokens INTEGER,
        PRIMARY KEY (version, engine))""",
]
VERSION = len(MIGRATIONS)


class StateError(Exception):
    """The bundle's state database is locked, corrupt, unwritable, or newer than this code."""


def folder(bundle_dir: str | Path) -> Path:
    return Path(bundle_dir) / "state"


def exists(bundle_dir: str | Path) -> bool:
    return (folder(bundle_dir) / DB).exists()


def _error(path: Path, e: sqlite3.Error) -> StateError:
    if "locked" in str(e) or "busy" in str(e):
        return StateError(f"{path}: locked by another process for over {BUSY_MS // 1000} s; "
                          "try again")
    corrupt = ("file is not a database", "malformed", "disk image")
    if any(words in str(e) for words in corrupt) and path.exists():
        aside = path.with_name(f"{DB}.corrupt-{int(time.time())}")
        path.rename(aside)
        for suffix in ("-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        return StateError(f"{path}: not a usable database ({e}); kept aside as {aside.name}, "
                          "the next observe starts a new error map")
    return StateError(f"{path}: {e}")


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    have = db.execute("PRAGMA user_version").fetchone()[0]
    if have > VERSION:
        raise StateError(f"{path}: made by a newer moegrow (state version {have}, this one "
                         f"reads up to {VERSION})")
    if have == VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        have = db.execute("PRAGMA user_version").fetchone()[0]  # another process may have
        for step in MIGRATIONS[have:]:
            if callable(step):
                step(db)
            else:
                for sql in step.split(";"):
                    if sql.strip():
                        db.execute(sql)
        db.execute(f"PRAGMA user_version = {VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _connect(bundle_dir: str | Path, create: bool = True) -> sqlite3.Connection:
    here = folder(bundle_dir)
    path = here / DB
    if not create and not path.exists():  # a read before anything was written: an empty
        db = sqlite3.connect(":memory:", isolation_level=None)  # database, on no disk
        _migrate(db, path)
        return db
    try:
        here.mkdir(mode=0o700, exist_ok=True)
        fresh = not path.exists()
        old = os.umask(0o077)
        try:
            db = sqlite3.connect(path, timeout=BUSY_MS / 1000, isolation_level=None)
        finally:
            os.umask(old)
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            _migrate(db, path)
        except BaseException:
            db.close()
            raise
        if fresh:
            path.chmod(0o600)
        return db
    except sqlite3.DatabaseError as e:
        raise _error(path, e) from None
    except OSError as e:
        raise StateError(f"{here}: cannot use the state folder ({e.strerror})") from None


@contextlib.contextmanager
def connection(bundle_dir: str | Path, write: bool = False,
               create: bool = True) -> Iterator[sqlite3.Connection]:
    """A connection to the bundle's state database (created and migrated on first use),
    closed after the block; with `write`, the block is one IMMEDIATE transaction, rolled
    back if it raises; with `create` false, a database that does not exist yet is read as
    an empty one in memory (nothing is written). SQLite errors come out as StateError."""
    db = _connect(bundle_dir, create)
    try:
        if write:
            db.execute("BEGIN IMMEDIATE")
        yield db
        if write:
            db.execute("COMMIT")
    except BaseException as e:
        if db.in_transaction:
            db.execute("ROLLBACK")
        if isinstance(e, sqlite3.Error):
            raise _error(folder(bundle_dir) / DB, e) from None
        raise
    finally:
        db.close()

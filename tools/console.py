"""What a person sees at the terminal: our own lines and progress bars, and not the engines'
chatter (torch's and torchao's warnings and log lines, ExecuTorch's and ONNX Runtime's C++
output), which goes to a log file unless `moegrow --verbose`."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import click

STEP = re.compile(r"(?P<key>[^:]+): (?P<what>.+) \((?P<i>\d+)/(?P<n>\d+)\)")


def cache_dir() -> Path:
    """Where moegrow keeps what it can rebuild (the demo's bundle, engine logs):
    $MOEGROW_CACHE, else $XDG_CACHE_HOME/moegrow, else ~/.cache/moegrow."""
    if os.environ.get("MOEGROW_CACHE"):
        return Path(os.environ["MOEGROW_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moegrow"


@contextlib.contextmanager
def work_copy(bundle: Path, out: Path | None, prefix: str) -> Iterator[Path]:
    """A copy of the bundle folder at `out`/bundle (kept, replacing an older one) or in a
    temporary folder (removed after the block); yields the folder that holds it."""
    import shutil
    import tempfile

    tmp = None if out is not None else tempfile.mkdtemp(prefix=prefix)
    root = Path(out) if out is not None else Path(tmp)
    if (root / "bundle").exists():
        shutil.rmtree(root / "bundle")
    shutil.copytree(bundle, root / "bundle")
    try:
        yield root
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def quiet(verbose: bool) -> Iterator[Path | None]:
    """Unless `verbose`: Python warnings ignored, log records at WARNING and below dropped
    (torch's `W1201 ...` lines, torchao's "Failed to load ..."), and file descriptor 2 (what
    C++ libraries write) sent to a log file in `cache_dir()`, while `sys.stderr` keeps
    writing to the terminal. Yields the log's path (None where nothing is redirected: a
    stderr that is not the process's fd 2, as under a test's capture), also kept in `LOG`
    for the caller to remove once the command succeeded (`done`) or name when it failed."""
    if verbose:
        yield None
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            with _redirect() as log:
                yield log
        finally:
            logging.disable(logging.NOTSET)


@contextlib.contextmanager
def _redirect() -> Iterator[Path | None]:
    try:
        real = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        real = False
    log = cache_dir() / f"engines-{os.getpid()}.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        _sweep(log.parent)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if real else -1
    except OSError:  # no cache to write to: the chatter stays on the terminal
        fd = -1
    if fd < 0:
        yield None
        return
    sys.stderr.flush()
    terminal, before = os.dup(2), sys.stderr
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = open(terminal, "w", buffering=1, encoding=before.encoding,  # noqa: SIM115
                      errors=before.errors, closefd=True)
    LOG.append(log)
    try:
        yield log
    finally:
        sys.stderr.flush()
        os.dup2(sys.stderr.fileno(), 2)
        sys.stderr.close()
        sys.stderr = before


def _sweep(folder: Path) -> None:
    """Remove the logs of processes that are gone (killed before they could clean up)."""
    for old in folder.glob("engines-*.log"):
        try:
            os.kill(int(old.stem.split("-", 1)[1]), 0)
        except ProcessLookupError:
            old.unlink(missing_ok=True)
        except (ValueError, PermissionError):  # not ours to judge
            pass


LOG: list[Path] = []  # the logs `quiet` wrote to in this process


def done(ok: bool) -> str:
    """Remove this process's engine logs if the command succeeded (`ok`); otherwise say
    where the last non-empty one is ("" if none)."""
    kept = ""
    while LOG:
        log = LOG.pop()
        if not ok and not kept and log.is_file() and log.stat().st_size:
            kept = f" (the engines' output: {log})"
        elif log.is_file():
            log.unlink()
    return kept


class Bars:
    """A library's progress lines on stderr: each series "KEY: WHAT (i/n)" (step i begins,
    or has just ended: the bar shows i - 1 done until the next line) as a tqdm bar named
    KEY, other lines as they are. Off a terminal every line is printed. Use as a context
    manager (on a clean exit the last step announced counts as done)."""

    def __init__(self) -> None:
        self.bar, self.key, self.last = None, None, 0

    def __call__(self, message: str) -> None:
        m = STEP.fullmatch(message)
        if m is None or not sys.stderr.isatty():
            self.close()
            click.echo(message, err=True)
            return
        if self.bar is None or m["key"] != self.key:
            from tqdm import tqdm

            self.close()
            self.key = m["key"]
            self.bar = tqdm(total=int(m["n"]), desc=self.key, unit="step", file=sys.stderr,
                            bar_format="{desc}: {bar:20} {n_fmt}/{total_fmt} [{elapsed}]"
                                       "{postfix}")
        self.last = int(m["i"])
        self.bar.set_postfix_str(m["what"], refresh=False)
        self.bar.update(self.last - 1 - self.bar.n)

    def close(self, complete: bool = True) -> None:
        if self.bar is not None:
            if complete:  # the last step announced is done
                self.bar.set_postfix_str("", refresh=False)
                self.bar.update(self.last - self.bar.n)
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, kind, *_) -> None:
        self.close(complete=kind is None)

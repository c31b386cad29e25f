"""`moegrow bench crash`: power loss at random instants, and what the phone finds after.

A child process (`python -m moegrow.tools.crash`, numpy and the runtime only) opens a copy
of the bundle and runs one operation: `observe` a piece of text, `idle` (one growth slice),
`rollback` to the version before, or `compress` (a bundle with a quantized pool). It prints
a line as it enters each phase (the operation's own functions, wrapped in the child only):

- observe: `score` (the observe program), `write` (the error map's one transaction);
- idle: `plan` (verdict and plan), `deepen` (the working copy: guard before, spawn, router
  rows, PC steps), `guard` (the guard after), `commit` (`versions.commit`: weight files,
  the log row, the manifest, pruning);
- rollback: `verify` (the target's files), `follow` (the error map follows the clones,
  after the manifest is replaced);
- compress: `compress` (quantize the clones into the pool, guard), `commit`.

The trials take every phase of every operation in turn (a shuffled order each round) and
send SIGKILL at a uniform instant of that phase (its length measured in a calibration run
of every operation). Then, in this process: the bundle loads and verifies its checksums
(`bundle.load`), opens on the engine and scores a text; the current version is a logged
one (or the export); every version logged before the kill is still logged, and the
version current before it still has its files unless a commit's retention let them go
(`versions.prune`: version 1, the current and the 4 newest keep theirs); the error map is
consistent: each domain's token count moved by 0 or by the observed text's tokens, its
probe tokens with it, and per layer its routed counts by k times that (an observe), or
never up (a rollback or compression moves statistics and drops what a slot held): no lost
or double counts.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from moegrow.tools.console import work_copy

OPS = {"observe": ("score", "write"), "idle": ("plan", "deepen", "guard", "commit"),
       "rollback": ("verify", "follow"), "compress": ("compress", "commit")}
DOMAIN = "crash"
PROBE_TEXT = "The quick brown fox jumps over the lazy dog."
WAIT = 600.0  # seconds a child may take to reach a phase before the harness gives up


class CrashError(ValueError):
    """Bad options or a bundle the harness cannot use."""


# the child ------------------------------------------------------------------------------

def _phase(name: str) -> None:
    print(f"phase {name}", flush=True)


def _wrap(owner, attr: str, name: str, after: bool = False) -> None:
    fn = getattr(owner, attr)

    def wrapped(*args, **kwargs):
        if not after:
            _phase(name)
        out = fn(*args, **kwargs)
        if after:
            _phase(name)
        return out
    setattr(owner, attr, wrapped)


def child(path: str, op: str, backend: str, text: str, limits: dict) -> None:
    """Run `op` on the bundle at `path`, announcing each phase on stdout."""
    from moegrow import runtime
    from moegrow.runtime import errormap, growth, versions

    rt = runtime.open(path, backend)
    if op == "observe":
        _wrap(errormap.Store, "add", "write")
        _phase("score")
        rt.observe(text, DOMAIN)
    elif op == "idle":
        _wrap(growth, "Work", "deepen")
        _wrap(growth, "_grow", "guard", after=True)
        _wrap(versions, "commit", "commit")
        _phase("plan")
        rt.idle(WAIT, DOMAIN, **limits)
    elif op == "rollback":
        _wrap(versions, "_follow", "follow")
        _phase("verify")
        versions.rollback(rt.bundle)
    else:
        from moegrow.runtime import compress

        _wrap(versions, "commit", "commit")
        _phase("compress")
        compress.compress(rt, DOMAIN)
    print("done", flush=True)


# the harness ----------------------------------------------------------------------------

def _inspect(path: Path) -> dict:
    """What a trial must keep: the current version, the log, and the error map's figures."""
    from moegrow.runtime import bundle as bundle_format
    from moegrow.runtime import errormap, versions

    b = bundle_format.load(path)
    m = errormap.Store(path).read()
    layers = b.config["num_hidden_layers"]
    routed = {d: [0] * layers for d in m["domains"]}
    for layer, _expert, domain, count, *_ in m["stats"]:
        routed.setdefault(domain, [0] * layers)[layer] += count
    return {"current": b.manifest["weights"]["version"],
            "log": {r["version"]: r["files_present"] for r in versions.log(b)},
            "tokens": {d: x["tokens"] for d, x in m["domains"].items()},
            "probe": {d: x["probe"]["tokens"] for d, x in m["domains"].items()},
            "routed": routed, "layers": layers, "k": b.config["num_experts_per_tok"]}


def _check(path: Path, backend: str, before: dict, added: int) -> dict[str, str]:
    """The failures a trial left (empty: none), by kind."""
    from moegrow import runtime
    from moegrow.runtime import versions

    try:
        after = _inspect(path)
        rt = runtime.open(path, backend)
        rt.score(PROBE_TEXT)
        del rt
    except Exception as e:  # noqa: BLE001 - any failure to load is what this counts
        return {"unloadable": f"{type(e).__name__}: {e}"}
    bad = {}
    if after["current"] != 1 and after["current"] not in after["log"]:
        bad["uncommitted_current"] = f"version {after['current']} is not in the log"
    lost = [v for v in before["log"] if v not in after["log"]]
    was = before["current"]
    kept = {1, after["current"], *sorted(after["log"])[-versions.KEEP:]}  # `prune`'s policy
    if before["log"].get(was, True) and not after["log"].get(was, True) and (
            after["current"] == was or was in kept):
        lost.append(was)  # its files went although no commit's retention let them go
    if lost:
        bad["lost_versions"] = f"versions {lost}"
    layers = after["layers"]
    for d in set(after["tokens"]) | set(before["tokens"]):
        moved = after["tokens"].get(d, 0) - before["tokens"].get(d, 0)
        probe = after["probe"].get(d, 0) - before["probe"].get(d, 0)
        routed = [a - b for a, b in zip(after["routed"].get(d, [0] * layers),
                                        before["routed"].get(d, [0] * layers), strict=True)]
        counted = (all(r == after["k"] * moved for r in routed) if moved else
                   all(r <= 0 for r in routed))  # moves and drops only remove counts
        if moved not in (0, added) or probe != moved or not counted:
            bad["inconsistent_maps"] = (f"{d}: tokens +{moved} (observed {added}), probe "
                                        f"+{probe}, routed per layer {routed}")
    return bad


def _start(path: Path, op: str, backend: str, text_file: Path, limits: dict):
    return subprocess.Popen(
        [sys.executable, "-m", "moegrow.tools.crash", str(path), op, backend, str(text_file),
         json.dumps(limits)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=os.environ | {"PYTHONWARNINGS": "ignore"})


def _line(proc, timeout: float = WAIT) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        raise CrashError(f"a child ran {timeout:.0f} s without a word")
    return proc.stdout.readline().strip()


def _calibrate(path: Path, op: str, backend: str, text_file: Path, limits: dict) -> dict:
    """Run `op` to its end -> {phase: seconds} for the phases it went through."""
    proc = _start(path, op, backend, text_file, limits)
    marks = []
    while (line := _line(proc)) and line != "done":
        marks.append((line.removeprefix("phase "), time.monotonic()))
    end = time.monotonic()
    proc.wait()
    return {name: (marks[i + 1][1] if i + 1 < len(marks) else end) - t
            for i, (name, t) in enumerate(marks)}


def bench_crash(bundle_dir: str | Path, trials: int, text: str, out: Path | None = None,
                backend: str = "onnxruntime", seed: int = 0, chunk: int = 1500,
                tokens: int = 2048, steps: int = 4, progress=None) -> dict:
    """`trials` kills on a copy of the bundle (in `out`/bundle, kept; else removed) ->
    {"trials", "unloadable", "lost_versions", "inconsistent_maps", "uncommitted_current",
    "by_phase" {op: {phase: kills}}, "completed" (children that ended before the chosen
    phase), "failures" [the first 20], "seconds"}."""
    import sentencepiece as spm
    from moegrow.runtime import bundle as bundle_format
    from tqdm import tqdm

    if trials < 1 or chunk < 100:
        raise CrashError("trials must be at least 1, chunk at least 100 characters")
    if len(text) < chunk:
        raise CrashError(f"the text has {len(text)} characters: at least --chunk {chunk}")
    src = bundle_format.load(bundle_dir)
    if not src.config.get("spare_experts"):
        raise CrashError(f"{src.path}: no spare slots: idle would never write a version")
    if backend not in src.engines():
        raise CrashError(f"{src.path}: no {backend} program in the bundle")
    say = progress or (lambda _m: None)
    rng = random.Random(seed)
    sp = spm.SentencePieceProcessor()
    sp.load(str(src.tokenizer))
    pieces = [text[i:i + chunk] for i in range(0, len(text) - chunk + 1, chunk)]
    limits = {"tokens": tokens, "steps": steps}
    ops = [op for op in OPS if op != "compress" or src.config.get("pool_experts")]
    counts = dict.fromkeys(("unloadable", "lost_versions", "inconsistent_maps",
                            "uncommitted_current"), 0)
    by_phase = {op: dict.fromkeys(OPS[op], 0) for op in ops}
    failures, completed, start = [], 0, time.monotonic()
    with work_copy(src.path, out, "moegrow-crash-") as root:
        path, text_file = root / "bundle", root / "text.txt"
        say("calibrating: each operation once, to its end")
        text_file.write_text(pieces[0])
        lengths: dict[str, dict[str, float]] = {}
        for op in ("observe", "observe", "idle", "rollback", "idle",
                   *(["compress"] if "compress" in ops else [])):
            lengths[op] = lengths.get(op, {}) | _calibrate(path, op, backend, text_file,
                                                           limits)
        bar = tqdm(total=trials, desc="kills", unit="kill", leave=False)
        kills = 0
        pairs = [(op, phase) for op in ops for phase in OPS[op]]
        turn = []
        while kills < trials:
            if not turn:  # every phase of every operation in turn, in a shuffled order
                turn = rng.sample(pairs, len(pairs))
            op, phase = turn.pop()
            piece = rng.choice(pieces)
            text_file.write_text(piece)
            before = _inspect(path)
            added = len(sp.encode(piece)) if op == "observe" else 0
            proc = _start(path, op, backend, text_file, limits)
            while (line := _line(proc)) not in (f"phase {phase}", "done", ""):
                pass
            if line != f"phase {phase}":  # it ended before that phase: no kill
                proc.wait()
                completed += 1
                continue
            time.sleep(rng.uniform(0, lengths[op].get(phase, 0.05)))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            by_phase[op][phase] += 1
            bar.update()
            for kind, why in _check(path, backend, before, added).items():
                counts[kind] += 1
                if len(failures) < 20:
                    failures.append({"trial": kills, "op": op, "phase": phase, kind: why})
        bar.close()
    result = {"trials": trials, **counts, "by_phase": by_phase, "completed": completed,
              "phase_seconds": lengths, "failures": failures,
              "seconds": time.monotonic() - start, "backend": backend}
    if out is not None:
        (root / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (root / "report.md").write_text(report(result))
    return result


def report(r: dict) -> str:
    lines = ["# Crash harness", "",
             f"{r['trials']} SIGKILLs on {r['backend']} ({r['seconds']:.0f} s; "
             f"{r['completed']} children ended before their chosen phase and were not "
             "counted).", "", "| check | failures |", "|---|---|"]
    lines += [f"| {k} | {r[k]} |" for k in ("unloadable", "lost_versions", "inconsistent_maps",
                                            "uncommitted_current")]
    lines += ["", "| operation | phase | kills | phase length (calibration, s) |",
              "|---|---|---|---|"]
    for op, phases in r["by_phase"].items():
        lines += [f"| {op} | {p} | {n} | {r['phase_seconds'].get(op, {}).get(p, 0):.2f} |"
                  for p, n in phases.items()]
    for f in r["failures"]:
        lines.append(f"- {json.dumps(f)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]).read_text(),
          json.loads(sys.argv[5]))

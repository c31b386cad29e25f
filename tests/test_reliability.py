"""Reliability (issue 16): `moegrow bench crash` kills processes at every phase of observe,
idle, rollback and compress, and its checks find what a kill could break."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import german
from conftest import run_cli as run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moegrow.runtime import bundle as bundle_format
from moegrow.runtime import state
from moegrow.tools import crash

KINDS = ("unloadable", "lost_versions", "inconsistent_maps", "uncommitted_current")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("crash") / "de.txt"
    path.write_text(german(300))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("key", ["pool"])
def test_bench_crash_kills_every_phase_and_nothing_breaks(capsys, exports, key, text,
                                                          tmp_path):
    from conftest import exported

    src = exported(exports["mixtral", key])
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    pairs = sum(len(v) for v in crash.OPS.values())
    code, out, err = run(capsys, "bench", "crash", str(src), "--trials", str(pairs),
                         "--text", str(text), "--out", str(tmp_path / "c"), "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["trials"] == pairs and {k: r[k] for k in KINDS} == dict.fromkeys(KINDS, 0), r
    kills = [n for phases in r["by_phase"].values() for n in phases.values()]
    assert sum(kills) == pairs
    # every phase was reached in the calibration and killed at least once, unless a child
    # ended before it (rollback with no older version, a slice with nothing to do)
    assert sum(1 for n in kills if n) >= pairs - r["completed"]
    assert set(r["by_phase"]) == set(crash.OPS)  # the pool bundle compresses too
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    assert (tmp_path / "c" / "results.json").is_file()


def test_the_crash_checks_find_what_a_kill_could_break(tiny_bundle, text, tmp_path):
    """Each kind of damage the harness counts, made by hand on a grown copy: the checks
    can fail."""
    from moegrow import runtime

    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    rt = runtime.open(path, "onnxruntime")
    rt.observe(text.read_text()[:3000], crash.DOMAIN)
    rt.idle(600, crash.DOMAIN, tokens=2048, steps=2)
    before = crash._inspect(path)
    assert len(before["log"]) == 2 and before["current"] == 2  # the slice committed
    assert crash._check(path, "onnxruntime", before, 0) == {}

    db = state.folder(path) / state.DB
    with sqlite3.connect(db) as c:  # a domain's tokens without their statistics
        c.execute("UPDATE domains SET tokens = tokens + 7")
    assert set(crash._check(path, "onnxruntime", before, 7)) == {"inconsistent_maps"}
    with sqlite3.connect(db) as c:
        c.execute("UPDATE domains SET tokens = tokens - 7")
        c.execute("UPDATE stats SET count = count + 1 WHERE rowid = 1")  # a double count
    assert set(crash._check(path, "onnxruntime", before, 0)) == {"inconsistent_maps"}
    with sqlite3.connect(db) as c:
        c.execute("UPDATE stats SET count = count - 1 WHERE rowid = 1")
        c.execute("DELETE FROM versions WHERE version = 1")  # a committed version lost
    assert set(crash._check(path, "onnxruntime", before, 0)) == {"lost_versions"}
    b = bundle_format.load(path)
    weights = b.path / b.manifest["weights"]["files"]["onnxruntime"]["file"]
    weights.write_bytes(weights.read_bytes()[:-8])  # a torn weight file
    assert set(crash._check(path, "onnxruntime", before, 0)) == {"unloadable"}


def test_bench_crash_bad_input(capsys, tiny_bundle, text, tmp_path):
    args = ("bench", "crash", str(tiny_bundle), "--trials", "1", "--out", str(tmp_path / "o"))
    for bad in (["--text", str(tmp_path / "missing.txt")],
                ["--text", str(text), "--backend", "tensorflow"],
                ["--text", str(text), "--chunk", "99999999"],
                ["--text", str(text), "--trials", "0"]):
        code, _, err = run(capsys, *args, *bad)
        assert code == 2 and len(err.strip().splitlines()) == 1, (bad, err)
    assert not (tmp_path / "o").exists()
    code, _, err = run(capsys, "bench", "crash", str(tmp_path / "nothing"), "--text", str(text))
    assert code == 2 and len(err.strip().splitlines()) == 1


def _socket_fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


_AUDIT = {"on": False, "events": []}


def _audit(event: str, args) -> None:
    if _AUDIT["on"] and event.split(".")[0] in ("socket", "http", "urllib", "ftplib",
                                                "smtplib", "webbrowser"):
        _AUDIT["events"].append((event, repr(args)[:200]))


@pytest.mark.parametrize("engine", ["onnxruntime", "executorch"])
def test_the_runtime_opens_no_socket(tiny_bundle, tmp_path, engine):
    """Serving, observe, idle (a committed slice), rollback and forget on both engines,
    under an audit hook that records every socket and network call Python makes, and the
    process's socket descriptors (native code) before and after: none. The state files
    the runtime wrote are the user's only (0600, their folder 0700) and lie inside the
    bundle's state folder."""
    from moegrow import runtime
    from moegrow.runtime import errormap, versions

    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path, ignore=shutil.ignore_patterns("state"))  # as exported
    if not getattr(sys, "_moegrow_audit", False):  # hooks cannot be removed: add it once
        sys.addaudithook(_audit)
        sys._moegrow_audit = True
    fds = _socket_fds()
    _AUDIT["events"].clear()
    _AUDIT["on"] = True
    try:
        rt = runtime.open(path, engine)
        rt.suggest("Der Hund")
        rt.score(german(3))
        rt.observe(german(300), "de")
        report = rt.idle(600, "de", tokens=2048, steps=2)
        files = {p: (p.stat().st_mode & 0o777, p.is_dir()) for p in path.rglob("*")}
        rt.reload(versions.rollback(rt.bundle))
        errormap.Store(path).forget()
        rt.score(german(3))
    finally:
        _AUDIT["on"] = False
    assert report["committed"]
    assert _AUDIT["events"] == [] and _socket_fds() <= fds
    _AUDIT["on"] = True  # the guard itself sees a socket
    try:
        import socket

        socket.socket().close()
    finally:
        _AUDIT["on"] = False
    assert _AUDIT["events"]
    shipped = {p for p in tiny_bundle.rglob("*") if "state" not in p.parts}
    for p, (mode, folder) in files.items():
        rel = p.relative_to(path)
        if tiny_bundle / rel in shipped:
            continue
        assert rel.parts[0] in ("state", "weights") or rel.name == "manifest.json", rel
        if rel.parts[0] == "state":
            assert mode == (0o700 if folder else 0o600), (rel, oct(mode))


def test_forget_leaves_no_trace_of_the_text_in_any_file(tiny_bundle, tmp_path):
    """The replay buffer holds the observed text as token ids; after `moegrow forget` the
    ids of a distinctive text are in no file of the bundle (database, WAL, shared memory:
    no free page or log frame keeps them), and the map is empty."""
    from moegrow import runtime
    from moegrow.runtime import errormap

    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    rt = runtime.open(path, "onnxruntime")
    secret = "Zebras quietly juggle seventeen purple umbrellas near Quxville. " * 4
    rt.observe(german(40) + "\n\n" + secret, "notes")
    ids = np.array(rt.sp.encode(secret)[:24], np.int32).tobytes()

    def found() -> list[str]:
        return [p.name for p in path.rglob("*") if p.is_file() and ids in p.read_bytes()]

    assert found()  # the check can fail: the replay holds the text's ids

    def forget() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "moegrow.tools.cli", "forget",
                               str(path)], capture_output=True, text=True)

    reader = sqlite3.connect(state.folder(path) / state.DB)  # another process's connection
    reader.execute("BEGIN")
    assert reader.execute("SELECT COUNT(*) FROM replay").fetchone()[0] > 0
    done = forget()  # a read in flight: the old pages cannot be overwritten yet
    assert done.returncode == 2 and "another process is reading" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    reader.execute("COMMIT")  # the read ends, the connection stays open (was: the text
    done = forget()           # stayed in the database file until it closed)
    assert done.returncode == 0, done.stderr
    assert found() == []
    reader.close()
    assert found() == []
    assert errormap.Store(path).read() == {"domains": {}, "stats": [], "replay_tokens": 0}


@pytest.mark.slow
def test_poisoned_input_never_commits_a_regression(capsys, tiny_bundle, corpus_dir, text,
                                                   tmp_path):
    """`moegrow bench poison` on the tiny bundle, every case once, as the product grows
    (gated clones) and in place (the base experts themselves, where only the guard
    protects the base): no committed slice makes the independent base text worse than the
    guard's bound, the guard refuses the in-place slices that would (shuffled base text,
    very long words), and prompts at and past the context are answered or refused with
    `InputError`."""
    from moegrow.tools import poison

    code, out, err = run(capsys, "bench", "poison", str(tiny_bundle), "--old",
                         str(corpus_dir / "heldout.txt"), "--text", str(text), "--seeds", "1",
                         "--chars", "6000", "--out", str(tmp_path / "p"), "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["trials"] == 2 * len(poison.CASES) and r["regressions"] == 0
    for row in r["rows"]:
        if row["committed"]:
            assert row["base_rise"] <= poison.BOUND and row["guard_base_rise"] <= poison.BOUND
        else:
            assert row["reason"]
    refused = [row for row in r["rows"] if (row["reason"] or "").startswith("guard")]
    assert refused and all(row["place"] == "inplace" and row["guard_base_rise"] > poison.BOUND
                           for row in refused)
    assert all(row["base_rise"] == 0 for row in refused)  # nothing of it was committed
    assert all(v == "answered" or v.startswith("InputError") for v in r["serving"].values())
    assert r["serving"]["past-context/score"] == "answered"  # scored in windows
    code, _, err = run(capsys, "bench", "poison", str(tiny_bundle), "--old",
                       str(corpus_dir / "heldout.txt"), "--text", str(text), "--cases", "nope")
    assert code == 2 and len(err.strip().splitlines()) == 1


def _paths(node, path=()):
    """Every path into a JSON tree (dict keys, list indices)."""
    yield path
    items = node.items() if isinstance(node, dict) else enumerate(node) \
        if isinstance(node, list) else ()
    for k, v in items:
        yield from _paths(v, (*path, k))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) |
                    st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) |
                    st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


@pytest.fixture(scope="module")
def fuzz_bundle(tiny_bundle, tmp_path_factory):
    """A copy of the tiny bundle that fuzz tests change and restore (the pristine manifest
    beside it, as pristine.json)."""
    path = tmp_path_factory.mktemp("fuzz") / "b"
    shutil.copytree(tiny_bundle, path)
    shutil.copy(path / "manifest.json", path.parent / "pristine.json")
    return path


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_manifests_load_or_fail_with_a_typed_error(fuzz_bundle, data):
    """A manifest with one value anywhere replaced (the config, the expert table, the
    weights, the programs, the budget, the calibration) or one key removed: the bundle
    either opens and serves, or `runtime.open` raises `BundleError` (or `BackendError`:
    an engine that cannot load a program as the manifest describes it). Found by it: a
    layout entry's empty form raised IndexError; so did a config without `spare_experts`
    (the table's spare slots past the config's: `test_a_table_past_the_config_is_refused`),
    and one without `num_attention_heads` a KeyError (`test_a_config_the_programs_...`)."""
    from moegrow import runtime
    from moegrow.runtime import backends
    from moegrow.runtime import bundle as bundle_format

    path = fuzz_bundle
    pristine = (path.parent / "pristine.json").read_text()
    manifest = json.loads(pristine)
    where = data.draw(st.sampled_from([p for p in _paths(manifest) if p]))
    parent = manifest
    for k in where[:-1]:
        parent = parent[k]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[where[-1]]
    else:
        parent[where[-1]] = data.draw(JSON)
    (path / "manifest.json").write_text(json.dumps(manifest))
    try:
        rt = runtime.open(path, "onnxruntime")
        rt.score("Der Hund liest.")
    except (bundle_format.BundleError, backends.BackendError) as e:
        assert str(e) and "\n" not in str(e)
    finally:
        (path / "manifest.json").write_text(pristine)


@pytest.mark.parametrize("change", ["no spare", "float slot", "row twice"])
def test_a_table_past_the_config_is_refused(fuzz_bundle, change):
    """The expert table must name each (layer, slot) of the config once, as integers."""
    from moegrow import runtime
    from moegrow.runtime import bundle as bundle_format

    path = fuzz_bundle
    pristine = (path.parent / "pristine.json").read_text()
    manifest = json.loads(pristine)
    table = manifest["experts"]["table"]
    if change == "no spare":
        del manifest["config"]["spare_experts"]
    elif change == "float slot":
        table[0]["slot"] = float(table[0]["slot"])
    else:
        table.append(dict(table[0]))
    (path / "manifest.json").write_text(json.dumps(manifest))
    try:
        with pytest.raises(bundle_format.BundleError, match="expert table"):
            runtime.open(path, "onnxruntime")
    finally:
        (path / "manifest.json").write_text(pristine)


@pytest.mark.parametrize(("key", "value", "error"), [
    ("num_attention_heads", None, "config 'num_attention_heads'"),  # found by the fuzz test
    ("hidden_size", "512", "config 'hidden_size'"),
    ("num_experts_per_tok", 99, "routes 99 experts"),
    ("context", 0, "config 'context'"),
    ("num_key_value_heads", 7, "could not run program 'prefill'")])  # the programs' shapes
def test_a_config_the_programs_cannot_serve_is_refused(fuzz_bundle, key, value, error):
    """The sizes the runtime reads from the config are checked when the bundle loads; a
    size the programs were not exported with fails as the engine's typed error."""
    from moegrow import runtime
    from moegrow.runtime import backends
    from moegrow.runtime import bundle as bundle_format

    path = fuzz_bundle
    pristine = (path.parent / "pristine.json").read_text()
    manifest = json.loads(pristine)
    where = manifest if key == "context" else manifest["config"]
    where.pop(key) if value is None else where.update({key: value})  # (head_dim: None)
    (path / "manifest.json").write_text(json.dumps(manifest))
    try:
        with pytest.raises((bundle_format.BundleError, backends.BackendError), match=error):
            runtime.open(path, "onnxruntime").suggestions("Der Hund liest.")
    finally:
        (path / "manifest.json").write_text(pristine)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=400))
def test_fuzzed_text_is_observed_scored_and_suggested_or_refused(fuzz_bundle, text):
    """Any Unicode text (control characters, surrogates excluded by UTF-8, emoji, lone
    combining marks): observe, score and suggestions answer or raise `InputError`."""
    from moegrow.runtime.session import InputError

    rt = _fuzz_runtime(fuzz_bundle)
    for call in (lambda: rt.observe(text, "fuzz"), lambda: rt.score(text),
                 lambda: rt.suggestions(text)):
        try:
            call()
        except InputError as e:
            assert str(e)


_RT = {}


def _fuzz_runtime(path):
    from moegrow import runtime

    if path not in _RT:
        _RT[path] = runtime.open(path, "onnxruntime")
    return _RT[path]


FUZZ_COMMANDS = ("eval", "generate", "observe", "errormap", "forget", "idle", "versions",
                 "rollback", "compress", "budget")
VALUES = st.sampled_from(["0", "-1", "1", "3", "1e9", "nan", "", "x", "--json", "de",
                          "onnxruntime", "executorch", "/nonexistent", "0.5", "é"])


def _stat(path) -> dict:  # as `conftest.snapshot`: ONNX Runtime's packed-weight cache aside
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")
            if p.is_file() and "prepacked" not in p.relative_to(path).parts[:-1]}


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_cli_options_exit_0_or_2_and_bad_ones_change_nothing(capsys, fuzz_bundle,
                                                                    tmp_path, data):
    """The device-side commands with their own options in random order and with random
    values (and a bundle, a missing path or a text file for BUNDLE): every run exits 0 or
    2 with no traceback, and a run that exits 2 changed no file of the bundle."""
    from moegrow.tools import cli

    run(capsys, "--help")  # registers the late commands
    name = data.draw(st.sampled_from(FUZZ_COMMANDS))
    command = cli.cli.commands[name]
    text = tmp_path / "t.txt"
    text.write_text("Der Hund liest die Zeitung.")
    target = data.draw(st.sampled_from([str(fuzz_bundle), str(tmp_path / "missing"),
                                        str(text)]))
    options = [p for p in command.params if p.opts[0].startswith("--")]
    argv = [name, target]
    for param in data.draw(st.lists(st.sampled_from(options), max_size=4)) if options else []:
        argv.append(param.opts[0])
        if not param.is_flag:
            argv.append(str(text) if param.name in ("text_file", "text") and
                        data.draw(st.booleans()) else data.draw(VALUES))
    before = _stat(fuzz_bundle)
    with contextlib.chdir(tmp_path):  # a relative output path (`errormap --plot de`) lands here
        code, out, err = run(capsys, *argv)
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        assert len(err.strip().splitlines()) == 1, (argv, err)
        assert _stat(fuzz_bundle) == before, argv


def test_the_growth_policy_is_asked_before_the_slice_and_every_step(tiny_bundle, tmp_path):
    """`Runtime.idle(policy=...)`: a "not now" before the slice stops it before it plans;
    one that comes after the plan (the phone left its charger mid-slice) stops it before
    its next PC step: nothing committed, the working copy gone, the bundle as it was."""
    from conftest import snapshot
    from moegrow import runtime

    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    rt = runtime.open(path, "onnxruntime")
    rt.observe(german(300), "de")
    before = snapshot(path)
    asked = []

    def never():
        asked.append(1)
        return "on battery"

    r = rt.idle(600, "de", policy=never, tokens=2048, steps=4)
    assert r["reason"] == "policy: on battery" and not r["committed"] and r["plan"] == []
    assert asked == [1] and snapshot(path) == before
    asked.clear()

    def until_the_first_step():  # asked at the plan, at step 1, at step 2
        asked.append(1)
        return None if len(asked) < 3 else "screen on"

    r = rt.idle(600, "de", policy=until_the_first_step, tokens=2048, steps=4)
    assert r["reason"].startswith("policy: screen on (before step 2)") and not r["committed"]
    assert r["steps"] == 1 and r["plan"]  # it planned and took one step, then stopped
    assert snapshot(path) == before
    r = rt.idle(600, "de", policy=lambda: None, tokens=2048, steps=2)
    assert r["committed"]  # the same slice, allowed


def test_the_keyboard_grows_on_mains_power_only(tmp_path):
    """apps/keyboard's `--grow-when charging` policy on a fake power-supply tree."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "keyboard", Path(__file__).parent.parent / "apps" / "keyboard" / "keyboard.py")
    kb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kb)

    def supply(name, kind, **files):
        d = tmp_path / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "type").write_text(kind + "\n")
        for k, v in files.items():
            (d / k).write_text(v + "\n")

    assert kb.on_mains(tmp_path) is None  # no battery: a desktop
    supply("BAT0", "Battery", status="Discharging")
    supply("AC", "Mains", online="0")
    assert kb.on_mains(tmp_path) == "on battery"
    supply("AC", "Mains", online="1")
    assert kb.on_mains(tmp_path) is None
    supply("AC", "Mains", online="0")
    supply("BAT0", "Battery", status="Full")
    assert kb.on_mains(tmp_path) is None


def test_a_domain_the_gate_cannot_tell_from_the_base_spawns_nothing(tiny_bundle, tmp_path,
                                                                      monkeypatch):
    """A class whose threshold the base text pushes over `gate.SEPARABLE` (on the default
    model, shuffled base text: 27.2 nats against 4.61 for the benchmark domains) gets no
    gated clone: the slice ends before it spawns, nothing committed, and the refusal is
    recorded (the domain waits for new text). Here the bound is lowered under every
    threshold, so the tiny bundle's German domain meets it."""
    from conftest import snapshot
    from moegrow import runtime
    from moegrow.runtime import errormap, gate

    path = tmp_path / "b"
    shutil.copytree(tiny_bundle, path)
    rt = runtime.open(path, "onnxruntime")
    rt.observe(german(300), "de")
    weights = {p: b for p, b in snapshot(path).items() if "state" not in p.parts}
    monkeypatch.setattr(gate, "SEPARABLE", gate.GATE_LLR - 1)
    r = rt.idle(600, "de", tokens=2048, steps=2)
    assert not r["committed"] and "cannot tell 'de' from base text" in r["reason"]
    assert r["threshold"] > gate.SEPARABLE and r["steps"] == 0
    assert {p: b for p, b in snapshot(path).items() if "state" not in p.parts} == weights
    assert not (path / "state" / "work.onnxruntime").exists()
    seen = errormap.Store(path).read()["domains"]["de"]
    assert seen["refused_at"] == seen["tokens"]  # recorded: it waits for new text
    monkeypatch.setattr(gate, "SEPARABLE", 4 * gate.GATE_LLR)
    rt.observe(german(100, seed=3), "de")  # new text: it may try again, and German passes
    assert rt.idle(600, "de", tokens=2048, steps=2)["committed"]

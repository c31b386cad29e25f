"""Fuzzing (issue 16): manifests with one value changed or one key removed, any Unicode
text, and CLI options either work or fail with a typed error (one line, exit code 2) and
change nothing on disk."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
from conftest import run_cli as run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moegrow.runtime import bundle as bundle_format


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

"""`moegrow demo`: the whole loop through an engine on a cached bundle, and the terminal
it prints to (the engines' chatter kept in a log, progress bars)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from moegrow.runtime import bundle as bundle_format
from moegrow.runtime import versions
from moegrow.tools.cli import main

pytestmark = pytest.mark.slow


def demo(capsys, *argv: str) -> dict:
    main(["demo", *argv, "--json"])
    return json.loads(capsys.readouterr().out)


def test_demo_adapts_and_reuses_its_cached_bundle(tiny_ckpt, corpus_dir, tmp_path, capsys,
                                                   monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOEGROW_CACHE", str(cache))
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    with pytest.raises(SystemExit) as e:  # no held-out base text: refused before exporting
        main(["demo", str(ckpt)])
    assert e.value.code == 2 and "calibration.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["demo", str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "not a checkpoint folder" in capsys.readouterr().err
    assert not cache.exists() or not list(cache.iterdir())
    shutil.copyfile(corpus_dir / "heldout.txt", ckpt / "calibration.txt")

    first = demo(capsys, str(ckpt))
    assert first["exported"] and first["verdict"] in ("deepen", "spawn")
    assert first["version"] == 2 and first["slice"]["committed"]
    assert first["after"]["ppl"] < first["before"]["ppl"]  # the user's held-out text
    assert first["after"]["top3"] >= first["before"]["top3"]
    assert abs(first["base_after"]["ppl"] / first["base_before"]["ppl"] - 1) < 0.01
    assert first["rolled_back"]["ppl"] == pytest.approx(first["before"]["ppl"], rel=1e-6)
    assert set(first["suggestions"]["before"]) == set(first["suggestions"]["after"])
    assert [p.name.split("-")[0] for p in cache.iterdir()] == ["demo"]  # no logs, no copies

    grown = tmp_path / "grown"
    second = demo(capsys, str(ckpt), "--keep", str(grown))
    assert not second["exported"]  # the cache, unchanged by the first run's growth
    assert second["before"] == first["before"] and second["verdict"] == first["verdict"]
    log = versions.log(bundle_format.load(grown))
    assert [v["version"] for v in log] == [1, 2] and log[0]["current"]  # rolled back
    with pytest.raises(SystemExit):  # --keep never writes into an existing folder
        main(["demo", str(ckpt), "--keep", str(grown)])
    assert "exists" in capsys.readouterr().err


CHATTER = """
import logging, os, sys, warnings
from moegrow.tools import console
console.cache_dir().mkdir(parents=True, exist_ok=True)
(console.cache_dir() / "engines-999999999.log").write_text("a killed process's")
with console.quiet({verbose}) as log:
    os.write(2, b"C++ says W1201\\n")
    logging.getLogger("torchao").warning("Failed to load x.so")
    warnings.warn("a FutureWarning")
    print("our line", file=sys.stderr)
    print(log is not None and log.is_file())
print(console.done(True) == "" and not any(console.cache_dir().glob("engines-*")))
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_the_engines_chatter_stays_in_a_log_unless_verbose(tmp_path, verbose):
    done = subprocess.run([sys.executable, "-c", CHATTER.format(verbose=verbose)],
                          capture_output=True, text=True, check=True,
                          env={"MOEGROW_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"})
    said = [x for x in done.stderr.splitlines() if x.strip()]
    if verbose:
        assert len(said) >= 4 and "C++ says W1201" in done.stderr
        assert done.stdout.split() == ["False", "False"]  # nothing redirected, nothing swept
    else:
        assert said == ["our line"]
        assert done.stdout.split() == ["True", "True"]  # logged, then removed; and the log
        # of a process that died without removing its own is gone too

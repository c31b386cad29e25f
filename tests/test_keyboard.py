"""apps/keyboard driven as a person uses it: in a real terminal (tmux), typing, Tab, a
paste, a pause that grows the model, a rollback, and a keystroke that interrupts a slice."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import exported, german
from moegrow.runtime import bundle as bundle_format
from moegrow.runtime import versions

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="no tmux on this machine")]
APP = Path(__file__).parent.parent / "apps" / "keyboard" / "keyboard.py"


class Terminal:
    """A tmux server of its own with one 160x24 window running `command`."""

    def __init__(self, socket: str, command: list[str]):
        self.base = ["tmux", "-L", socket]
        subprocess.run(self.base + ["-f", "/dev/null", "new-session", "-d", "-x", "160", "-y",
                                    "24", " ".join(command)], check=True)

    def screen(self) -> str:
        return subprocess.run(self.base + ["capture-pane", "-p"], check=True,
                              capture_output=True, text=True).stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        subprocess.run(self.base + ["send-keys"] + ["-l"] * literal + list(keys), check=True)

    def paste(self, text: str, tmp: Path) -> None:  # bracketed, as a terminal pastes
        (tmp / "paste.txt").write_text(text)
        subprocess.run(self.base + ["load-buffer", str(tmp / "paste.txt")], check=True)
        subprocess.run(self.base + ["paste-buffer", "-p"], check=True)

    def wait(self, predicate, seconds: float, what: str) -> str:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.05)
        raise AssertionError(f"no {what} within {seconds} s; the screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(self.base + ["kill-server"], check=False)


def line(screen: str, start: str) -> str:
    return next((x.strip() for x in screen.splitlines() if x.strip().startswith(start)), "")


def test_the_keyboard_suggests_grows_when_paused_and_yields_to_keys(exports, tmp_path):
    path = tmp_path / "bundle"
    shutil.copytree(exported(exports["mixtral", 4]), path)
    term = Terminal(f"moegrow-{tmp_path.name}", [
        sys.executable, str(APP), str(path), "--domain", "de", "--pause", "1", "--tokens",
        "4096", "--steps", "8", "2>", str(tmp_path / "stderr.txt")])
    try:
        term.wait(lambda s: "weights v1" in s and "ready" in s, 60, "status line")
        term.keys("The parser reads", literal=True)
        s = term.wait(lambda s: line(s, "Tab:"), 20, "suggestions")
        first = line(s, "Tab:").split("[")[1].split("]")[0]
        term.keys("Tab")  # accepted: the word is in the document
        term.wait(lambda s: "Theparserreads" + first.replace(" ", "") in s.replace(" ", ""),
                  10, "the accepted word")

        term.keys("Enter")
        term.paste(german(400), tmp_path)  # the user writes German; then pauses
        term.keys("\nDer parser liest die", literal=True)
        s = term.wait(lambda s: "committed v2" in s and "ready" in s, 240,
                      "a committed growth slice")
        assert "weights v2" in s and ("verdict spawn" in s or "verdict deepen" in s)
        grown = line(s, "Tab:")
        assert versions.log(bundle_format.load(path))[-1]["current"]

        term.keys("C-r")  # roll back: the same text, the suggestions of version 1
        s = term.wait(lambda s: "weights v1" in s and "rolled back" in s, 20, "rollback")
        assert line(s, "Tab:") != grown

        term.keys(" Die tastatur", literal=True)  # new text: a slice starts at the pause...
        term.wait(lambda s: "growing:" in s, 30, "a slice starting")
        term.keys("x")  # ...and a keystroke ends it, nothing committed
        s = term.wait(lambda s: "interrupted by a keystroke" in s, 20, "the interruption")
        assert "slice interrupted in" in s and "weights v1" in s
        term.keys("C-q")  # quitting stops a slice the pause began since
        term.wait(lambda s: "Tab accept" not in s, 20, "the app quitting")
        log = versions.log(bundle_format.load(path))
        assert [v["version"] for v in log] == [1, 2] and log[0]["current"]
        assert not (path / "state" / "work.onnxruntime").exists()  # no partial slice left
    finally:
        term.close()

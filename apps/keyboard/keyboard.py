"""A terminal keyboard that learns as you type.

    python apps/keyboard/keyboard.py BUNDLE [--domain notes] [--pause 2] [--backend onnxruntime]
                                            [--grow-when charging|always]

It suggests the next words as you type (Tab accepts the first), observes what you type
under one domain tag for the session (the error map), and when you pause it grows in the
background (by default only on mains power: `--grow-when`, the growth policy): one `idle`
slice in a thread, on a working copy of the weights. A keystroke
interrupts the slice (`backends.Interrupt`: ONNX Runtime stops the run in flight) and the
partial slice is discarded: only a slice that ran to its guard commits a new weights
version, whole. The status line shows the verdict, the weights version, the bytes used of
the budget and the last slice's result. Keys: Tab accept, Ctrl-R roll back one version,
Ctrl-F forget the error map and the observed text, Ctrl-Q quit.

Everything runs through the runtime's public API (`moegrow.runtime`), as an app would.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

from moegrow import runtime
from moegrow.runtime import backends, compress, errormap, growth, verdicts, versions
from moegrow.runtime import bundle as bundle_format
from prompt_toolkit import Application
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.layout import HSplit, Layout, Window
from prompt_toolkit.layout.controls import BufferControl, FormattedTextControl

SHOWN = 3  # suggestions on the bar
POWER = Path("/sys/class/power_supply")


def on_mains(power: Path = POWER) -> str | None:
    """The growth policy `--grow-when charging`: None (grow) when a charger is online or
    the machine has no battery (a desktop), else why not. Linux's power-supply class; a
    phone app asks its OS (BatteryManager, UIDevice) the same question."""
    supplies = [d for d in power.glob("*") if (d / "type").is_file()]
    kinds = {d: (d / "type").read_text().strip() for d in supplies}
    batteries = [d for d, k in kinds.items() if k == "Battery"]
    online = any((d / "online").is_file() and (d / "online").read_text().strip() == "1"
                 for d, k in kinds.items() if k != "Battery")
    charging = any((d / "status").is_file() and (d / "status").read_text().strip() in
                   ("Charging", "Full") for d in batteries)
    return None if not batteries or online or charging else "on battery"


class Learner:
    """The model side: suggestions from the serving runtime, and growth in one background
    thread that `stop` interrupts. Only one of them runs at a time: a keystroke stops the
    slice before the next suggestion."""

    def __init__(self, path: str, backend: str, domain: str, limits: dict,
                 policy=None) -> None:
        self.rt = runtime.open(path, backend)
        self.domain, self.limits, self.policy = domain, limits, policy
        self.thread: threading.Thread | None = None
        self.busy = False  # a slice (or its observe) runs
        self.interrupt: backends.Interrupt | None = None
        self.observed = 0  # characters of the document observed so far
        self.grown_for = -1  # the document length the last finished slice saw
        self.verdict, self.last, self.progress = "not observed", "none yet", ""

    def suggest(self, text: str) -> list[dict]:
        """The top suggestions for the end of `text` (its tail that fits the context): next
        words after a space, else the current word's completions and next words."""
        room = self.rt.bundle.context - 8
        # the tail, from starts that stay put while the text grows (a piece is rarely 16
        # characters; then whole halves of the room): the runtime reuses the cache of the
        # context it shares with the last keystroke's (`Runtime.extend`)
        cut = max(0, len(text) - 16 * room) // (8 * room) * (8 * room)
        ids = self.rt.sp.encode(text[cut:])
        start = -(-max(0, len(ids) - room) // (room // 2)) * (room // 2)
        tail = self.rt.sp.decode(ids[start:]) if start else text[cut:]
        if not tail.strip():
            return []
        words = self.rt.suggestions(tail, k=SHOWN * 3)
        if text[-1:].isspace():
            words = [w for w in words if w["new"]]
        return [w for w in words if w["word"]][:SHOWN]

    @property
    def growing(self) -> bool:
        return self.busy

    def grow(self, text: str, done) -> None:
        """Observe what was typed since the last time, then one growth slice, in a thread;
        `done(committed)` is called when it ends (committed, refused, or interrupted)."""
        new, self.observed = text[self.observed:], len(text)
        self.interrupt, self.busy, self.progress = backends.Interrupt(), True, ""
        self.thread = threading.Thread(target=self._grow, args=(new, len(text), done),
                                       daemon=True)
        self.thread.start()

    def _grow(self, new: str, length: int, done) -> None:
        start, committed = time.monotonic(), False
        try:
            if new.strip():
                self.rt.observe(new, self.domain)
            self.verdict = self.judge()
            if self.verdict in ("deepen", "spawn"):
                r = self.rt.idle(self.limits["seconds"], self.domain, interrupt=self.interrupt,
                                 policy=self.policy, progress=self._say,
                                 tokens=self.limits["tokens"], steps=self.limits["steps"])
                g, committed = r["guard"] or {}, r["committed"]
                self.last = (f"committed v{r['version']} (domain ppl {-g['domain_gain']:+.1%}, "
                             f"base {g['base_rise']:+.2%}) in {time.monotonic() - start:.0f} s"
                             if r["committed"] else f"not committed: {r['reason']}")
                self.verdict = self.judge()
            self.grown_for = length
        except backends.Interrupted:
            self.last = "interrupted by a keystroke; discarded"
        except Exception as e:  # the app stays up; the status line says what failed
            self.last, self.grown_for = f"failed: {e}", length
        finally:
            self.progress = "new suggestions"
            done(committed)  # new suggestions first (new weights), then "ready"
            self.busy = False

    def _say(self, line: str) -> None:
        self.progress = line

    def judge(self) -> str:
        seen = errormap.Store(self.rt.bundle.path).read()
        calibration = self.rt.bundle.manifest.get("calibration")
        if not calibration or self.domain not in seen["domains"]:
            return "not observed"
        k = self.rt.bundle.config["num_experts_per_tok"]
        return verdicts.judge(seen, calibration, k).get(self.domain, {}).get("verdict", "-")

    def stop(self) -> float | None:
        """Interrupt a running slice and wait for its thread; the milliseconds it took."""
        if self.thread is None or not self.thread.is_alive():
            return None
        start = time.monotonic()
        self.interrupt.set()
        self.thread.join()
        return (time.monotonic() - start) * 1e3

    def rollback(self) -> str:
        self.stop()
        try:
            self.rt.reload(versions.rollback(self.rt.bundle))
        except versions.VersionError as e:
            return f"rollback: {e}"
        return f"rolled back to v{self.version}"

    def forget(self) -> str:
        self.stop()
        errormap.Store(self.rt.bundle.path).forget()
        self.verdict, self.grown_for = "not observed", -1
        return "error map and observed text forgotten"

    @property
    def version(self) -> int:
        return self.rt.bundle.manifest["weights"]["version"]

    def status(self) -> str:
        b = compress.budget(self.rt.bundle)
        state = f"growing: {self.progress or 'observing'}" if self.growing else "ready"
        return (f" {self.domain} | verdict {self.verdict} | weights v{self.version} | "
                f"{b['used_bytes'] / 1e6:.1f} of {b['budget_bytes'] / 1e6:.1f} MB | "
                f"last slice: {self.last} | {state}")


class Keyboard:
    """The terminal: the document, the suggestion bar, the status line, the keys."""

    def __init__(self, learner: Learner, pause: float) -> None:
        self.learner, self.pause = learner, pause
        self.words: list[dict] = []
        self.note, self.last_key = "", time.monotonic()
        self.pending: asyncio.Task | None = None
        self.buffer = Buffer(multiline=True, on_text_changed=self._changed)
        keys = KeyBindings()
        keys.add("tab")(self._accept)
        keys.add("c-r")(lambda e: self._say(self.learner.rollback(), refresh=True))
        keys.add("c-f")(lambda e: self._say(self.learner.forget()))
        keys.add("c-q")(lambda e: e.app.exit())
        keys.add("c-c")(lambda e: e.app.exit())
        bar = Window(FormattedTextControl(self._bar), height=1, style="bold")
        status = Window(FormattedTextControl(lambda: self.learner.status()), height=1,
                        style="reverse")
        help_ = Window(FormattedTextControl(lambda: " Tab accept | Ctrl-R rollback | Ctrl-F "
                                            f"forget | Ctrl-Q quit {self.note}"), height=1)
        self.app = Application(layout=Layout(HSplit([
            Window(BufferControl(self.buffer), wrap_lines=True), bar, status, help_])),
            key_bindings=keys, full_screen=True)
        self.app.key_processor.before_key_press += self._key

    def _key(self, _event) -> None:
        """Every keystroke first stops a growth slice (the partial slice is discarded)."""
        self.last_key = time.monotonic()
        took = self.learner.stop()
        if took is not None:
            self.note = f"| slice interrupted in {took:.0f} ms"

    def _changed(self, buffer) -> None:  # text deleted: what is typed there is new again
        self.learner.observed = min(self.learner.observed, len(buffer.text))
        if self.pending is None or self.pending.done():
            self.pending = self.app.create_background_task(self._suggest())

    async def _suggest(self) -> None:
        await asyncio.sleep(0.01)  # a paste arrives as many keys: suggest once, after them
        self.words = self.learner.suggest(self.buffer.text)
        self.app.invalidate()

    def _bar(self) -> str:
        if not self.words:
            return " (no suggestions)"
        first, *rest = self.words
        return " Tab: " + "  ".join([f"[{first['word']}] {first['p']:.0%}"]
                                    + [f"{w['word']} {w['p']:.0%}" for w in rest])

    def _accept(self, _event) -> None:
        if not self.words:
            return
        w, text = self.words[0], self.buffer.text
        space = " " if w["new"] and text and not text[-1].isspace() else ""
        self.buffer.insert_text(space + w["word"] + " ")

    def _say(self, note: str, refresh: bool = False) -> None:
        self.note = f"| {note}"
        if refresh:
            self.words = self.learner.suggest(self.buffer.text)

    async def _idle(self) -> None:
        """Grow when the keys pause and the document changed since the last slice."""
        while True:
            await asyncio.sleep(0.1)
            text = self.buffer.text
            if (time.monotonic() - self.last_key >= self.pause and not self.learner.growing
                    and text.strip() and len(text) != self.learner.grown_for):
                self.learner.grow(text, self._grown)
                self.app.invalidate()

    def _grown(self, committed: bool) -> None:  # in the slice's thread
        if committed:  # new weights, new suggestions (an interrupted slice: the key's own)
            try:
                self.words = self.learner.suggest(self.buffer.text)
            except Exception:  # noqa: BLE001 (the text changed under it: the next key redoes it)
                pass
        self.app.invalidate()

    def run(self) -> None:
        async def main() -> None:
            self.app.create_background_task(self._idle())
            self.app.create_background_task(self._ticker())
            await self.app.run_async()
        asyncio.run(main())
        self.learner.stop()  # a slice in flight: discarded, its working copy removed

    async def _ticker(self) -> None:  # the status line follows the slice from its thread
        while True:
            await asyncio.sleep(0.25)
            self.app.invalidate()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", help="a bundle with growth programs (moegrow export --deepen)")
    p.add_argument("--backend", default="onnxruntime", choices=list(backends.ENGINES))
    p.add_argument("--domain", default="notes", help="the domain tag of this session's text")
    p.add_argument("--pause", type=float, default=2.0, help="seconds without a key before "
                   "growing")
    p.add_argument("--seconds", type=float, default=120, help="a slice's time limit")
    p.add_argument("--tokens", type=int, default=growth.Limits.tokens,
                   help="replay tokens a slice learns from")
    p.add_argument("--steps", type=int, default=growth.Limits.steps,
                   help="PC steps a slice takes at most")
    p.add_argument("--grow-when", choices=["charging", "always"], default="charging",
                   help="charging: grow only on mains power or without a battery (the "
                   "growth policy `Runtime.idle` asks before a slice and every step)")
    a = p.parse_args(argv)
    try:
        learner = Learner(a.bundle, a.backend, a.domain,
                          {"seconds": a.seconds, "tokens": a.tokens, "steps": a.steps},
                          on_mains if a.grow_when == "charging" else None)
    except (bundle_format.BundleError, backends.BackendError) as e:  # one line, exit 2
        print(f"keyboard: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    Keyboard(learner, a.pause).run()


if __name__ == "__main__":
    main()

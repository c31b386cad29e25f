"""`moegrow demo`: the whole loop on the embedded default model, offline, through an engine.

Export to a cached bundle (reused while the exporter and the model are unchanged), then on
a copy of it: suggestions for a few prompts of a kind of text the model never saw, `observe`
of a sample of such "user text" shipped with the package (`sample/`), the error map's
verdict and its picture, one `idle` slice, the same suggestions and the sample's held-out
perplexity after, the version log, and a rollback.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from moegrow import runtime
from moegrow.device_kernels import layout
from moegrow.runtime import bundle as bundle_format
from moegrow.runtime import errormap, verdicts, versions

from . import console

HERE = Path(__file__).parent
SAMPLE = HERE / "sample" / "devils-dictionary.txt"  # public domain: sample/README.md
SOURCE = "The Devil's Dictionary (Ambrose Bierce, 1911; public domain)"
DOMAIN = "bierce"
# the user types new entries in the sample's style: words the 1911 dictionary has not
PROMPTS = ["SMARTPHONE, n.", "PASSWORD, n.  A secret", "MEETING, n.  An assembly of people who",
           "SOFTWARE, n.  The part of a machine that"]
OBSERVE_CHARS = 60_000  # of the sample's training entries: ~23k tokens, a slice's 16,384
HELD_CHARS = BASE_CHARS = 20_000  # the held-out measures: a few seconds each
BITS = 8
CALIBRATION = "calibration.txt"  # a checkpoint's held-out base text (export/bundle.py's)


class DemoError(ValueError):
    """A target the demo cannot run on (no calibration text: no verdicts), or a --keep
    folder that exists."""


def sample() -> tuple[str, str]:
    """The shipped user text cut as the corpora are (an entry is held out iff sha256(entry)
    % 5 == 0): (the first `OBSERVE_CHARS` of the rest, the first `HELD_CHARS` held out)."""
    entries = SAMPLE.read_text(encoding="utf-8").strip().split("\n\n")
    held = [e for e in entries if int(hashlib.sha256(e.encode()).hexdigest(), 16) % 5 == 0]
    seen = [e for e in entries if e not in held]
    return _first("\n\n".join(seen), OBSERVE_CHARS), _first("\n\n".join(held), HELD_CHARS)


def _first(text: str, chars: int) -> str:
    """`text` up to the last entry end before `chars` characters."""
    return text if len(text) <= chars else text[:text.rindex("\n\n", 0, chars)]


def checkpoint_dir(target: str) -> Path:
    """TARGET's folder (`default`: the embedded model), without loading torch: a cached
    demo runs through the engine alone."""
    path = HERE.parent / "export" / "default_model" if target == "default" else Path(target)
    if not path.is_dir():
        raise DemoError(f"{target}: not a checkpoint folder (or `default`)")
    if not (path / CALIBRATION).is_file():
        raise DemoError(f"{target}: no {CALIBRATION} (held-out base text): the error map "
                        "would have no baseline and give no verdicts")
    return path


def key(target: str, backend: str) -> str:
    """What the cached bundle depends on: the exporter's and the device math's source, the
    checkpoint's files, the engine and the width."""
    h = hashlib.sha256(f"{backend}/{BITS}".encode())
    roots = [HERE.parent / "export", HERE.parent / "device_kernels"]
    files = sorted(f for r in roots for f in r.rglob("*.py")) + sorted(
        f for f in checkpoint_dir(target).iterdir() if f.is_file())
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def cached_bundle(target: str, backend: str, say: Callable[[str], None]) -> tuple[Path, bool]:
    """The demo's pristine bundle of `target` for `backend` in the cache (exported on the
    first run, with deepening programs and spare slots, int8) -> (its folder, exported now).
    Older caches of the demo are removed."""
    name = f"demo-{backend}-{key(target, backend)}"
    root = console.cache_dir()
    path = root / name
    if (path / bundle_format.MANIFEST).is_file():
        try:
            bundle_format.load(path)
            return path, False
        except bundle_format.BundleError:  # a damaged cache: export it again
            shutil.rmtree(path)
    for old in root.glob(f"demo-{backend}-*"):
        shutil.rmtree(old, ignore_errors=True)
    say(f"exporting {target} for {backend} at {BITS} bits to {path} (once; reused next time)")
    from moegrow.export import bundle as bundle_lib  # torch: only to export

    with console.Bars() as bars:
        bundle_lib.export(target, path, (backend,), progress=bars, bits=BITS, deepen=True)
    return path, True


def run(target: str = "default", backend: str = "onnxruntime", keep: Path | None = None,
        say: Callable[[str], None] = print) -> dict:
    """The whole loop (see the module); returns {"verdict", "before": {"ppl", "top3"},
    "after": {...}, "base_before": {"ppl"}, "base_after": {"ppl"}, "version"} and more.
    `keep`: leave the grown bundle there (must not exist) instead of a temporary folder."""
    start = time.monotonic()
    if keep is not None and Path(keep).exists():
        raise DemoError(f"{keep}: exists; --keep takes a new folder")
    pristine, exported = cached_bundle(target, backend, say)
    with tempfile.TemporaryDirectory(dir=console.cache_dir()) as tmp:
        work = Path(keep) if keep is not None else Path(tmp) / "bundle"
        shutil.copytree(pristine, work)
        result = _loop(work, backend, say) | {"bundle": str(work) if keep else None,
                                             "exported": exported}
    return result | {"seconds": time.monotonic() - start}


def _loop(work: Path, backend: str, say: Callable[[str], None]) -> dict:
    rt = runtime.open(work, backend)
    c = rt.bundle.config
    say(f"the bundle: {c['num_hidden_layers']} layers of {layout.dims(c)[0]} expert slots "
        f"(top-{c['num_experts_per_tok']}), int{rt.bundle.manifest['bits']}, on {backend}\n")
    seen, held = sample()
    ids = np.fromfile(work / rt.bundle.manifest["calibration"]["guard"]["file"], np.int32)
    base = _first(rt.sp.decode(ids[1:].tolist()), BASE_CHARS)

    say(f"1. Before. The user writes in a register the model never saw: {SOURCE}.")
    before = _measure(rt, held, base, say)
    say(f"\n2. The keyboard observes what the user types ({len(seen) / 1000:.0f} kB of the "
        f"sample, domain {DOMAIN!r}):")
    obs = rt.observe(seen, DOMAIN)
    say(f"   {obs['tokens']:,} tokens, perplexity {obs['ppl']:.1f} (the base text: "
        f"{before['base']['ppl']:.1f})")
    state = errormap.Store(work).read()
    v = verdicts.judge(state, rt.bundle.manifest["calibration"], c["num_experts_per_tok"])[DOMAIN]
    say(f"\n3. The error map's verdict: {v['verdict']} (learnable {v['learnable']:.0%}, "
        f"novelty {v['novelty']:.2f})")
    for line in picture(rt.bundle, errormap.Store(work).read(DOMAIN), v):
        say("   " + line)

    say("\n4. Idle time: one growth slice (PC updates run by the engine, then the guard)")
    with console.Bars() as bars:  # the PC steps as a bar on a terminal
        r = rt.idle(600, DOMAIN, progress=lambda m: bars(f"   {m}"))
    g = r["guard"] or {}
    say(f"   {r['steps']} steps on {r['tokens']:,} tokens in {r['seconds']:.0f} s; "
        + (f"the guard: the domain's held-out replay perplexity {-g['domain_gain']:+.1%}, the "
           f"base text's {g['base_rise']:+.2%}; " if g else "")
        + (f"committed as weights version {r['version']}" if r["committed"] else
           f"not committed: {r['reason']}"))
    rt.reload(bundle_format.load(work))

    say("\n5. After.")
    after = _measure(rt, held, base, say, before)

    say("\n6. The version log, and a rollback:")
    for x in versions.log(rt.bundle):
        say(f"   {'*' if x['current'] else ' '} v{x['version']} "
            f"{x['report'].get('what') or x['report'].get('domain')}")
    back = None
    if r["committed"]:
        rt.reload(versions.rollback(rt.bundle, 1))
        back = rt.score(held)
        say(f"   rolled back to v1: held-out perplexity {back['ppl']:.1f} again (`moegrow "
            f"rollback --to {r['version']}` would bring the grown one back)")
    return {"verdict": v["verdict"], "domain": DOMAIN, "source": SOURCE,
            "before": before["held"], "after": after["held"],
            "base_before": before["base"], "base_after": after["base"],
            "version": r["version"] if r["committed"] else 1,
            "suggestions": {"before": before["suggestions"], "after": after["suggestions"]},
            "observed": obs, "error_map": v, "slice": r,
            "rolled_back": None if back is None else {"version": 1, "ppl": back["ppl"]}}


def _measure(rt: runtime.Runtime, held: str, base: str, say, before: dict | None = None
             ) -> dict:
    out = {"suggestions": {}}
    say("   suggestions (next word, its first piece's probability):")
    for p in PROMPTS:
        words = rt.suggest(p, k=3)
        out["suggestions"][p] = [[w, q] for w, q in words]
        shown = "  ".join(f"[{w or '⏎'} {q:.0%}]" for w, q in words)
        say(f"     {p!r:44} -> {shown}")
    completion = "".join(rt.generate(PROMPTS[0], max_new=16))
    out["completion"] = completion
    say(f"   greedy completion: {PROMPTS[0]}{completion}".replace("\n", "⏎")[:110])
    s, b = rt.score(held), rt.score(base)
    out["held"] = {"ppl": s["ppl"], "top3": s["top3"], "top1": s["top1"], "tokens": s["tokens"]}
    out["base"] = {"ppl": b["ppl"], "tokens": b["tokens"]}
    if before is None:
        say(f"   held-out sample: perplexity {s['ppl']:.1f}, the next token among the top 3 "
            f"{s['top3']:.1%}; the base text: perplexity {b['ppl']:.2f}")
    else:
        h, o = before["held"], before["base"]
        say(f"   held-out sample: perplexity {h['ppl']:.1f} -> {s['ppl']:.1f} "
            f"({s['ppl'] / h['ppl'] - 1:+.1%}), top 3 {h['top3']:.1%} -> {s['top3']:.1%}; "
            f"the base text: {o['ppl']:.2f} -> {b['ppl']:.2f} ({b['ppl'] / o['ppl'] - 1:+.2%})")
    return out


SHADES = " ░▒▓█"


def picture(bundle: bundle_format.Bundle, state: dict, verdict: dict) -> list[str]:
    """The domain's error map as text: per layer and expert, the mean PC update size on the
    domain over the base text's (`calibration`), shaded; * marks experts the verdict names,
    · slots never chosen."""
    c = bundle.config
    layers, slots = c["num_hidden_layers"], layout.dims(c)[0]
    seen = errormap.summary(state, layers, slots)["layers"]
    base = bundle.manifest["calibration"]["layers"]
    named = {tuple(x) for x in verdict.get("experts", [])}
    ratio = np.zeros((layers, slots))
    for layer in range(layers):
        for e, x in enumerate(seen[layer]["experts"]):
            ref = base[layer]["experts"][e]["mean"]
            ratio[layer, e] = x["mean"] / ref if x["count"] and ref else np.nan
    top = np.nanmax(ratio) if np.isfinite(ratio).any() else 1.0
    lines = ["mean PC update on the user's text / on the base text, per expert slot:"]
    for layer in range(layers):
        cells = []
        for e in range(slots):
            x = ratio[layer, e]
            if np.isnan(x):
                cells.append("   ·  ")
                continue
            shade = SHADES[min(len(SHADES) - 1, int(x / top * (len(SHADES) - 1) + 0.5))]
            cells.append(f"{shade}{x:4.1f}{'*' if (layer, e) in named else ' '}")
        lines.append(f"layer {layer}: " + "".join(cells))
    return lines

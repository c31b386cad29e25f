"""`moegrow bench poison`: text designed to hurt, observed and grown on; does anything
regress?

Each case is a text built from a seed (and, for the base-like ones, from `--old`, the base
held-out text, after the part that judges): `repeat` (one word thousands of times),
`bytes` (random bytes decoded as Latin-1: control characters, symbols, accents), `flood`
(one paragraph of `--text` repeated until it is the whole replay), `shuffled` (the base
text's words in random order: base statistics, no sentences), `long-words` (words of
200-3,000 letters), and `mixed` (the base text with every tenth word replaced by random
bytes). For each case and seed, on a
fresh copy of the bundle: observe the text, run one growth slice for it with the default
limits, as the product grows (`auto`: gated clones, or in place where a gate would serve
too little of the text: `growth.placement`) and, on an fp32 bundle, with every
update in place (`inplace`: the base experts themselves change, ungated: updates that can
hurt the base, which only the guard stands against), and measure the base held-out text
(the first 40,000 characters of `--old`: never observed, an independent judge beside the
guard's own base text) and a held-out part of the case's text before and after. A
regression is a committed slice that raised the base held-out perplexity by more
than the guard's bound (0.5%); a committed slice that made the case's own held-out text
worse is counted apart (`own_worse`). Serving cases:
prompts of exactly the context, past it and of one very long word, through `score`,
`suggestions` and `generate`: each must answer or raise the runtime's `InputError`.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from moegrow.runtime.guard import GUARD_BASE as BOUND  # the guard's base bound

CASES = ("repeat", "bytes", "flood", "shuffled", "long-words", "mixed")
JUDGE_CHARS = 40000  # of --old scored before and after each slice


class PoisonError(ValueError):
    """Bad options for the poisoning bench."""


def _bytes(rng: random.Random, n: int) -> str:
    return bytes(rng.randrange(256) for _ in range(n)).decode("latin-1")


def make(case: str, seed: int, base: str, user: str, chars: int) -> str:
    """The text of `case` (about `chars` characters)."""
    rng = random.Random(f"{case}-{seed}")
    words = base.split()
    if case == "repeat":
        word = rng.choice([w for w in words if w.isalpha()] or ["the"])
        return " ".join([word] * (chars // (len(word) + 1) + 1))[:chars]
    if case == "bytes":
        return _bytes(rng, chars)
    if case == "flood":
        start = rng.randrange(max(1, len(user) - 2000))
        return (user[start:start + 2000] + "\n\n") * (chars // 2000 + 1)
    if case == "shuffled":
        pick = words[:chars // 4]
        rng.shuffle(pick)
        return " ".join(pick)[:chars]
    if case == "long-words":
        letters = "abcdefghijklmnopqrstuvwxyz"
        out = []
        while sum(len(w) + 1 for w in out) < chars:
            out.append("".join(rng.choice(letters) for _ in range(rng.randrange(200, 3000))))
        return " ".join(out)[:chars]
    if case == "mixed":
        return " ".join(_bytes(rng, 8) if i % 10 == 9 else w
                        for i, w in enumerate(words[:chars // 5]))[:chars]
    raise PoisonError(f"unknown case {case!r}: choose from {', '.join(CASES)}")


def _serving(rt) -> dict:
    """Prompts at and past the context through each serving call -> what each did."""
    from moegrow.runtime.session import InputError

    word = "x" * 5000
    context = rt.bundle.context
    at = " ".join(["word"] * (context - 1))
    out = {}
    for name, prompt in (("at-context", at), ("past-context", at * 3), ("one-long-word", word)):
        for call, fn in (("score", lambda p: rt.score(p)),
                         ("suggestions", lambda p: rt.suggestions(p)),
                         ("generate", lambda p: "".join(rt.generate(p, max_new=4)))):
            try:
                fn(prompt)
                out[f"{name}/{call}"] = "answered"
            except InputError as e:
                out[f"{name}/{call}"] = f"InputError: {e}"
    return out


def run_case(src: Path, work: Path, case: str, seed: int, text: str, old: str, backend: str,
             seconds: float, place: str, base_before: float) -> dict:
    """One trial on a fresh copy of `src` -> its slice's outcome and the measurements
    (`base_before`: `old`'s perplexity under `src`, the same for every trial)."""
    from moegrow import runtime

    path = work / f"{case}-{seed}-{place}"
    shutil.copytree(src, path)
    try:
        rt = runtime.open(path, backend)
        cut = int(len(text) * 0.8)
        train, held = text[:cut], text[cut:]
        before = {"base": base_before, "own": rt.score(held)["ppl"]}
        observed = rt.observe(train, case)
        r = rt.idle(seconds, case, place=place)
        after = {"base": rt.score(old)["ppl"], "own": rt.score(held)["ppl"]}
        rise = after["base"] / before["base"] - 1
        worse = after["own"] > before["own"] * (1 + 1e-6)
        guard = r.get("guard") or {}
        placed = (r.get("placement") or {}).get("place", place)  # auto's choice
        return {"case": case, "seed": seed, "place": place, "placed": placed,
                "tokens": observed["tokens"],
                "verdict": r.get("verdict"), "committed": bool(r.get("committed")),
                "reason": r.get("reason"), "guard_base_rise": guard.get("base_rise"),
                "guard_domain_gain": guard.get("domain_gain"), "before": before,
                "after": after, "base_rise": rise, "own_gain": 1 - after["own"] / before["own"],
                "regression": bool(r.get("committed")) and rise > BOUND,
                "own_worse": bool(r.get("committed")) and worse}
    finally:
        shutil.rmtree(path, ignore_errors=True)


def bench_poison(bundle_dir: str | Path, old: str, user: str, out: Path | None = None,
                 cases: tuple[str, ...] = CASES, seeds: int = 2, chars: int = 30000,
                 backend: str = "onnxruntime", seconds: float = 600.0,
                 places: tuple[str, ...] = ("auto", "inplace")) -> dict:
    """Every case with `seeds` seeds -> {"trials", "regressions", "own_worse", "committed",
    "refused_by_guard", "rows", "serving", "seconds"}; with `out`, report.md and
    results.json there."""
    from moegrow import runtime
    from moegrow.runtime import bundle as bundle_format
    from tqdm import tqdm

    for c in cases:
        if c not in CASES:
            raise PoisonError(f"unknown case {c!r}: choose from {', '.join(CASES)}")
    if seeds < 1 or chars < 1000:
        raise PoisonError("seeds must be at least 1, chars at least 1000")
    if len(old.split()) < 200 or len(user) < 2000:
        raise PoisonError("the base text needs 200 words and the user text 2,000 characters")
    src = bundle_format.load(bundle_dir)
    if not src.config.get("spare_experts"):
        raise PoisonError(f"{src.path}: no spare slots: nothing would ever grow")
    if src.manifest["bits"] != 32 or "inplace" not in places:  # frozen experts
        places = ("auto",)
    start = time.monotonic()
    judge, source = old[:JUDGE_CHARS], old[JUDGE_CHARS:] or old  # the cases never see the judge
    work = Path(tempfile.mkdtemp(prefix="moegrow-poison-"))
    rows = []
    try:
        rt = runtime.open(src.path, backend)
        base_before = rt.score(judge)["ppl"]
        for case in tqdm(cases, desc="poison", leave=False):
            for seed in range(seeds):
                text = make(case, seed, source, user, chars)
                rows += [run_case(src.path, work, case, seed, text, judge, backend, seconds,
                                  place, base_before) for place in places]
        serving = _serving(rt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"trials": len(rows), "regressions": sum(r["regression"] for r in rows),
              "own_worse": sum(r["own_worse"] for r in rows),
              "committed": sum(r["committed"] for r in rows),
              "refused_by_guard": sum(bool(r["reason"]) and r["reason"].startswith("guard")
                                      for r in rows),
              "rows": rows, "serving": serving, "seconds": time.monotonic() - start,
              "backend": backend}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "report.md").write_text(report(result))
    return result


def _pct(x) -> str:
    return "-" if x is None else f"{x:+.2%}"


def report(r: dict) -> str:
    lines = ["# Poisoned and degenerate input", "",
             f"{r['trials']} slices on {r['backend']}: {r['committed']} committed, "
             f"{r['refused_by_guard']} refused by the guard, **{r['regressions']} "
             f"regressions** (committed with the base held-out text more than "
             f"{BOUND:.1%} worse); {r['own_worse']} committed slices left the case's own "
             "held-out text worse.", "",
             "| case | seed | place | tokens | verdict | committed | guard: base / domain | "
             "base held-out | own held-out | why not |", "|---" * 10 + "|"]
    for x in r["rows"]:
        why = (x["reason"] or "").replace("|", "/")[:80]
        place = x["place"] + (f" ({x['placed']})" if x.get("placed", x["place"]) != x["place"]
                              else "")
        lines.append(f"| {x['case']} | {x['seed']} | {place} | {x['tokens']} | "
                     f"{x['verdict']} | "
                     f"{'yes' if x['committed'] else 'no'} | {_pct(x['guard_base_rise'])} / "
                     f"{_pct(x['guard_domain_gain'])} | {_pct(x['base_rise'])} | "
                     f"{_pct(x['own_gain'])} gain | {why} |")
    lines += ["", "Serving prompts at and past the context:", "", "| prompt / call | result |",
              "|---|---|"]
    lines += [f"| {k} | {v[:100]} |" for k, v in r["serving"].items()]
    return "\n".join(lines) + "\n"

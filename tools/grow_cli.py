"""The growth commands: `moegrow idle` (a growth slice), `versions` and `rollback` (the
weights versions), `compress` (converged clones moved into the quantized pool,
`runtime/compress.py`) and `budget` (a bundle's expert bytes); registered on the CLI by
`tools/cli.py`."""

from __future__ import annotations

import json

import click
from moegrow import runtime
from moegrow.runtime import backends, growth, plan, versions
from moegrow.runtime import bundle as bundle_format
from moegrow.runtime import compress as compress_lib

from . import console
from .cli import emit


@click.command()
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option("--json", "as_json", is_flag=True, help="Print the accounting as JSON.")
def budget(bundle_dir: str, as_json: bool) -> None:
    """BUNDLE's expert bytes: per pool (base experts, fp32 spare slots for growth, the
    quantized pool) the bit width, slots used and bytes; what is free, and what compressing
    every fp32 clone into a free pool slot would reclaim, and the bytes the budget keeps
    for a growth slice's learning state (the changed experts' fp32 weights, gradients and
    Adam moments). Expert bytes are those of the weight files' expert tensors (codes and
    fp32 scales for quantized ones)."""
    r = compress_lib.budget(bundle_format.load(bundle_dir))
    lines = [f"{'pool':6} {'bits':>4} {'slots':>9} {'MB':>8}"]
    for name, p in r["pools"].items():
        lines.append(f"{name:6} {p['bits']:>4} {p['used']:>4}/{p['slots']:<4} "
                     f"{p['used_bytes'] / 1e6:>8.3f} of {p['bytes'] / 1e6:.3f}")
    lines.append(f"used {r['used_bytes'] / 1e6:.3f} MB, free {r['free_bytes'] / 1e6:.3f} MB "
                 f"of the expert slots; reclaimable by compress "
                 f"{r['reclaimable_bytes'] / 1e6:.3f} MB")
    if r["learning_bytes"] is not None:
        lines.append(f"learning state of a slice: up to {r['learning_bytes'] / 1e6:.3f} MB "
                     f"({r['learning_experts']} experts' weights, gradients and Adam moments)")
    lines.append(f"budget {r['budget_bytes'] / 1e6:.3f} MB")
    lines += [f"  L{e['layer']} e{e['slot']}: {e['domain']} int{e['bits']} "
              f"{e['bytes'] / 1e6:.3f} MB" for e in r["experts"] if e["kind"] == "spawned"]
    emit(r, as_json, "\n".join(lines))


@click.command()
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option("--domain", default=None, help="The domain whose clones to compress (default: "
              "the first, by name, that has fp32 clones).")
@click.option("--backend", type=click.Choice(list(backends.ENGINES)), default="onnxruntime",
              show_default=True, help="The engine that runs the guard; the commit serves both.")
@click.option("--json", "as_json", is_flag=True, help="Print what it did as JSON.")
def compress(bundle_dir: str, domain: str | None, backend: str, as_json: bool) -> None:
    """Move one domain's clones from BUNDLE's fp32 spare slots into its quantized pool
    (export with --pool N): quantized on the device, their router rows and gates moved,
    their spare slots freed for the next spawn. The widths: each clone is measured alone at
    every free width on the domain's held-out replay, and the plan that reclaims the most
    bytes within a 1% predicted rise is tried first (a clone too costly to quantize stays
    fp32); then one width for all, the narrowest free first. Committed as a new weights
    version only if the domain's held-out perplexity rises by at most 1% and the base
    text's by at most 0.5%."""
    rt = runtime.open(bundle_dir, backend)
    r = compress_lib.compress(rt, domain, progress=lambda m: click.echo(m, err=True))
    g = r["guard"] or {}
    moves = ", ".join(f"L{m['layer']} e{m['from']}->e{m['to']} int{m['bits']}"
                      for m in r["moves"])
    text = (f"{r['domain']}: {moves or 'nothing to move'}"
            + (f"; domain ppl {g['domain_rise']:+.2%}, base ppl {g['base_rise']:+.2%}"
               if g else "")
            + (f"; reclaimed {r['reclaimed_bytes'] / 1e6:.3f} MB, committed version "
               f"{r['version']}" if r["committed"] else f"; not committed: {r['reason']}"))
    emit(r, as_json, text)


@click.command()
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=600,
              show_default=True, help="Time limit of the slice.")
@click.option("--domain", default=None,
              help="Grow for this observed domain (default: of those not judged `nothing`, "
                   "the one with the most to win: the learnability probe's saved NLL over all "
                   "its observed tokens).")
@click.option("--tokens", type=click.IntRange(min=1), default=growth.Limits.tokens,
              show_default=True, help="Replay tokens of the domain to learn from.")
@click.option("--steps", type=click.IntRange(min=1), default=growth.Limits.steps,
              show_default=True, help="At most this many PC update steps (a window each).")
@click.option("--passes", type=click.IntRange(min=1), default=growth.Limits.passes,
              show_default=True, help="Passes over the replay tokens (a step: one window, "
              f"Adam's lr {plan.SCHEDULE['clones'][0]:g} for clones, "
              f"{plan.SCHEDULE['inplace'][0]:g} for an fp32 bundle's experts deepened in "
              "place).")
@click.option("--strict", is_flag=True, help="The strict PC schedule (bundles exported with "
              "--strict-steps).")
@click.option("--backend", type=click.Choice(list(backends.ENGINES)), default="onnxruntime",
              show_default=True, help="The engine that runs the PC programs (ONNX Runtime's "
              "sweeps are 2-4x faster than ExecuTorch's here); the commit serves both.")
@click.option("--place", type=click.Choice(["auto", "clones", "inplace"]),
              default=growth.Limits.place, show_default=True,
              help="clones: clone the named experts behind the domain's gate (in place only "
              "once a layer has no free slot); inplace: deepen the named experts and every "
              "layer's busiest themselves, no gate, for all text (int4 bundles, whose experts "
              "are frozen: clones open for all text take their place); auto: in place where "
              "a gate would open on under 2/3 of the domain's newest replay (text in the "
              "base's own register, which a gate cannot tell from it: docs/growth.md, "
              "placement), else clones.")
@click.option("--json", "as_json", is_flag=True, help="Print what the slice did as JSON.")
def idle(bundle_dir: str, seconds: float, domain: str | None, tokens: int, steps: int,
         passes: int, strict: bool, backend: str, place: str, as_json: bool) -> None:
    """One idle slice of growth on BUNDLE: from the error map's verdict, clone the named
    experts into spare slots behind the domain's gate (an expert the base never chose
    deepens in place once its layer has no free slot; text a gate cannot tell from the
    base's deepens the named experts in place: --place), run bounded PC steps
    on the domain's replay text (in place, with some of every other grown domain's), and
    commit a new weights version only if the guard passes (held-out domain text improves,
    base text, and in place every other grown domain's, does not worsen by more than
    0.5%)."""
    rt = runtime.open(bundle_dir, backend)
    with console.Bars() as bars:  # the plan, then the PC steps as a bar on a terminal
        r = rt.idle(seconds, domain, progress=bars, tokens=tokens, steps=steps, passes=passes,
                    strict=strict, place=place)
    what = ", ".join(f"{s['how']} L{s['layer']} e{s['parent']}"
                     + (f"->e{s['slot']}" if s["how"] == "spawn" else "")
                     + (" (open to all text)" if s.get("open") else "") for s in r["plan"])
    guard = r["guard"] or {}
    placed = r.get("placement") or {}
    text = (f"{r['domain']}: {r['verdict'] or 'nothing'}; {what or 'no change planned'}"
            + (f" (its gate would open on {placed['reach']:.0%} of its newest replay)"
               if placed else "") + f"; {r['steps']} steps on {r['tokens']} tokens"
            + (f" ({r['rehearsed']} windows of other grown domains' replay among them)"
               if r.get("rehearsed") else "")
            + (f"; domain ppl {-guard['domain_gain']:+.2%}, base ppl "
               f"{guard['base_rise']:+.2%}" if guard else "")
            + (f"; committed version {r['version']}" if r["committed"] else
               f"; not committed: {r['reason']}")
            + "".join(f"; L{lay} e{e} deferred (the budget's learning state is full)"
                      for lay, e in r.get("deferred", [])))
    for c in reversed(r.get("reclaimed", [])):  # no free slot: other domains' clones
        # compressed first, then experts that stopped earning retired
        if c.get("what") == "retire":
            line = (f"{c['domain']}: retired L{c['layer']} e{c['slot']}, reclaimed "
                    f"{c['reclaimed_bytes'] / 1e6:.2f} MB" if c["committed"] else
                    f"{c['domain']}: L{c['layer']} e{c['slot']} not retired: {c['reason']}")
        else:
            line = (f"{c['domain']}: compressed {len(c['moves'])} clones, reclaimed "
                    f"{c['reclaimed_bytes'] / 1e6:.2f} MB" if c["committed"] else
                    f"{c['domain']}: not compressed: {c['reason']}")
        text = line + "\n" + text
    emit(r, as_json, text)


@click.command("versions")
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option("--json", "as_json", is_flag=True, help="Print the log as JSON.")
def versions_(bundle_dir: str, as_json: bool) -> None:
    """BUNDLE's weights versions, oldest first; * marks the current one."""
    log = versions.log(bundle_format.load(bundle_dir))
    lines = [f"{'*' if v['current'] else ' '} v{v['version']}  "
             f"{_describe(v['report'])}{'' if v['files_present'] else '  (files missing)'}"
             for v in log]
    emit({"versions": log}, as_json, "\n".join(lines))


def _describe(report: dict) -> str:
    if report.get("what") == "export":
        return "export"
    if report.get("what") == "compress":
        return f"{report.get('domain')}: compress " + ", ".join(
            f"L{m['layer']} e{m['from']}->e{m['to']} int{m['bits']}" for m in report["moves"])
    if report.get("what") == "retire":
        return f"{report.get('domain')}: retire L{report['layer']} e{report['slot']}"
    if "plan" not in report:  # a change made through the library (`Runtime.set_experts`)
        return report.get("what") or json.dumps(report)[:80]
    steps = ", ".join(f"{s['how']} L{s['layer']} e{s['parent']}" for s in report["plan"])
    return f"{report.get('domain')}: {steps}"


@click.command()
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option("--to", "to", type=int, default=None,
              help="The version to make current (default: the one before the current).")
def rollback(bundle_dir: str, to: int | None) -> None:
    """Make an earlier weights version of BUNDLE current again (its files are verified
    first; later versions stay in the log and can be rolled forward to with --to)."""
    b = versions.rollback(bundle_format.load(bundle_dir), to)
    click.echo(f"{bundle_dir}: version {b.manifest['weights']['version']} is current")

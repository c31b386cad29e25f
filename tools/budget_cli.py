"""`moegrow budget` and `moegrow compress`: a bundle's expert bytes, and converged clones
moved into its quantized pool (`runtime/compress.py`); registered on the CLI by
`tools/cli.py`."""

from __future__ import annotations

import click
from moegrow import runtime
from moegrow.runtime import backends
from moegrow.runtime import bundle as bundle_format
from moegrow.runtime import compress as compress_lib

from .cli import emit


@click.command()
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option("--json", "as_json", is_flag=True, help="Print the accounting as JSON.")
def budget(bundle_dir: str, as_json: bool) -> None:
    """BUNDLE's expert bytes: per pool (base experts, fp32 spare slots for growth, the
    quantized pool) the bit width, slots used and bytes; what is free, and what compressing
    every fp32 clone into a free pool slot would reclaim. Bytes are those of the weight
    files' expert tensors (codes and fp32 scales for quantized ones)."""
    r = compress_lib.budget(bundle_format.load(bundle_dir))
    lines = [f"{'pool':6} {'bits':>4} {'slots':>9} {'MB':>8}"]
    for name, p in r["pools"].items():
        lines.append(f"{name:6} {p['bits']:>4} {p['used']:>4}/{p['slots']:<4} "
                     f"{p['used_bytes'] / 1e6:>8.3f} of {p['bytes'] / 1e6:.3f}")
    lines.append(f"used {r['used_bytes'] / 1e6:.3f} MB, free {r['free_bytes'] / 1e6:.3f} MB "
                 f"(budget {r['budget_bytes'] / 1e6:.3f} MB); reclaimable by compress "
                 f"{r['reclaimable_bytes'] / 1e6:.3f} MB")
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
    (export with --pool N): quantized on the device to the narrowest free width, their
    router rows and gates moved, their spare slots freed for the next spawn. Committed as a
    new weights version only if the domain's held-out perplexity rises by at most 1% and
    the base text's by at most 0.5%; where it does not, the next wider width is tried."""
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

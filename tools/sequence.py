"""`moegrow bench sequence`: one model learns several domains one after another; after each
stage every domain seen so far and the base are scored (a forgetting matrix).

The parent tokenizes once, as `bench adapt` does (`tools/adapt.py`): per domain the first N
ids of [BOS] + encode(train) and the first EVAL_CAP predicted tokens of its held-out text,
and the base's held-out text (--old) likewise. Each method runs every stage in its own
process (`tools/child.py`: `python -m moegrow.tools.sequence WORKDIR`, pc's `python -m
moegrow.tools.adapt_pc WORKDIR`, the device runtime without torch; job.json, train-K.npy,
heldout-K.npy and old.npy in, result.json out), so its peak RSS is its own.

Methods (the torch ones fp32, one window per AdamW step, `passes` passes per domain):
pc        a copy of --bundle grows on each domain in turn: observe its training tokens under
          the domain's name, then one idle slice for that domain (`adapt_pc.sequence`, the pc of
          bench adapt: verdict, clones behind the domain gate, guard, commit). Its stages
          also record the slice: committed, reason, verdict, version, plan, skipped (named
          experts with no free slot left), reclaimed (other domains' clones compressed
          first), reach (per layer, the share of the domain's and the base's held-out
          replay reaching a changed expert); a stage that cannot grow is recorded and the
          sequence goes on.
lora      one LoRA adapter (bench adapt's: PEFT, rank 8) trained on each domain in turn, a
          fresh AdamW per stage.
lora-tag  a fresh adapter per domain, switched by a domain tag: each domain is scored with its
          own adapter and the base text with none, so it forgets nothing by construction (and
          needs every text tagged by the user or the app).
full      full fine-tuning on each domain in turn.

stages[0] scores every domain and the base before any training; stages[s] (after the s-th
domain) the domains 1..s and the base. Per method (fractions):
gain[d]             1 - ppl(d after its own stage) / ppl(d before)
max_forget_earlier  max over stages s and domains d learned before s of
                    ppl(d after s) / ppl(d after its own stage) - 1 (None with one domain)
max_forget_base     max over stages of ppl(base after s) / ppl(base before) - 1
min_gain_vs_lora    min over domains of gain / lora's gain (None without lora or where lora
                    gained nothing)
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
from moegrow.export import checkpoint
from moegrow.tools import adapt, child
from moegrow.tools.adapt import EVAL_CAP, AdaptError, Progress

METHODS = ("pc", "lora", "lora-tag", "full")


def parse_domain(spec: str) -> tuple[str, Path, Path]:
    """'NAME=TRAIN_FILE,HELDOUT_FILE' -> (name, train, heldout)."""
    name, _, files = spec.partition("=")
    paths = files.split(",")
    if not name.strip() or len(paths) != 2 or not all(p.strip() for p in paths):
        raise AdaptError(f"--domain {spec!r}: expected NAME=TRAIN_FILE,HELDOUT_FILE")
    return name.strip(), Path(paths[0].strip()), Path(paths[1].strip())


def run_torch(job: dict, data: dict, say: Progress) -> dict:
    method, names, passes = job["method"], job["domains"], job["passes"]
    model = checkpoint.load(job["base"])
    stages = [{"after": None, "ppl": {n: adapt.perplexity(model, h)
                                      for n, h in zip(names, data["heldout"], strict=True)},
               "base": adapt.perplexity(model, data["old"])}]
    adapter = adapt.add_lora(model) if method == "lora" else None
    for i, name in enumerate(names):
        say(f"stage {i + 1}/{len(names)}: {name}")
        if method == "lora-tag":  # this domain's own adapter on a fresh base
            model = checkpoint.load(job["base"])
            r = adapt.train(model, "lora", data["train"][i], passes, progress=say)
            ppl = {**stages[-1]["ppl"], name: adapt.perplexity(model, data["heldout"][i])}
            ppl = {n: ppl[n] for n in names[:i + 1]}  # earlier: their adapters, unchanged
            base = stages[0]["base"]  # base text: no adapter
        else:
            r = adapt.train(model, "lora" if adapter else "full", data["train"][i], passes,
                            progress=say, params=adapter)
            ppl = {n: adapt.perplexity(model, data["heldout"][j])
                   for j, n in enumerate(names[:i + 1])}
            base = adapt.perplexity(model, data["old"])
        stages.append({"after": name, "wall_s": r["wall_s"], "ppl": ppl, "base": base,
                       "accounted_bytes": r["accounted_bytes"]})
    return {"stages": stages}


def stages(job: dict, workdir: Path, say: Progress) -> dict:
    """Every stage of one torch method (`child.child`'s work; see the module docstring)."""
    adapt.setup(job)
    k = range(len(job["domains"]))
    data = {"train": [np.load(workdir / f"train-{i}.npy") for i in k],
            "heldout": [np.load(workdir / f"heldout-{i}.npy") for i in k],
            "old": np.load(workdir / "old.npy")}
    return run_torch(job, data, say)


def summarize(r: dict, names: list[str], lora: dict | None) -> dict:
    """Add gain per domain, max_forget_earlier, max_forget_base, min_gain_vs_lora and the
    total wall time to a child's stages."""
    if "error" in r:
        return r
    st = r["stages"]
    gain = {n: 1 - st[i + 1]["ppl"][n] / st[0]["ppl"][n] for i, n in enumerate(names)}
    earlier = [st[s]["ppl"][n] / st[i + 1]["ppl"][n] - 1
               for i, n in enumerate(names) for s in range(i + 2, len(st))]
    vs = None
    if lora and "error" not in lora:
        ratios = [gain[n] / lora["gain"][n] for n in names if lora["gain"][n] > 0]
        vs = min(ratios) if ratios else None
    return {**r, "gain": gain, "max_forget_earlier": max(earlier) if earlier else None,
            "max_forget_base": max(s["base"] / st[0]["base"] - 1 for s in st[1:]),
            "min_gain_vs_lora": vs, "wall_s": sum(s["wall_s"] for s in st[1:])}


def bench_sequence(base: str, domains: list[tuple[str, Path, Path]], old: Path, out: Path,
                   methods: list[str], tokens: int, passes: int = 2, seed: int = 0,
                   threads: int = 1, bundle: Path | None = None,
                   progress: Progress | None = None) -> dict:
    """Every method learns the domains in the order given, each method in its own process;
    write results.json, report.md and matrix.png into `out`."""
    say = progress or (lambda m: None)
    methods = adapt.check_methods(methods, METHODS)
    names = [n for n, _, _ in domains]
    if not names:
        raise AdaptError("give at least one --domain NAME=TRAIN_FILE,HELDOUT_FILE")
    if len(set(names)) < len(names):
        raise AdaptError(f"domain names must differ (got {', '.join(names)})")
    if tokens < 2 or passes < 1:
        raise AdaptError(f"need --tokens >= 2 and --passes >= 1 (got {tokens}, {passes})")
    if "pc" in methods and (bundle is None or not (Path(bundle) / "manifest.json").is_file()):
        raise AdaptError("pc runs on a bundle: give --bundle, an fp32 export of --base"
                         + (f"; {bundle} is not one" if bundle is not None else ""))
    texts = [(adapt.read(t), adapt.read(h)) for _, t, h in domains]
    old_text = adapt.read(old)
    model = checkpoint.load(base)  # a bad checkpoint fails here, before any child starts
    tok = checkpoint.load_tokenizer(base, model.args.vocab_size)
    context = model.args.max_position_embeddings
    del model
    train = [adapt.encode(tok, t, tokens) for t, _ in texts]
    for (name, path, _), ids in zip(domains, train, strict=True):
        if len(ids) < tokens:
            raise AdaptError(f"{name}: {path}: {len(ids)} tokens, fewer than --tokens {tokens}")
    heldout = [adapt.encode(tok, h, EVAL_CAP + 1) for _, h in texts]
    old_ids = adapt.encode(tok, old_text, EVAL_CAP + 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory(dir=out, prefix=".work-") as tmp:
        for m in methods:
            workdir = Path(tmp) / m
            workdir.mkdir()
            for i in range(len(names)):
                np.save(workdir / f"train-{i}.npy", train[i])
                np.save(workdir / f"heldout-{i}.npy", heldout[i])
            np.save(workdir / "old.npy", old_ids)
            job = {"method": m, "base": str(base), "domains": names, "passes": passes,
                   "seed": seed, "threads": threads, "bundle": bundle and str(bundle)}
            (workdir / "job.json").write_text(json.dumps(job))
            say(f"{m}: {len(names)} domains x {tokens} tokens x {passes} passes")
            results[m] = child.spawn(workdir, say, "moegrow.tools.adapt_pc" if m == "pc"
                                     else "moegrow.tools.sequence")
    lora = summarize(results["lora"], names, None) if "lora" in results else None
    argv = [*(f"--domain={n}={t},{h}" for n, t, h in domains),
            *(f"--{k}={v}" for k, v in {"base": base, "old": old, "methods": ",".join(methods),
                                        "tokens": tokens, "passes": passes, "seed": seed,
                                        "threads": threads, "bundle": bundle,
                                        "out": out}.items() if v is not None)]
    result = {"methods": {m: summarize(r, names, lora) for m, r in results.items()},
              "domains": names, "tokens": tokens, "passes": passes, "base": str(base),
              "context": context, "seed": seed, "threads": threads,
              "bundle": bundle and str(bundle),
              "eval_tokens": {**{n: len(h) - 1 for n, h in zip(names, heldout, strict=True)},
                              "base": len(old_ids) - 1},
              "command": shlex.join(["moegrow", "bench", "sequence", *argv])}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "report.md").write_text(report(result))
    plot(result, out)
    return result


def report(r: dict) -> str:
    names = r["domains"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:+.1%}"
    lines = [f"# moegrow bench sequence: {r['base']}", "", f"    {r['command']}", "",
             f"Domains in order: {', '.join(names)}; {r['tokens']} training tokens each x "
             f"{r['passes']} passes, {r['threads']} thread(s), seed {r['seed']}. Perplexity on "
             f"the first {EVAL_CAP} tokens of each held-out text at most. Forgetting of an "
             "earlier domain: against its perplexity right after its own stage; of the base: "
             "against before any stage.", "",
             "| method | " + " | ".join(f"gain {n}" for n in names) + " | max forget earlier "
             "| max forget base | min gain vs LoRA | wall s | peak RSS MB |",
             "|---" * (len(names) + 6) + "|"]
    for m, x in r["methods"].items():
        if "error" in x:
            lines.append(f"| {m} | failed: {x['error']} |" + " |" * (len(names) + 4))
            continue
        vs = "-" if x["min_gain_vs_lora"] is None else f"{x['min_gain_vs_lora']:.2f}x"
        lines.append(f"| {m} | " + " | ".join(pct(x["gain"][n]) for n in names)
                     + f" | {pct(x['max_forget_earlier'])} | {pct(x['max_forget_base'])} | "
                     f"{vs} | {x['wall_s']:.1f} | {x['peak_rss_mb']:.0f} |")
    for m, x in r["methods"].items():  # the matrix: rows stages, columns domains and base
        if "error" in x:
            continue
        lines += ["", f"{m}: perplexity after each stage", "",
                  "| after | " + " | ".join(names) + " | base |", "|---" * (len(names) + 2) + "|"]
        for s in x["stages"]:
            cells = [f"{s['ppl'][n]:.2f}" if n in s["ppl"] else "" for n in names]
            note = (f" ({'committed' if s['committed'] else 'not committed'}: "
                    f"{', '.join(s['plan']) or s['reason']})" if "committed" in s else "")
            lines.append(f"| {s['after'] or 'before'}{note} | " + " | ".join(cells)
                         + f" | {s['base']:.2f} |")
    lines += ["", "![forgetting matrix](matrix.png)"]
    return "\n".join(lines) + "\n"


def plot(r: dict, out: Path) -> None:
    """matrix.png: per method, each domain's and the base's perplexity relative to before,
    after each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {m: x for m, x in r["methods"].items() if "error" not in x}
    names = r["domains"]
    fig, axes = plt.subplots(1, max(1, len(done)), figsize=(4 * max(1, len(done)), 3.6),
                             sharey=True, squeeze=False)
    ticks = ["before", *names]
    for ax, (m, x) in zip(axes[0], done.items(), strict=False):
        st = x["stages"]
        for i, n in enumerate(names):
            at = [0, *range(i + 1, len(st))]
            ax.plot(at, [st[s]["ppl"][n] / st[0]["ppl"][n] for s in at], marker="o", label=n)
        ax.plot(range(len(st)), [s["base"] / st[0]["base"] for s in st], "k--", marker="s",
                label="base")
        ax.axhline(1, color="k", linewidth=0.5)
        ax.set_yscale("log")
        ax.set_xticks(range(len(ticks)), ticks, rotation=30)
        ax.set(title=m, xlabel="after stage")
    axes[0][0].set_ylabel("perplexity / before (log)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "matrix.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(child.child(Path(sys.argv[1]), stages))

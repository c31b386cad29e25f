"""`moegrow bench adapt`: what each method gains on a user's domain, what it forgets, and
what it costs (time, memory, FLOPs), on the same tokens, in one run.

The parent (`bench_adapt`) tokenizes once: the first N ids of [BOS] + encode(train), and of
each held-out text the first EVAL_CAP predicted tokens. Each method runs in its own process
(`tools/child.py`), `python -m moegrow.tools.adapt WORKDIR` for the torch methods and
`python -m moegrow.tools.adapt_pc WORKDIR` for the PC ones (the device runtime, no torch), so
its peak RSS (`backends.peak_rss_mb`) is its own. WORKDIR holds job.json ({"method", "base",
"passes", "seed", "threads", "locus", "bundle"}), train.npy and the eval ids heldout.npy, old.npy
(other.npy with --other; `child.eval_ids` reads them); the child writes result.json, and
its stderr lines reach the parent's `progress`.

Child contract: `run_torch` and `adapt_pc.run` (the PC methods, `tools/adapt_pc.py`)
return {"ppl": {"heldout": [before, after], "old": [b, a], "other": [b, a] or None},
"curve": [[tokens_seen, heldout_ppl], ...] (start, CURVE_POINTS inside, end), "wall_s"
(adaptation alone: no evaluation, no locus choice), "accounted_bytes" (held for learning),
"flops" (analytic, below; the parent's for the PC methods, `pc_flops`)}, plus any keys of
their own. Perplexity is per token over the runtime's half-overlapping windows of the
context (`session.windows`). The child adds peak_rss_mb and torch_loaded; the parent adds
gain = 1 - after/before (held-out), forget_base/forget_other = after/before - 1 (None
without --other) and wall_ratio_vs_lora (None without lora). A method that raises gets
{"error": message} and the run goes on.

Torch methods (fp32): the N ids cut into consecutive windows of W + 1 (context W; inputs and
shifted targets), one window per AdamW step (weight decay 0), in order, `passes` times;
cross-entropy, grad norm clipped to 1. accounted_bytes = trainable parameters + grads + AdamW
state, measured. full: all parameters, lr 1e-4. lora: PEFT's LoRA, rank 8, alpha 16 on
q/k/v/o and every expert's gate/up/down (per-expert A, B; B zero), base frozen, lr 1e-3.
locus-bp: only the experts {layer: [ids]} (own parameters while training, written back in
place), lr 1e-4; default locus: per layer the 2 experts the router picks most on the
training tokens.

FLOPs per trained token (multiply-add = 2), times N - 1 targets times passes. P: weights a
token meets (q/k/v/o, router, its top-k experts, head; the embedding lookup is free); S = 2WHD
per layer for attention scores (mean causal context W/2); forward F = 2P + S.
full: 3F (backward = input grads + weight grads, each ~F). lora: 2F (forward and input
grads; no base weight grads) + 3 * 2r(in + out) per adapted matrix a token meets. locus-bp:
F + input grads of the head and of the layers above the lowest locus layer l0 (2P_l + S_l)
+ share_e * 6CF weight grads per locus expert e (+ 2CF into its hidden if in l0), share_e =
tokens routed to e / tokens.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from moegrow.export import checkpoint
from moegrow.export.models import layers
from moegrow.export.tokenizer import BOS, TextError
from moegrow.runtime.session import windows
from moegrow.tools.child import Progress, child, eval_ids, spawn
from torch import nn

METHODS = ("pc", "pc-strict", "pc-inplace", "locus-bp", "lora", "full")
PC_METHODS = ("pc", "pc-strict", "pc-inplace")
EVAL_CAP = 20_000  # predicted tokens scored per held-out text, the same for every method
CURVE_POINTS = 4  # held-out evaluations inside training, besides start and end
LR = {"full": 1e-4, "lora": 1e-3, "locus-bp": 1e-4}
RANK, ALPHA = 8, 16
LOCUS_TOP = 2


class AdaptError(ValueError):
    """Bad arguments for the adaptation benchmark (methods, locus, too little text)."""


def check_methods(names: list[str], choices: tuple[str, ...] = METHODS) -> list[str]:
    """The methods in order, once each; an unknown name (or none) is an AdaptError."""
    names = [m.strip() for m in names if m.strip()]
    unknown = [m for m in names if m not in choices] or ([] if names else [""])
    if unknown:
        raise AdaptError(f"unknown method {unknown[0]!r} (choose from {', '.join(choices)})")
    return list(dict.fromkeys(names))


def parse_locus(spec: str, layers_n: int, experts_n: int) -> dict[int, list[int]]:
    """'0:1,3;2:5' -> {0: [1, 3], 2: [5]}, checked against the model's size."""
    locus = {}
    try:
        for part in filter(str.strip, spec.split(";")):
            layer, ids = part.split(":")
            locus[int(layer)] = sorted({int(e) for e in ids.split(",")})
    except ValueError:
        raise AdaptError(f"locus {spec!r}: expected LAYER:E,E;LAYER:E (e.g. 0:1,3;2:5)") from None
    bad = [f"{x}:{e}" for x, ids in locus.items() for e in ids
           if not (0 <= x < layers_n and 0 <= e < experts_n)]
    if bad or not locus:
        raise AdaptError(f"locus {spec!r}: {bad[0] if bad else 'empty'} is not an expert of "
                         f"a {layers_n}-layer model with {experts_n} experts per layer")
    return locus


def encode(tok, text: str, limit: int) -> np.ndarray:
    """The first `limit` ids of [BOS] + encode(text). Of a long text only the first 16
    characters per id are encoded, and the whole text if that gives too few ids."""
    ids = tok.encode(text[:limit * 16])
    if len(ids) < limit and len(text) > limit * 16:
        ids = tok.encode(text)
    return np.array([BOS] + ids[:limit - 1], np.int64)


@torch.no_grad()
def perplexity(model: layers.CausalLM, ids: np.ndarray) -> float:
    """Per-token perplexity of ids[1:] in the runtime's half-overlapping windows."""
    nll, n = 0.0, 0
    for chunk, new in windows(ids, model.args.max_position_embeddings):
        x = torch.from_numpy(chunk)
        logits = model(x[None])[0, new]
        nll += F.cross_entropy(logits, x[1:][new], reduction="sum").item()
        n += logits.shape[0]
    return math.exp(nll / n)


def train_windows(ids: np.ndarray, window: int) -> list[torch.Tensor]:
    """Consecutive windows of window + 1 ids (inputs and shifted targets)."""
    return [torch.from_numpy(ids[s:s + window + 1]) for s in range(0, len(ids) - 1, window)]


@torch.no_grad()
def route_counts(model: layers.CausalLM, ids: np.ndarray) -> np.ndarray:
    """[L, E] tokens the router sends to each expert over the training windows."""
    a = model.args
    counts = np.zeros((a.num_hidden_layers, a.experts), np.int64)
    for w in train_windows(ids, a.max_position_embeddings):
        for layer, logits in enumerate(model.hidden(w[None, :-1])[1]):
            top = logits.topk(a.num_experts_per_tok, dim=-1).indices.reshape(-1)
            counts[layer] += np.bincount(top.numpy(), minlength=a.experts)
    return counts


def default_locus(counts: np.ndarray, top: int = LOCUS_TOP) -> dict[int, list[int]]:
    return {layer: sorted(int(e) for e in np.argsort(-c, kind="stable")[:top])
            for layer, c in enumerate(counts)}


def add_lora(model: layers.CausalLM, rank: int = RANK, alpha: int = ALPHA) -> list[nn.Parameter]:
    """Freeze the model and add PEFT's LoRA (rank, alpha; A Kaiming-uniform, B zero: training
    starts at the base) to q/k/v/o and, as `target_parameters`, to every layer's stacked
    expert gate/up/down (independent factors per expert); returns the factors."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        target_parameters=[f"mlp.experts.{p}" for p in
                                           ("gate_proj", "up_proj", "down_proj")])
    inject_adapter_in_model(config, model)
    return [p for name, p in model.named_parameters() if "lora_" in name]


def split_locus(model: layers.CausalLM, locus: dict[int, list[int]]):
    """Freeze the model but the locus experts, which get their own parameters; returns them
    and `finish()`, which writes them back into the stacked tensors in place."""
    model.requires_grad_(False)
    own = {}
    for layer, ids in locus.items():
        ex = model.model.layers[layer].mlp.experts
        mine = {e: [nn.Parameter(w[e].detach().clone())
                    for w in (ex.gate_proj, ex.up_proj, ex.down_proj)] for e in ids}

        def run(j, x, ex=ex, mine=mine):
            g, u, d = mine[j] if j in mine else (ex.gate_proj[j], ex.up_proj[j], ex.down_proj[j])
            return (F.silu(x @ g.T) * (x @ u.T)) @ d.T
        ex.run = run
        own[layer] = (ex, mine)

    @torch.no_grad()
    def finish() -> None:
        for ex, mine in own.values():
            for e, ws in mine.items():
                for stacked, w in zip((ex.gate_proj, ex.up_proj, ex.down_proj), ws, strict=True):
                    stacked[e].copy_(w)
            del ex.run
    return [p for _, mine in own.values() for ws in mine.values() for p in ws], finish


def flops_per_token(args, method: str, locus: dict[int, list[int]] | None = None,
                    share: np.ndarray | None = None) -> float:
    """The analytic estimate of the module docstring, per trained token."""
    c, f, w, r = args.hidden_size, args.expert_size, args.max_position_embeddings, RANK
    hd, kvd = args.num_attention_heads * args.dim_head, args.num_key_value_heads * args.dim_head
    k = args.num_experts_per_tok
    attn = 2 * c * hd + 2 * c * kvd
    layer = 2 * (attn + c * args.experts + k * 3 * c * f) + 2 * w * hd  # 2P_l + S_l
    head = 2 * c * args.vocab_size
    fwd = args.num_hidden_layers * layer + head
    if method == "full":
        return 3.0 * fwd
    if method == "lora":
        adapters = 2 * r * (2 * (c + hd) + 2 * (c + kvd) + k * 3 * (c + f))
        return 2.0 * fwd + 3 * args.num_hidden_layers * adapters
    low = min(locus)
    grads = sum(share[x, e] * (6 + 2 * (x == low)) * c * f for x, ids in locus.items()
                for e in ids)
    return float(fwd + head + (args.num_hidden_layers - 1 - low) * layer + grads)


def pc_flops(args, method: str, r: dict) -> float:
    """A PC method's FLOPs from its child's result (tokens trained, plan, sweeps): pc and
    pc-inplace run one `sweep` per trained token (a forward and a backward over every layer
    with every layer's expert weight gradients, each layer but the top one run again before
    its backward: `pc.Layered`): full fine-tuning's estimate plus that second forward of
    the layers below the top, an upper bound (the sweep takes no attention weight
    gradients, a quantized bundle's no base expert's). pc-strict, per layer in the
    plan: one feed-forward pass, then locus-bp's forward-and-backward for that layer's
    experts `sweeps` times (the unrolled program computes every step; shares: a balanced
    router)."""
    if method != "pc-strict":
        fwd = flops_per_token(args, "full") / 3
        blocks = fwd - 2 * args.hidden_size * args.vocab_size  # the forward, less the head's
        n = args.num_hidden_layers
        return (3 * fwd + blocks * (n - 1) / n) * r["tokens"]
    shares = np.full((args.num_hidden_layers, args.experts),
                     args.num_experts_per_tok / args.experts)
    layers_: dict[int, list[int]] = {}
    for s in r["plan"]:
        layers_.setdefault(s["layer"], []).append(s["parent"])
    return r["tokens"] * sum(
        flops_per_token(args, "full") / 3 + r["sweeps"] * flops_per_token(
            args, "locus-bp", {layer: ids}, shares) for layer, ids in layers_.items())


def prepare(model: layers.CausalLM, method: str, train_ids: np.ndarray,
            locus: dict[int, list[int]] | None):
    """-> trainable parameters, finish(), the locus and routed shares (locus-bp only)."""
    if method == "locus-bp":
        counts = route_counts(model, train_ids)
        locus = locus or default_locus(counts)
        return *split_locus(model, locus), locus, counts / max(1, len(train_ids) - 1)
    if method == "lora":
        return add_lora(model), lambda: None, None, None
    if method == "full":
        return list(model.requires_grad_(True).parameters()), lambda: None, None, None
    raise AdaptError(f"{method}: not a torch method")


def train(model: layers.CausalLM, method: str, train_ids: np.ndarray, passes: int,
          locus: dict[int, list[int]] | None = None,
          evals: dict[str, np.ndarray | None] | None = None,
          progress: Progress | None = None, params: list[nn.Parameter] | None = None) -> dict:
    """Adapt `model` in place with a torch method; with `evals`, score before and after and
    the held-out curve. Returns the child-contract dict (without ppl/curve if no evals).
    `params`: go on training these (an adapter an earlier call added) instead of preparing
    the method's own."""
    say, a = progress or (lambda m: None), model.args
    if params is None:
        params, finish, locus, share = prepare(model, method, train_ids, locus)
    else:
        finish, share = lambda: None, None
        for p in params:
            p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=LR[method], weight_decay=0.0)
    batches = train_windows(train_ids, a.max_position_embeddings)
    steps = passes * len(batches)
    marks = {round(steps * i / (CURVE_POINTS + 1)) for i in range(1, CURVE_POINTS + 1)} - {0}
    before = {k: perplexity(model, v) for k, v in (evals or {}).items() if v is not None}
    curve = [[0, before["heldout"]]] if evals else []
    seen, wall = 0, 0.0
    for step in range(1, steps + 1):
        x = batches[(step - 1) % len(batches)]
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x[None, :-1])[0], x[1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        wall += time.perf_counter() - t0
        seen += len(x) - 1
        if step % 25 == 0 or step == steps:
            say(f"step {step}/{steps} loss {loss.item():.3f}")
        if evals and (step in marks or step == steps):
            curve.append([seen, perplexity(model, evals["heldout"])])
            say(f"{seen} tokens: held-out ppl {curve[-1][1]:.3f}")
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    accounted = 2 * sum(p.nbytes for p in params) + sum(t.nbytes for t in state)  # + grads
    finish()
    model.requires_grad_(False)
    result = {"wall_s": wall, "accounted_bytes": accounted, "flops":
              flops_per_token(a, method, locus, share) * seen,
              "trainable_params": sum(p.numel() for p in params), "tokens_seen": seen}
    if method == "locus-bp":
        result["locus"] = {str(x): ids for x, ids in locus.items()}
    if evals:
        after = {k: perplexity(model, v) for k, v in evals.items()
                 if v is not None and k != "heldout"}
        after["heldout"] = curve[-1][1]
        result["ppl"] = {k: [before[k], after[k]] if k in before else None
                         for k in ("heldout", "old", "other")}
        result["curve"] = curve
    return result


def run_torch(method: str, base: str, train_ids: np.ndarray, passes: int, workdir: Path,
              progress: Progress, locus: dict[int, list[int]] | None = None) -> dict:
    model = checkpoint.load(base)
    return train(model, method, train_ids, passes, locus, eval_ids(workdir), progress)


def setup(job: dict) -> None:
    """A torch method's child: the job's threads and seed."""
    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])


def adapt_one(job: dict, workdir: Path, say: Progress) -> dict:
    """bench adapt's method `job["method"]` on workdir's train.npy (the child contract)."""
    setup(job)
    method, train_ids = job["method"], np.load(workdir / "train.npy")
    locus = job["locus"] and {int(x): ids for x, ids in job["locus"].items()}
    return run_torch(method, job["base"], train_ids, job["passes"], workdir, say, locus)


def read(path: Path) -> str:
    """A UTF-8 text file, strictly decoded; blank files are refused."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                        f"{e.start})") from None
    if not text.strip():
        raise TextError(f"{path}: empty text")
    return text


def bench_adapt(base: str, train: Path, heldout: Path, old: Path, out: Path,
                methods: list[str], tokens: int, other: Path | None = None, passes: int = 2,
                locus: str | None = None, seed: int = 0, threads: int = 1,
                progress: Progress | None = None, bundle: Path | None = None) -> dict:
    """Run every method on the first `tokens` tokens of `train`, each in its own process;
    write results.json, report.md, curve.png and forgetting.png into `out`."""
    say = progress or (lambda m: None)
    methods = check_methods(methods)
    if tokens < 2 or passes < 1:
        raise AdaptError(f"need --tokens >= 2 and --passes >= 1 (got {tokens}, {passes})")
    pc = [m for m in methods if m in PC_METHODS]
    if pc and (bundle is None or not (Path(bundle) / "manifest.json").is_file()):
        raise AdaptError(f"{', '.join(pc)} run on a bundle: give --bundle, an fp32 export of "
                         "--base (with --strict-steps for pc-strict)"
                         + (f"; {bundle} is not one" if bundle is not None else ""))
    files = {"heldout": heldout, "old": old, "other": other}
    texts = {k: read(p) for k, p in {"train": train, **files}.items() if p is not None}
    model = checkpoint.load(base)  # a bad checkpoint fails here, before any child starts
    a = model.args
    tok = checkpoint.load_tokenizer(base, a.vocab_size)
    del model
    spot = parse_locus(locus, a.num_hidden_layers, a.experts) if locus else None
    train_ids = encode(tok, texts.pop("train"), tokens)
    if len(train_ids) < tokens:
        raise AdaptError(f"{train}: {len(train_ids)} tokens, fewer than --tokens {tokens}")
    evals = {k: encode(tok, t, EVAL_CAP + 1) for k, t in texts.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory(dir=out, prefix=".work-") as tmp:
        for m in methods:
            workdir = Path(tmp) / m
            workdir.mkdir()
            np.save(workdir / "train.npy", train_ids)
            for k, ids in evals.items():
                np.save(workdir / f"{k}.npy", ids)
            job = {"method": m, "base": str(base), "passes": passes, "seed": seed,
                   "threads": threads, "locus": spot, "bundle": bundle and str(bundle)}
            (workdir / "job.json").write_text(json.dumps(job))
            say(f"{m}: adapting on {tokens} tokens x {passes} passes")
            results[m] = spawn(workdir, say, "moegrow.tools.adapt_pc" if m in PC_METHODS
                               else "moegrow.tools.adapt")
            if m in PC_METHODS and "error" not in results[m]:
                results[m]["flops"] = pc_flops(a, m, results[m])
            if m == "pc" and spot is None and results[m].get("plan"):  # locus-bp: same experts
                spot = {}
                for s in results[m]["plan"]:
                    spot.setdefault(s["layer"], []).append(s["parent"])
    lora = results.get("lora", {}).get("wall_s")
    argv = [f"--{k}={v}" for k, v in {"base": base, "train": train, **files, "methods":
            ",".join(methods), "tokens": tokens, "passes": passes, "seed": seed,
            "threads": threads, "locus": locus, "out": out}.items() if v is not None]
    result = {"methods": {m: derive(r, lora) for m, r in results.items()}, "tokens": tokens,
              "passes": passes, "base": str(base), "context": a.max_position_embeddings,
              "eval_tokens": {k: len(v) - 1 for k, v in evals.items()}, "seed": seed,
              "threads": threads, "locus": locus, "locus_used": spot,
              "bundle": bundle and str(bundle),
              "command": shlex.join(["moegrow", "bench", "adapt", *argv])}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "report.md").write_text(report(result))
    plot(result, out)
    return result


def derive(r: dict, lora_wall: float | None) -> dict:
    """Add gain, forgetting and the wall-time ratio to a child's result."""
    if "error" in r:
        return r
    ppl = r["ppl"]

    def rise(key: str) -> float | None:
        return ppl[key][1] / ppl[key][0] - 1 if ppl.get(key) else None
    return {**r, "gain": 1 - ppl["heldout"][1] / ppl["heldout"][0], "forget_base": rise("old"),
            "forget_other": rise("other"),
            "wall_ratio_vs_lora": r["wall_s"] / lora_wall if lora_wall else None}


def report(r: dict) -> str:
    ev = r["eval_tokens"]
    lines = [f"# moegrow bench adapt: {r['base']}", "", f"    {r['command']}", "",
             f"{r['tokens']} training tokens x {r['passes']} passes, one window of "
             f"{r['context']} per step, {r['threads']} thread(s), seed {r['seed']}. Perplexity "
             f"on the first {EVAL_CAP} tokens of each held-out text at most ("
             + ", ".join(f"{k} {n}" for k, n in ev.items()) + "). Gain: 1 - after/before on "
             "the domain; forgetting: after/before - 1; wall time of adaptation alone.", "",
             "| method | held-out ppl | gain | forget base | forget other | wall s | vs LoRA "
             "| peak RSS MB | learning MB | GFLOPs |", "|---|---|---|---|---|---|---|---|---|---|"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:+.1%}"
    for m, x in r["methods"].items():
        if "error" in x:
            lines.append(f"| {m} | failed: {x['error']} | | | | | | | | |")
            continue
        h = x["ppl"]["heldout"]
        ratio = "-" if x["wall_ratio_vs_lora"] is None else f"{x['wall_ratio_vs_lora']:.2f}x"
        lines.append(f"| {m} | {h[0]:.2f} -> {h[1]:.2f} | {pct(x['gain'])} | "
                     f"{pct(x['forget_base'])} | {pct(x['forget_other'])} | {x['wall_s']:.1f} | "
                     f"{ratio} | {x['peak_rss_mb']:.0f} | {x['accounted_bytes'] / 1e6:.2f} | "
                     f"{x['flops'] / 1e9:.1f} |")
    lines += [f"\nlocus-bp locus {{layer: experts}}: {x['locus']}"
              for m, x in r["methods"].items() if "locus" in x]
    for m, x in r["methods"].items():  # the PC methods: what the slice did
        if "plan" in x:
            g = x["guard"] or {}
            lines.append(f"\n{m}: " + ", ".join(f"{s['how']} L{s['layer']} e{s['parent']}"
                                                for s in x["plan"])
                         + f"; {x['steps']} steps; guard: domain replay "
                         f"{g.get('domain_gain', 0):+.1%} gain, base {g.get('base_rise', 0):+.2%}; "
                         + ("committed" if x["committed"] else f"NOT committed ({x['reason']})")
                         + (f"; base tokens reaching a changed expert {max(x['reach']['base']):.2%}"
                            if x.get("reach") else ""))
    lines += ["", "![held-out perplexity](curve.png) ![forgetting vs gain](forgetting.png)"]
    return "\n".join(lines) + "\n"


def plot(r: dict, out: Path) -> None:
    """curve.png: held-out perplexity vs tokens seen; forgetting.png: forgetting vs gain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {m: x for m, x in r["methods"].items() if "error" not in x}
    (fig, ax), (fig2, ax2) = plt.subplots(figsize=(6, 4)), plt.subplots(figsize=(5, 4))
    for m, x in done.items():
        ax.plot(*zip(*x["curve"], strict=True), marker="o", label=m)
        ax2.scatter(x["gain"], x["forget_base"])
        ax2.annotate(m, (x["gain"], x["forget_base"]), textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel="training tokens seen", ylabel="held-out perplexity",
           title=f"adaptation: {r['tokens']} tokens x {r['passes']} passes")
    ax.legend()
    ax2.axhline(0, color="k", linewidth=0.5)
    ax2.set(xlabel="gain on the domain (1 - ppl after/before)",
            ylabel="forgetting on base (ppl after/before - 1)", title="forgetting vs gain")
    for f, name in ((fig, "curve.png"), (fig2, "forgetting.png")):
        f.tight_layout()
        f.savefig(out / name, dpi=100)
        plt.close(f)


if __name__ == "__main__":
    sys.exit(child(Path(sys.argv[1]), adapt_one))

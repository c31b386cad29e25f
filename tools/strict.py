"""`moegrow bench strict`: does strict PC settle, in how many steps, and does it pay?

The default deepening schedule (fixed-prediction exact, export/pc.py) is the NLL's
gradient in one top-down sweep. Strict PC (prospective configuration, PC.md "Schedules")
relaxes the value nodes above a layer until F settles and updates the layer's experts at
the relaxed values; the seed claims that near equilibrium it settles in T = 5-20 steps. The
runtime's one strict schedule (`relax.Strict`, eta 0.1, halting when F rises) was unstable
on the benchmark domains (docs/benchmarks.md). This study relaxes in eager torch on the
desktop (nothing here is device code; the F, the errors and the predictions are
`relax.Energy`'s, the programs' own) on windows of real text, with four schedules:

- `strict`: v <- v - 0.1 dF/dv over the nodes, halting when F rises (`relax.Strict`'s rule);
- `curvature`: the same with eta = 1 / lambda_max of F's Hessian in the nodes at the
  feed-forward point (power iteration on Hessian-vector products);
- `precision`: each node's error weighted by a precision pi_v = 1 / (the node's mean
  square at the feed-forward point: the residual stream grows with depth), eta from the
  curvature of that F;
- `error`: error-space PC (ePC, arXiv 2505.20137): the variables are the errors, the
  nodes their composition v_i = mu_i(v_{i-1}) + e_i (`relax.Energy.compose`); eta from the
  curvature.

Every schedule halts when F rises (keeping the last accepted values) or is not finite.
Per window and target layer: T, the first step at which |dF/dvariables| falls below `tol`
of its start (settled), or none within `steps`; the cosine between the layer's expert
update dF/dW at step t and the exact gradient (the default schedule's update), and its
norm ratio. With `train_steps` > 0, each schedule (and `exact`) trains every layer's
experts in place, Adam, on the domain's windows, and the domain's held-out perplexity and
the base's are measured after.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from moegrow.export import checkpoint, pc, programs, relax
from moegrow.runtime.session import windows
from moegrow.tools.adapt import encode
from tqdm import tqdm

SCHEDULES = ("strict", "curvature", "precision", "error")
AT = (1, 2, 4, 8, 16, 32, 64)  # steps at which each update is compared with the gradient
POWER = 4  # power iterations for a Hessian block's largest eigenvalue


class StrictError(ValueError):
    """Bad options for the study."""


def _cat(xs) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in xs])


def _cos(a, b) -> float:
    a, b = _cat(a), _cat(b)
    return float(a @ b / (a.norm() * b.norm() + 1e-30))


class Study:
    """One copy of the model (`relax.Energy`'s, routers fixed) and the windows of a text."""

    def __init__(self, model, window: int):
        self.energy = relax.Energy(model, 0)
        self.energy.requires_grad_(False)
        self.slots = programs.slot_state(self.energy.model)
        self.window = window
        self.params = dict(self.energy.named_parameters())
        layers = self.energy.model.model.layers
        self.targets = [[self.params[f"model.model.layers.{i}.mlp.{n}"]
                         for n in pc.expert_weights(block.mlp)]
                        for i, block in enumerate(layers)]

    def _windows(self, ids: np.ndarray, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for s in range(0, len(ids) - 1, self.window)[:count]:
            chunk = torch.from_numpy(ids[s:s + self.window])[None]
            valid = torch.ones(chunk.shape[1])
            valid[-1] = 0
            out.append((chunk, valid))
        return out

    def feed_forward(self, tokens, valid, layer: int):
        self.energy.layer = layer
        with torch.no_grad():
            return self.energy(tokens, valid, self.slots)[:3]

    def _weight_grad(self, layer: int, loss) -> list[torch.Tensor]:
        """d loss() / d (the layer's expert weights)."""
        weights = self.targets[layer]
        with torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
            try:
                return list(torch.autograd.grad(loss(), weights))
            finally:
                for w in weights:
                    w.requires_grad_(False)

    def exact(self, tokens, valid, layer: int) -> list[torch.Tensor]:
        """d NLL / d (layer's expert weights), routers fixed: the default schedule's update."""
        self.energy.layer = layer
        return self._weight_grad(layer, lambda: self.energy(tokens, valid, self.slots)[3].sum())

    def nodes(self, tokens, x, gates, base, schedule: str) -> list[torch.Tensor]:
        """The value nodes of the variables `x`: themselves, or (error-space PC) composed
        from the errors."""
        return self.energy.compose(tokens, x, gates, base) if schedule == "error" else x

    def free(self, tokens, valid, nodes, gates, base, pi) -> torch.Tensor:
        """F at `nodes`, each node's error weighted by its precision in `pi`."""
        eps, nll = self.energy.errors(tokens, nodes, gates, base)
        energy = sum(p * 0.5 * (v[0] * v[0]).sum(-1) for p, v in zip(pi, eps, strict=True))
        return ((energy + nll) * valid).sum()

    def update(self, tokens, valid, x, gates, base, schedule: str, pi, layer: int):
        """dF/dW of the layer's experts at the current nodes (the update PC takes)."""
        with torch.no_grad():
            nodes = self.nodes(tokens, [v.detach() for v in x], gates, base, schedule)
        return self._weight_grad(layer, lambda: self.free(tokens, valid, nodes, gates, base, pi))

    def relax(self, tokens, valid, layer: int, schedule: str, steps: int, tol: float,
              exact: list[torch.Tensor] | None = None) -> dict:
        """Relax from the feed-forward values; -> T, rises, the update at the end and, with
        `exact`, the cosine and norm ratio of the update at the steps of `AT`."""
        nodes, gates, base = self.feed_forward(tokens, valid, layer)
        pi = ([1.0 / float((n * n).mean()) for n in nodes] if schedule == "precision"
              else [1.0] * len(nodes))
        x = [torch.zeros_like(n) for n in nodes] if schedule == "error" else nodes

        def free(x):
            return self.free(tokens, valid, self.nodes(tokens, x, gates, base, schedule),
                             gates, base, pi)

        def grad(x):
            with torch.enable_grad():
                x = [v.detach().requires_grad_(True) for v in x]
                f = free(x)
                return f.detach(), list(torch.autograd.grad(f, x))

        eta = [0.1] * len(x) if schedule == "strict" else steps_from_curvature(free, x)
        out = {"T": None, "halted": None, "nonfinite": False, "eta": eta, "free_energy": []}
        cos, ratio = {}, {}
        last, f_last, g0 = x, math.inf, None
        for t in range(steps + 1):
            f, g = grad(x)
            gn = float(_cat(g).norm())
            if not math.isfinite(float(f)) or not math.isfinite(gn):
                out["nonfinite"], out["halted"] = True, t
                break
            if float(f) > f_last:
                out["halted"] = t
                break
            last, f_last = x, float(f)
            out["free_energy"].append(f_last)
            g0 = gn if g0 is None else g0
            if out["T"] is None and t > 0 and gn <= tol * g0:
                out["T"] = t
            if exact is not None and t in AT:
                u = self.update(tokens, valid, x, gates, base, schedule, pi, layer)
                cos[t], ratio[t] = _cos(u, exact), float(_cat(u).norm() / _cat(exact).norm())
            if t < steps:
                x = [v - a * d for v, a, d in zip(x, eta, g, strict=True)]
        out["update"] = final = self.update(tokens, valid, last, gates, base, schedule, pi,
                                            layer)
        for t in AT:  # a schedule that halted keeps its last accepted values from there on
            if t <= steps and t not in cos and exact is not None:
                cos[t] = _cos(final, exact)
                ratio[t] = float(_cat(final).norm() / _cat(exact).norm())
        out["cos"], out["ratio"] = cos, ratio
        return out

    def perplexity(self, ids: np.ndarray) -> float:
        nll, n = 0.0, 0
        for chunk, new in windows(ids, self.window):
            tokens = torch.from_numpy(chunk)[None]
            with torch.no_grad():
                loss = self.energy(tokens, torch.ones(tokens.shape[1]), self.slots)[3]
            nll += float(loss[new].sum())
            n += new.stop - new.start
        return math.exp(nll / n)


def curvature(free, x: list[torch.Tensor]) -> float:
    """Largest eigenvalue of the Hessian of `free` in the variables at x (power iteration
    on Hessian-vector products)."""
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(a.shape, generator=gen) for a in x]
    lam = 1.0
    for _ in range(POWER):
        norm = _cat(v).norm()
        v = [a / norm for a in v]
        with torch.enable_grad():
            xs = [a.detach().requires_grad_(True) for a in x]
            g = torch.autograd.grad(free(xs), xs, create_graph=True)
            hv = torch.autograd.grad(_cat(g) @ _cat(v), xs)
        lam = float(_cat(hv) @ _cat(v))
        v = list(hv)
    return max(lam, 1e-6)


def steps_from_curvature(free, x: list[torch.Tensor]) -> list[float]:
    """Each variable's step, 1 / the largest eigenvalue of F's Hessian block in it (block
    Jacobi: a node whose children's predictions are steep takes a small step)."""
    out = []
    for i in range(len(x)):
        def block(xi, i=i):
            return free([*x[:i], xi[0], *x[i + 1:]])
        out.append(1.0 / curvature(block, [x[i]]))
    return out


BINS = ((1, 4), (5, 8), (9, 20), (21, 64), (65, 10**9))  # T histogram (5-20: the seed's)


def _hist(ts: list[int | None]) -> dict[str, int]:
    out = {f"{a}-{b}" if b < 10**9 else f">{a - 1}": sum(1 for t in ts if t is not None and
                                                         a <= t <= b) for a, b in BINS}
    out["none"] = sum(1 for t in ts if t is None)
    return out


def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def summarize(runs: list[dict], steps: int) -> dict:
    """The relaxations of one schedule (every window and layer) -> its figures."""
    ts = [r["T"] for r in runs]
    at = [t for t in AT if t <= steps]
    return {"runs": len(runs), "settled": sum(t is not None for t in ts),
            "T_median": _median(ts), "T_hist": _hist(ts),
            "halted": sum(r["halted"] is not None for r in runs),
            "nonfinite": sum(r["nonfinite"] for r in runs),
            "cos": {t: _median(r["cos"].get(t) for r in runs) for t in at},
            "ratio": {t: _median(r["ratio"].get(t) for r in runs) for t in at},
            "eta_min_median": _median(min(r["eta"]) for r in runs)}


def train(study: Study, schedule: str, wins, steps: int, relax_steps: int, tol: float,
          lr: float, per_step: int = 2) -> None:
    """`steps` Adam steps on every layer's experts in place, each from `per_step` windows:
    the exact gradient or the schedule's update after `relax_steps` relaxation steps."""
    weights = [w for ws in study.targets for w in ws]
    opt = torch.optim.Adam(weights, lr=lr)
    for step in range(steps):
        for w in weights:
            w.grad = torch.zeros_like(w)
        for k in range(per_step):
            tokens, valid = wins[(step * per_step + k) % len(wins)]
            for layer, ws in enumerate(study.targets):
                u = (study.exact(tokens, valid, layer) if schedule == "exact" else
                     study.relax(tokens, valid, layer, schedule, relax_steps, tol)["update"])
                for w, d in zip(ws, u, strict=True):
                    w.grad += d
        opt.step()


def bench_strict(base: str, domains: list[tuple[str, Path, Path]], old: Path, out: Path, *,
                 windows_n: int = 4, window: int = 128, steps: int = 64, tol: float = 0.01,
                 train_steps: int = 0, relax_steps: int = 8, lr: float = 3e-4,
                 heldout_tokens: int = 4096, threads: int = 1) -> dict:
    """The study on each domain's first `windows_n` windows of `window` tokens; see the
    module's docstring. Writes report.md and results.json into `out`."""
    if not 8 <= window:
        raise StrictError(f"--window {window}: at least 8 tokens")
    if not 0 < tol < 1:
        raise StrictError(f"--tol {tol}: a fraction between 0 and 1")
    from moegrow.tools.cli import read_text

    torch.set_num_threads(threads)
    model = checkpoint.load(base)
    if window > model.args.max_position_embeddings:
        raise StrictError(f"--window {window}: longer than the model's context "
                          f"({model.args.max_position_embeddings})")
    tok = checkpoint.load_tokenizer(base, model.args.vocab_size)
    texts = {name: (read_text(t), read_text(h)) for name, t, h in domains}
    old_ids = encode(tok, read_text(old), heldout_tokens)
    study = Study(model, window)
    result = {"base": base, "window": window, "windows": windows_n, "steps": steps,
              "tol": tol, "schedules": list(SCHEDULES), "domains": {}}
    for name, (train_text, heldout_text) in texts.items():
        wins = study._windows(encode(tok, train_text, windows_n * window + 1), windows_n)
        if len(wins) < windows_n:
            raise StrictError(f"{name}: its training text has fewer than {windows_n} windows "
                              f"of {window} tokens")
        runs = {s: [] for s in SCHEDULES}
        layers = range(model.args.num_hidden_layers)
        bar = tqdm(total=len(wins) * len(layers) * len(SCHEDULES), desc=f"relax {name}",
                   leave=False)
        for tokens, valid in wins:
            for layer in layers:
                exact = study.exact(tokens, valid, layer)
                for s in SCHEDULES:
                    r = study.relax(tokens, valid, layer, s, steps, tol, exact)
                    runs[s].append({k: v for k, v in r.items() if k != "update"} |
                                   {"layer": layer})
                    bar.update()
        bar.close()
        entry = {"schedules": {s: summarize(runs[s], steps) for s in SCHEDULES},
                 "runs": runs}
        if train_steps:
            held = encode(tok, heldout_text, heldout_tokens)
            start = {id(w): w.detach().clone() for ws in study.targets for w in ws}
            before = {"domain": study.perplexity(held), "base": study.perplexity(old_ids)}
            entry["train"] = {"steps": train_steps, "relax_steps": relax_steps, "lr": lr,
                              "before": before}
            for s in tqdm(("exact", *SCHEDULES), desc=f"train {name}", leave=False):
                train(study, s, wins, train_steps, relax_steps, tol, lr)
                entry["train"][s] = {"domain": study.perplexity(held),
                                     "base": study.perplexity(old_ids)}
                for ws in study.targets:
                    for w in ws:
                        w.data.copy_(start[id(w)])
        result["domains"][name] = entry
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json_dump(result))
    (out / "report.md").write_text(report(result))
    return result


def json_dump(result: dict) -> str:
    import json

    return json.dumps(result, indent=1, default=float)


def report(r: dict) -> str:
    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    at = [t for t in AT if t <= r["steps"]]
    lines = [f"# Strict PC schedules on {r['base']}", "",
             f"{r['windows']} windows of {r['window']} tokens per domain, every layer; "
             f"relaxation up to {r['steps']} steps; settled: |dF/dv| below {r['tol']} of "
             "its start. cos/ratio: the layer's expert update against the exact gradient "
             "(medians).", ""]
    for name, d in r["domains"].items():
        lines += [f"## {name}", "", "| schedule | settled | T median | halted (F rose) | "
                  "non-finite | smallest step | " + " | ".join(f"cos@{t}" for t in at) +
                  " | " + " | ".join(f"ratio@{t}" for t in at) + " |",
                  "|---" * (6 + 2 * len(at)) + "|"]
        for s, x in d["schedules"].items():
            lines.append(f"| {s} | {x['settled']}/{x['runs']} | {f(x['T_median'], '{:.0f}')} | "
                         f"{x['halted']} | {x['nonfinite']} | {f(x['eta_min_median'], '{:.3g}')} | "
                         + " | ".join(f(x["cos"][t]) for t in at) + " | "
                         + " | ".join(f(x["ratio"][t], "{:.3f}") for t in at) + " |")
        hist = list(next(iter(d["schedules"].values()))["T_hist"])
        lines += ["", "T histogram:", "", "| schedule | " + " | ".join(hist) + " |",
                  "|---" * (1 + len(hist)) + "|"]
        lines += [f"| {s} | " + " | ".join(str(x["T_hist"][b]) for b in hist) + " |"
                  for s, x in d["schedules"].items()]
        if "train" in d:
            t = d["train"]
            lines += ["", f"In-place training, {t['steps']} Adam steps (lr {t['lr']}), "
                      f"{t['relax_steps']} relaxation steps per update:", "",
                      "| schedule | domain ppl | gain | base ppl | base rise |",
                      "|---|---|---|---|---|",
                      f"| before | {t['before']['domain']:.2f} | - | "
                      f"{t['before']['base']:.2f} | - |"]
            for s in ("exact", *SCHEDULES):
                lines.append(f"| {s} | {t[s]['domain']:.2f} | "
                             f"{1 - t[s]['domain'] / t['before']['domain']:+.1%} | "
                             f"{t[s]['base']:.2f} | "
                             f"{t[s]['base'] / t['before']['base'] - 1:+.2%} |")
        lines.append("")
    return "\n".join(lines)

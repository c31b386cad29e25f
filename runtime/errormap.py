"""The error map: `observe`'s taps folded into per-(layer, expert, domain) statistics.

Stored in the bundle's state database (`state.py`: SQLite under `state/`). For every (layer,
expert, domain): count, sum and sum of squares of the per-token PC update size g |e| |h|
(`programs.Observe`), an exponential moving average of its per-call mean, and when it was
last seen. Counts are added inside the database (`count = count + ?`), so two processes
observing the same bundle lose nothing. Per domain also the NLL the learnability probe
saved (`learnable.py`: sum and sum of squares per cache weight). A bounded replay buffer
keeps the most recent observed token sequences (FIFO, capacity in tokens; of every domain
its newest `RESERVE_TOKENS` stay past it) for growth to learn from and for the probe's
cache; `forget` clears it and the map. Memory and disk stay bounded: the map has L x E
rows per domain, the buffer at most `capacity` + domains x `reserve` tokens (4 bytes each).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import learnable, state

EMA = 0.1  # weight of the newest call's mean in the moving average
REPLAY_TOKENS = 65536  # replay buffer capacity
RESERVE_TOKENS = 4096  # per domain, kept past the capacity: a domain seen long ago can still
# be measured (its held-out windows) before one of its experts is retired


def fold(ids: np.ndarray, update: np.ndarray, experts: int) -> np.ndarray:
    """Taps ids, update [L, N, K] -> [L, E, 3]: count, sum, sum of squares per expert."""
    layers = ids.shape[0]
    out = np.zeros((layers, experts, 3))
    for layer in range(layers):
        e, v = ids[layer].reshape(-1), update[layer].reshape(-1).astype(np.float64)
        np.add.at(out[layer, :, 0], e, 1)
        np.add.at(out[layer, :, 1], e, v)
        np.add.at(out[layer, :, 2], e, v * v)
    return out


class Store:
    """The error map and replay buffer of one bundle, in its state database (`state.py`)."""

    def __init__(self, bundle_dir: Path):
        self.bundle_dir = Path(bundle_dir)

    def add(self, domain: str, folded: np.ndarray, tokens: int, nll_sum: float, nll_sq: float,
            replay: list[np.ndarray], saved: np.ndarray | None = None,
            capacity: int = REPLAY_TOKENS, reserve: int = RESERVE_TOKENS) -> None:
        """Add one call's folded taps, its token count, the sum and sum of squares of its
        tokens' NLL, its replay sequences and the probe's per-token savings `saved`
        [tokens, len(learnable.LAMBDAS)], in one transaction. The replay buffer keeps the
        newest `capacity` tokens, and of every domain its newest `reserve` ones (what
        `compress.retire` measures a domain seen long ago on)."""
        now = time.time()
        probe = [] if saved is None else [
            (domain, lam, tokens, float(col.sum()), float((col * col).sum()))
            for lam, col in zip(learnable.LAMBDAS, np.asarray(saved, np.float64).T,
                                strict=True)]
        rows = []
        for layer, expert in zip(*np.nonzero(folded[:, :, 0]), strict=True):
            count, total, squares = folded[layer, expert]
            rows.append((int(layer), int(expert), domain, int(count), float(total),
                         float(squares), float(total / count), now))
        with state.connection(self.bundle_dir, write=True) as db:
            db.executemany(
                "INSERT INTO stats VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (layer, expert, domain) DO UPDATE SET "
                "count = count + excluded.count, sum = sum + excluded.sum, "
                f"sumsq = sumsq + excluded.sumsq, ema = ema + {EMA} * (excluded.ema - ema), "
                "last_seen = excluded.last_seen", rows)
            db.execute("INSERT INTO domains (domain, tokens, nll_sum, last_seen, nll_sq) "
                       "VALUES (?, ?, ?, ?, ?) ON CONFLICT (domain) DO "
                       "UPDATE SET tokens = tokens + excluded.tokens, "
                       "nll_sum = nll_sum + excluded.nll_sum, last_seen = excluded.last_seen, "
                       "nll_sq = nll_sq + excluded.nll_sq", (domain, tokens, nll_sum, now, nll_sq))
            db.executemany("INSERT INTO learnable VALUES (?, ?, ?, ?, ?) ON CONFLICT (domain, "
                           "lam) DO UPDATE SET tokens = tokens + excluded.tokens, "
                           "saved = saved + excluded.saved, "
                           "saved_sq = saved_sq + excluded.saved_sq", probe)
            db.executemany("INSERT INTO replay (domain, tokens, length) VALUES (?, ?, ?)",
                           [(domain, s.astype(np.int32).tobytes(), len(s)) for s in replay])
            db.execute("DELETE FROM replay WHERE id IN (SELECT id FROM (SELECT id, SUM(length) "
                       "OVER (ORDER BY id DESC) AS newer, SUM(length) OVER (PARTITION BY "
                       "domain ORDER BY id DESC) AS own FROM replay) WHERE newer > ? AND "
                       "own > ?)", (capacity, reserve))

    def move(self, moves: list[tuple[int, int, int]]) -> None:
        """The error statistics of experts that moved slots (`compress`: (layer, from, to))
        follow them, in one transaction: whatever the target slot had is dropped."""
        with state.connection(self.bundle_dir, write=True) as db:
            for layer, old, new in moves:
                db.execute("DELETE FROM stats WHERE layer = ? AND expert = ?", (layer, new))
                db.execute("UPDATE stats SET expert = ? WHERE layer = ? AND expert = ?",
                           (new, layer, old))

    def outcome(self, domain: str, committed: bool) -> None:
        """Record how the domain's growth slice ended (`growth.choose` waits for new text
        after a refusal)."""
        with state.connection(self.bundle_dir, write=True) as db:
            db.execute("UPDATE domains SET refused_at = CASE WHEN ? THEN NULL ELSE tokens END "
                       "WHERE domain = ?", (committed, domain))

    def drop(self, experts_: list[tuple[int, int]]) -> None:
        """Forget the error statistics of retired experts ((layer, slot), `compress.retire`)."""
        with state.connection(self.bundle_dir, write=True) as db:
            db.executemany("DELETE FROM stats WHERE layer = ? AND expert = ?", experts_)

    def read(self, domain: str | None = None) -> dict:
        """{"domains": {tag: {"tokens", "nll", "nll_sd", "probe", "refused_at"}}, "stats":
        [(layer, expert, domain, count, sum, sumsq, ema, last_seen)], "replay_tokens": n};
        empty when nothing
        was observed. nll is the mean per-token NLL, nll_sd its standard deviation over
        tokens; probe {"tokens", "saved": [sum per cache weight], "saved_sq": [...]} (tokens
        0 for a domain observed before the probe existed); refused_at the domain's tokens when
        its last growth slice was refused (None: committed, or none ran)."""
        if not state.exists(self.bundle_dir):
            return {"domains": {}, "stats": [], "replay_tokens": 0}
        with state.connection(self.bundle_dir) as db:
            where, args = ("WHERE domain = ?", (domain,)) if domain is not None else ("", ())
            stats = db.execute(f"SELECT * FROM stats {where} ORDER BY layer, expert, domain",
                               args).fetchall()
            rows = db.execute(f"SELECT domain, tokens, nll_sum, nll_sq, refused_at FROM domains "
                              f"{where}", args).fetchall()
            replay = db.execute("SELECT COALESCE(SUM(length), 0) FROM replay").fetchone()[0]
            probe = db.execute(f"SELECT domain, lam, tokens, saved, saved_sq FROM learnable "
                               f"{where} ORDER BY domain, lam", args).fetchall()
        domains = {d: {"tokens": n, "nll": s / max(n, 1),
                       "nll_sd": float(np.sqrt(max(q / max(n, 1) - (s / max(n, 1)) ** 2, 0))),
                       "probe": {"tokens": 0, "saved": [], "saved_sq": []}, "refused_at": r}
                   for d, n, s, q, r in rows}
        for d, _lam, n, total, squares in probe:
            if d in domains:
                p = domains[d]["probe"]
                p["tokens"] = n
                p["saved"].append(total)
                p["saved_sq"].append(squares)
        return {"domains": domains, "stats": stats, "replay_tokens": int(replay)}

    def replay(self, domain: str) -> list[np.ndarray]:
        """The replay buffer's token sequences of `domain`, oldest first."""
        if not state.exists(self.bundle_dir):
            return []
        with state.connection(self.bundle_dir) as db:
            rows = db.execute("SELECT tokens FROM replay WHERE domain = ? ORDER BY id",
                              (domain,)).fetchall()
        return [np.frombuffer(r[0], np.int32).astype(np.int64) for r in rows]

    def forget(self) -> None:
        """Clear the error map and the replay buffer, so that the text is in no file: the
        freed pages are zeroed (`secure_delete`), the database rebuilt (`VACUUM`) and the
        write-ahead log copied back and truncated. StateError if another process holds a
        read open across it (the text would linger in the file until it closes)."""
        if not state.exists(self.bundle_dir):
            return
        with state.connection(self.bundle_dir, write=True) as db:
            db.execute("PRAGMA secure_delete = ON")
            for table in ("stats", "domains", "replay", "learnable"):
                db.execute(f"DELETE FROM {table}")
        with state.connection(self.bundle_dir) as db:
            db.execute("VACUUM")
            busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if busy:
            raise state.StateError(f"{state.folder(self.bundle_dir)}: the map is cleared, but "
                                   "another process is reading it: its old pages stay in "
                                   "the file until that process closes it; run forget again")


def summary(state: dict, layers: int, experts: int) -> dict:
    """The map as JSON: {"layers": [{"layer", "experts": [{"id", "count", "mean", "std",
    "ema", "last_seen"}]}], "domains": {tag: {"tokens", "nll"}}, "replay_tokens"}; with
    several domains in `state`, each expert's figures pool them (ema: count-weighted)."""
    acc = np.zeros((layers, experts, 4))  # count, sum, sumsq, count * ema
    seen = np.zeros((layers, experts))
    for layer, expert, _domain, count, total, squares, ema, last in state["stats"]:
        acc[layer, expert] += (count, total, squares, count * ema)
        seen[layer, expert] = max(seen[layer, expert], last)
    out = []
    for layer in range(layers):
        rows = []
        for e in range(experts):
            count, total, squares, ema = acc[layer, e]
            mean = total / count if count else 0.0
            var = max(squares / count - mean * mean, 0.0) if count else 0.0
            rows.append({"id": e, "count": int(count), "mean": mean, "std": float(np.sqrt(var)),
                         "ema": ema / count if count else 0.0,
                         "last_seen": float(seen[layer, e]) or None})
        out.append({"layer": layer, "experts": rows})
    return {"layers": out, "domains": state["domains"], "replay_tokens": state["replay_tokens"]}


def plot(maps: dict[str, dict], path: Path, title: str, verdicts: dict | None = None) -> None:
    """Heat maps of the mean update size, layers x experts, one panel per domain (three to a
    row), one colour scale for all; grey where an expert was never chosen. With `verdicts`
    (`verdicts.judge`), each panel's title says its verdict and a frame marks what it names:
    the experts to deepen, or the layers to spawn in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    names = sorted(maps)
    grids = {d: np.array([[x["mean"] if x["count"] else np.nan for x in layer["experts"]]
                          for layer in maps[d]["layers"]]) for d in names}
    top = max([np.nanmax(g, initial=0) for g in grids.values()] + [1e-12])
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="lightgrey")
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    layers, experts = grids[names[0]].shape
    fig, axes = plt.subplots(rows, cols, squeeze=False, constrained_layout=True,
                             figsize=(2.2 + 0.45 * experts * cols, 0.9 + 0.55 * layers * rows))
    for i, ax in enumerate(axes.flat):
        if i >= len(names):
            ax.axis("off")
            continue
        d = names[i]
        image = ax.imshow(grids[d], cmap=cmap, vmin=0, vmax=top)
        tokens = maps[d]["domains"].get(d, {}).get("tokens", 0)
        v = (verdicts or {}).get(d)
        ax.set_title(f"{d}: {v['verdict']}" if v else d, fontsize=9)
        ax.set_title(f"{tokens} tokens", fontsize=7, loc="right", y=-0.32)
        frames = [] if v is None else [(e, layer, 1) for layer, e in v["experts"]] + [
            (0, int(layer), experts) for layer, x in v["layers"].items()
            if x["named"] and v["verdict"] == "spawn"]
        for x, y, width in frames:
            ax.add_patch(Rectangle((x - 0.44, y - 0.44), width - 0.12, 0.88, fill=False,
                                   lw=1.6, edgecolor="deepskyblue"))
        ax.set_xticks(range(experts))
        ax.set_yticks(range(layers))
        ax.tick_params(labelsize=7)
        if i % cols == 0:
            ax.set_ylabel("layer")
        if i // cols == rows - 1:
            ax.set_xlabel("expert")
    fig.colorbar(image, ax=axes, label="mean g|e||h|", shrink=0.8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)

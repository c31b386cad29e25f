"""The embedding API: `open(bundle, backend)` -> `Runtime` with `score`, `generate`, `suggest`.

Everything the model computes runs in the bundle's programs on the chosen engine; this file
only tokenizes, moves arrays and picks tokens. The KV cache is a pair of arrays the programs
read; `prefill`/`decode` return the keys and values of the positions they ran, written here
at those positions. A position past the ones a run reads is masked, so branches from one
context (one per suggestion) share its cache, each writing past it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm
from moegrow.device_kernels import layout

from . import backends, compress, errormap, experts, gate, growth, learnable, state, versions
from . import bundle as bundle_format

BOS, EOS = 1, 2
OBSERVE = ("nll", "rank", "ids", "gates", "update", "energy")  # the observe program's outputs
# new pieces of a typed context that `extend` runs as decode steps where the domain gate may
# open (more: the whole context is prefilled; a keystroke changes one or two pieces)
STEPS = 4
DEEPEN = ("dwg", "dwu", "dwd", "count", "nll", "energy", "novelty", "x")  # a deepen program's


def windows(ids: np.ndarray, window: int) -> Iterator[tuple[np.ndarray, slice]]:
    """Windows of `window` tokens, half-overlapping, and in each the slice of the positions
    predicted there for the first time: every token after the first is predicted once, with
    up to half a window of context."""
    stride = max(1, window // 2)
    done, start = 1, 0
    while done < len(ids):
        chunk = ids[start:start + window]
        yield chunk, slice(done - start - 1, len(chunk) - 1)
        done = start + len(chunk)
        start += stride


class InputError(ValueError):
    """Text the model cannot take: empty, or longer than the bundle's context."""


class Runtime:
    """A bundle bound to an engine. `engine`: any object with the backends' `run(name,
    arrays)` to use instead of loading `backend` (tools and tests pass the torch reference,
    `moegrow.export.reference`, as backend "torch"). `weights`: the engine's weight file to
    serve instead of the bundle's current one (growth's working copy, `working_copy`);
    `interrupt`: a `backends.Interrupt` that stops its engine's runs when set."""

    def __init__(self, bundle: bundle_format.Bundle, backend: str, threads: int | None = None,
                 engine=None, weights: Path | None = None,
                 interrupt: backends.Interrupt | None = None):
        if engine is None and backend not in bundle.engines():
            raise backends.BackendError(f"{bundle.path}: no programs for backend {backend!r} "
                                        f"(it has: {', '.join(bundle.engines())})")
        self.bundle, self.backend, self.threads = bundle, backend, threads
        self.weights = weights or (bundle.weights(backend) if engine is None else None)
        self.interrupt = interrupt
        self.engine = engine or backends.load(backend, bundle.programs(backend), self.weights,
                                              threads, bundle.initializers(backend),
                                              bundle.live(backend), interrupt, self._cache())
        self.sp = spm.SentencePieceProcessor()
        self.sp.load(str(bundle.tokenizer))
        c = bundle.config
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        self.cache_shape = (c["num_hidden_layers"], 1, c["num_key_value_heads"],
                            bundle.context, head_dim)
        self.slots = gate.slot_state(bundle)
        self.typed: tuple | None = None  # the last `suggestions` context: (ids, slots,
        # outputs, whether the one-pass prefill ran it)

    def reload(self, bundle: bundle_format.Bundle | None = None) -> None:
        """Serve `bundle` (a new version of this one) from now on; without it, load this
        runtime's weight file again (a working copy whose bytes were changed)."""
        if self.backend not in backends.ENGINES:
            raise backends.BackendError(f"backend {self.backend!r} serves its own weights: it "
                                        "cannot load a new weights version")
        self.typed = None
        if bundle is not None:
            self.bundle, self.slots = bundle, gate.slot_state(bundle)
            self.weights = bundle.weights(self.backend)
        self.engine = backends.load(self.backend, self.bundle.programs(self.backend),
                                    self.weights, self.threads,
                                    self.bundle.initializers(self.backend),
                                    self.bundle.live(self.backend), self.interrupt, self._cache())

    def _cache(self) -> Path | None:
        """Where ONNX Runtime's sessions share their packed weights: under the state folder,
        for the bundle's committed weights only (a working copy changes under its sessions)."""
        if self.weights is not None and self.weights == self.bundle.weights(self.backend):
            return state.folder(self.bundle.path) / "prepacked"
        return None

    def working_copy(self, path: Path, interrupt: backends.Interrupt | None = None) -> Runtime:
        """A runtime on a copy of this one's weight file at `path` and of its slot state:
        growth changes experts there (`experts.write_in_place`, then `reload()`) while this
        one serves on; `interrupt` stops its runs."""
        shutil.copyfile(self.weights, path)
        work = Runtime(self.bundle, self.backend, self.threads, weights=path,
                       interrupt=interrupt)
        work.slots = self.slots.copy()
        return work

    def expert(self, layer: int, slot: int) -> list[np.ndarray]:
        """Expert `slot` of `layer`: fp32 [gate [F, C], up [F, C], down [C, F]]."""
        return experts.read(self.bundle, layer, slot, self.backend, self.weights)

    def set_experts(self, changes: dict[tuple[int, int], list[np.ndarray]]) -> int:
        """Commit new weights for some experts ({(layer, slot): [gate, up, down]}) as the
        bundle's next weights version (logged: `versions.commit`), reload the engine on it;
        returns the version."""
        self.reload(versions.commit(self.bundle, changes, report={
            "what": "set_experts", "experts": sorted(map(list, changes))}))
        return self.bundle.manifest["weights"]["version"]

    def _ids(self, text: str, room: int) -> list[int]:
        if not text:
            raise InputError("the text is empty")
        ids = [BOS] + self.sp.encode(text)
        if len(ids) + room > self.bundle.context:
            raise InputError(f"prompt is {len(ids)} tokens; with {room} new tokens it exceeds "
                             f"the context of {self.bundle.context}")
        return ids

    def prefill(self, ids: list[int]) -> list[np.ndarray]:
        """Fresh cache, then `ids` -> [last logits [1, V], k, v, novelty] (the context's gate
        scores: `decode` keeps the gates they set; zeros where the one-pass program served,
        `form`: no slot opened anywhere, so none opens for `decode` either)."""
        k = np.zeros(self.cache_shape, np.float32)
        return self._prefill(ids, 0, k, k.copy())

    def _prefill(self, ids: list[int], start: int, k: np.ndarray,
                 v: np.ndarray) -> list[np.ndarray]:
        """The prefill program (`form`, on the whole of `ids`: a gated one only from
        `start` 0) on `ids[start:]` over the cache's first `start` positions."""
        out = self.engine.run(self.form("prefill", ids), [np.array([ids[start:]], np.int64),
                                                          np.arange(start, len(ids)), k, v,
                                                          self.slots])
        return [out[0], *self._written(k, v, start, out[1], out[2]), *out[3:]]

    def _written(self, k: np.ndarray, v: np.ndarray, start: int, new_k: np.ndarray,
                 new_v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The cache after a run from position `start`: the run's rows written into `k`, `v`
        in place (bundles exported since 2026-12-05, `"cache": "rows"`), or the whole cache
        the program returned (bundles before)."""
        if self.bundle.manifest.get("cache") != "rows":
            return new_k, new_v
        k[:, :, :, start:start + new_k.shape[3]] = new_k
        v[:, :, :, start:start + new_v.shape[3]] = new_v
        return k, v

    def extend(self, ids: list[int]) -> list[np.ndarray]:
        """`prefill(ids)`, reusing the last call's cache for the start `ids` shares with it:
        a keyboard extends the same text a character at a time, so only the pieces from the
        first that changed run (prefill at their positions over the cached keys and values,
        or one decode step for one piece; a position past them is masked, whatever it
        holds). Where a spawned slot may open (the gated form, `form`), the domain gate's
        class scores sum over the whole context, which a prefill from the middle cannot
        see: the new pieces (up to `STEPS`) run as decode steps, each gated by the scores
        the runtime mirrors for its position (`gate.context_scores`), or, where that mirror
        is unsure of a gate, the whole context is prefilled."""
        last, n, rows = self.typed, 0, None
        one_pass = self.form("prefill", ids) == "prefill"
        reusable = self._mirrored or one_pass and last is not None and last[3]
        if last is not None and reusable and np.array_equal(last[1], self.slots):
            common = min(len(last[0]), len(ids))
            n = next((i for i in range(common) if last[0][i] != ids[i]), common)
            if n == len(ids) == len(last[0]):
                return last[2]
        n = min(n, len(ids) - 1)  # at least the last piece runs: its logits are the answer
        if n and not one_pass:
            rows = self._gates(ids, n)
            n = n if rows is not None else 0
        if n == 0:
            out = self.prefill(ids)
        elif rows is not None:  # decode steps, each on its position's gates
            k, v = last[2][1], last[2][2]
            for pos in range(n, len(ids)):
                logits, k, v = self.decode(ids[pos], pos, k, v, rows[pos - n:pos - n + 1])
            out = [logits, k, v, rows[-1:]]
        elif n == len(ids) - 1:  # one piece: the decode program (routed, where prefill is
            # dense), on the one-pass form's gates (every spawned slot shut)
            shut = np.zeros_like(last[2][3])
            out = [*self.decode(ids[-1], n, last[2][1], last[2][2], shut), shut]
        else:
            out = self._prefill(ids, n, last[2][1], last[2][2])
        self.typed = (list(ids), self.slots.copy(), out, one_pass)
        return out

    @property
    def _mirrored(self) -> bool:
        """Whether the runtime can compute the programs' gates itself (`gate.opened`,
        `gate.context_scores`): bundles with the domain gate and its present score."""
        return (self.slots.shape[1] == 4
                and self.bundle.manifest["experts"].get("gate") == "base-and-argmax")

    def _gates(self, ids: list[int], n: int) -> np.ndarray | None:
        """The class scores [len(ids) - n, D] (float32) that gate positions n.. of `ids` as
        a prefill of all of `ids` would (`gate.context_scores`); None where they are more
        than `STEPS` or the mirror is unsure of some slot's gate at one of them."""
        if not self._mirrored or len(ids) - n > STEPS:
            return None
        table, window = self._table(), np.asarray(ids, np.int64)
        if gate.opened(table, self.slots, window)[1][:, n:].any():
            return None
        return gate.context_scores(table, window)[n:].astype(np.float32)

    def _table(self) -> np.ndarray:
        """The domain gate's class table [V, D], read from this runtime's weight file."""
        return experts.domains(self.bundle, self.backend, path=self.weights)

    def decode(self, token: int, pos: int, k: np.ndarray, v: np.ndarray,
               novelty: np.ndarray) -> list[np.ndarray]:
        """One token at `pos` -> [logits [1, V], k, v]: its keys and values written into
        `k`, `v` at `pos` (`_written`; every position from `pos` on is masked in later runs
        until written again, so branches from one context share its cache)."""
        name = self.program("decode")
        if name == "decode_gated" and self._one_pass_too and not self.opens(novelty):
            name = "decode"  # the gates the prefill left are shut: the same outputs
        out = self.engine.run(name, [np.array([[token]]), np.array([pos]), k, v, self.slots,
                                     novelty])
        return [out[0], *self._written(k, v, pos, out[1], out[2])]

    def program(self, name: str) -> str:
        """The program that serves `name` now: `NAME_gated` (the domain gate, and the spare
        slots computed) while a spawned expert exists and the bundle has that form,
        else `name` (in a bundle with spare slots: one pass, every spawned slot closed,
        the cost of a bundle without slots; export/programs.py); on a given text, `form`
        may still pick `name`."""
        gated = f"{name}_gated"
        if self.slots[:, 1].any() and gated in self.bundle.manifest["programs"]:
            return gated
        return name

    @property
    def _one_pass_too(self) -> bool:
        """Whether a gated program's one-pass form serves where no spawned slot opens
        (`form`, `opens`): on an engine whose programs share one copy of the weights (ONNX
        Runtime), where one more program costs its own buffers only; not on ExecuTorch,
        where it would cost another packed copy of the weights. Not for bundles before the
        domain gate ([L, 3, slots]: their gated programs gate on their own novelty)."""
        return getattr(self.engine, "shares_weights", False) and self.slots.shape[1] == 4

    def form(self, name: str, ids) -> str:
        """`program(name)` for a run on one window `ids`, or `name` itself where its gated
        form would open no spawned (or pool) slot at any position of it (`gate.opened`,
        sure of it; `_one_pass_too`): the one-pass program routes over the same open base
        experts (a clone's parent is open wherever the clone is shut) and never computes a
        spare slot, so it gives the gated one's outputs at the cost of a bundle without
        slots. Base text typed or scored beside a grown domain pays nothing for it."""
        gated = self.program(name)
        if gated == name or not self._one_pass_too:
            return gated
        opened, unsure = gate.opened(self._table(), self.slots, np.asarray(ids, np.int64))
        return gated if (opened | unsure)[:, :, self._live:].any() else name

    @property
    def _live(self) -> int:
        """The base experts: slots from here on are spare, spawned or pool ones."""
        return self.bundle.config.get("num_local_experts") or self.bundle.config["num_experts"]

    def opens(self, novelty: np.ndarray) -> bool:
        """Whether `prefill`'s class scores `novelty` [1, D] open a spawned (or pool) slot in
        some layer, as the programs' gates decide (`export.programs.set_gates`): `decode`
        keeps them, and where none opens serves through the one-pass program as `form`
        says. Always True for bundles before the domain gate."""
        if self.slots.shape[1] < 4:
            return True
        _, coef, threshold, cls = (a[:, self._live:] for a in self.slots.transpose(1, 0, 2))
        mine = novelty[0].astype(np.float32)[cls.astype(np.int64)]
        return bool((mine * coef >= threshold).any())

    def run(self, program: str, tokens: np.ndarray, *more: np.ndarray) -> list[np.ndarray]:
        """`score`, `observe`, `deepen{l}`, `strict{l}`, `sweep` on tokens [1, T] (and a deepen
        program's `valid`), with the bundle's slot state (`program`)."""
        return self.engine.run(self.form(program, tokens[0]), [tokens, *more, self.slots])

    def generate(self, prompt: str, max_new: int = 32) -> Iterator[str]:
        """The greedy continuation, piece by piece; stops at EOS."""
        ids = self._ids(prompt, max_new)
        logits, k, v, novelty = self.prefill(ids)
        new: list[int] = []
        text = ""
        head = self.sp.decode(ids[1:])  # decoded with the prompt: the space before a word
        for pos in range(len(ids), len(ids) + max_new):
            token = int(logits[0].argmax())
            if token == EOS:
                return
            new.append(token)
            decoded = self.sp.decode(ids[1:] + new)[len(head):]
            if not decoded.endswith("\ufffd"):  # hold back half a UTF-8 character
                yield decoded[len(text):]
                text = decoded
            logits, k, v = self.decode(token, pos, k, v, novelty)

    def suggest(self, prefix: str, k: int = 3, max_pieces: int = 6) -> list[tuple[str, float]]:
        """Top-k completions of the word being typed, each extended greedily to a word end:
        [(word, probability of its first piece)] (`suggestions` says which start a word)."""
        return [(s["word"], s["p"]) for s in self.suggestions(prefix, k, max_pieces)]

    def suggestions(self, prefix: str, k: int = 3, max_pieces: int = 6) -> list[dict]:
        """`suggest` as [{"word", "p", "new"}]: "new" when the word starts after a space
        (a next word), else it continues the prefix's last word (its rest)."""
        ids = self._ids(prefix, max_pieces)
        logits, kc, vc, novelty = self.extend(ids)
        z = logits[0].astype(np.float64)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        probs[[BOS, EOS]] = 0
        out = []
        for first in np.argsort(-probs)[:k]:
            word, kk, vv = [int(first)], kc, vc
            for pos in range(len(ids), len(ids) + max_pieces - 1):
                step, kk, vv = self.decode(word[-1], pos, kk, vv, novelty)
                token = int(step[0].argmax())
                piece = self.sp.id_to_piece(token)
                if token in (BOS, EOS) or piece.startswith("▁") or piece == "<0x0A>":
                    break
                word.append(token)
            out.append({"word": self.sp.decode(word).strip(), "p": float(probs[first]),
                        "new": self.sp.id_to_piece(int(first)).startswith("▁")})
        return out

    def score(self, text: str) -> dict:
        """{"ppl", "nll", "tokens", "top1", "top3"} exactly as `moegrow eval` defines them."""
        if not text.strip():
            raise InputError("the text is empty")
        ids = np.array([BOS] + self.sp.encode(text), np.int64)
        nll, top1, top3 = 0.0, 0, 0
        for chunk, new in self.windows(ids):
            losses, ranks = (a[new] for a in self.run("score", chunk[None])[:2])
            nll += float(losses.astype(np.float64).sum())
            top1 += int((ranks < 1).sum())
            top3 += int((ranks < 3).sum())
        n = len(ids) - 1
        backends.give_back()  # the windows' activations (`backends.give_back`)
        return {"ppl": float(np.exp(nll / n)), "nll": nll / n, "tokens": n,
                "top1": top1 / n, "top3": top3 / n}

    def deepen(self, layer: int, ids: np.ndarray, strict: bool = False) -> dict[str, np.ndarray]:
        """The default PC schedule's local updates for `layer`'s experts on one window of
        token ids ([BOS] + text, 2 to context tokens): {"dwg", "dwu" [E, F, C], "dwd"
        [E, C, F] (d nll / dW: step against them; a quantized bundle's cover its spare slots
        only, from slot "first" on), "count" [E], "nll" [W], "energy" [E], "novelty" [W, D],
        "x" [W, C], "first"} (export/pc.py), layer `layer`'s part of the bundle's
        `sweep` (bundles exported before 2026-12-02: their `deepen{layer}` program).
        `strict`: the strict PC schedule (`strict{layer}`, bundles exported with
        --strict-steps), which adds "free_energy" [steps + 1] and "steps_used" [1]."""
        name = f"{'strict' if strict else 'deepen'}{layer}"
        if strict or name in self.bundle.manifest["programs"]:
            out = dict(zip(DEEPEN + ("free_energy", "steps_used") * strict,
                           self.run(name, *self._window(ids)), strict=True))
            return out | {"first": self._first(out)}
        if not 0 <= layer < self.bundle.config["num_hidden_layers"]:
            raise InputError(f"layer {layer} is not a layer of this model")
        return {k: v if k in ("nll", "novelty", "first") else v[layer]
                for k, v in self.sweep(ids).items()}

    def _window(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A deepening program's tokens [1, W] (`ids` padded) and valid [W]."""
        window = self.bundle.context
        if not 2 <= len(ids) <= window:
            raise InputError(f"a deepening window takes 2 to {window} tokens, got {len(ids)}")
        tokens = np.zeros((1, window), np.int64)
        tokens[0, :len(ids)] = ids
        return tokens, (np.arange(window) < len(ids) - 1).astype(np.float32)

    def sweep(self, ids: np.ndarray, program: str = "sweep") -> dict[str, np.ndarray]:
        """Every layer's local updates at once on one window: one forward pass and one
        top-down transport (the bundle's `sweep` program, bundles exported since
        2026-12-02, or `sweep_spare`), as `deepen`'s for each layer with a leading layer
        axis on "dwg", "dwu", "dwd", "count", "energy" and "x" ("nll" and "novelty" once),
        and "first": the first slot the gradients cover (0; a quantized bundle's and
        `sweep_spare`'s cover the spare slots only: dwg[..., s - first, :, :] is slot s's;
        none covers a pool slot)."""
        out = dict(zip(DEEPEN, self.run(program, *self._window(ids)), strict=True))
        return out | {"first": self._first(out)}

    def _first(self, out: dict) -> int:
        """The first slot a deepening program's gradients cover: they end at the pool's
        slots (never trained: `compress`), the counts cover every slot."""
        pool = self.bundle.config.get("pool_experts", 0)
        return out["count"].shape[-1] - pool - out["dwg"].shape[-3]

    def adam(self, weights: list[np.ndarray], grads: list[np.ndarray], first: list[np.ndarray],
             second: list[np.ndarray], hyper: np.ndarray) -> list[np.ndarray]:
        """One Adam step on one expert through the bundle's `adam` program (`export/pc.py`):
        [gate, up, down] of its weights, of the gradients summed over the step's tokens and
        of the two moments, and hyper [5] = (lr, 1 / (1 - beta1^t), 1 / (1 - beta2^t),
        1 / tokens, eps) -> the new weights, first and second moments (3 arrays each)."""
        return self.engine.run("adam", [*weights, *grads, *first, *second, hyper])

    def idle(self, seconds: float, domain: str | None = None, progress=None,
             interrupt: backends.Interrupt | None = None, policy=None, **limits) -> dict:
        """One growth slice of at most `seconds` for `domain` (default: the observed domain
        the error map most wants grown); `limits`: fields of `growth.Limits`; `progress`
        gets a line per stage; `interrupt`, set from another thread, ends the slice's
        learning and guard runs (`backends.Interrupted` is raised; nothing is committed, the
        working copy is removed); `policy`, the app's rule for when growth may run
        (charging, screen off), a callable -> None or why not, asked before the slice and
        before every PC step (`growth.idle`). Returns what it did (`growth.idle`). A plan
        that finds no free spare slot for an expert it names first has, in a bundle with a
        quantized pool, other domains' clones compressed into the pool (`compress.compress`,
        each guarded; the most converged domain first, `compress.ripe`, until the layers
        have a slot), then (every bundle) in layers still full the least earning of other
        domains' spawned experts retired (`compress.retire`); "reclaimed": their reports.
        The serving programs' sessions are dropped for the slice ("released"); after it the
        new version's serving programs load, or without a commit those released
        ("prepare_seconds"), and stay loaded in the forms loaded before the slice
        ("loaded": the programs loaded after it)."""
        def reclaim(growing: str, layers: list[int]) -> list[dict]:
            out = []
            ripe = compress.ripe(self.bundle, errormap.Store(self.bundle.path).read(), layers,
                                 growing) if self.bundle.config.get("pool_experts") else []
            for x in ripe:  # the most converged first, until every layer has a free slot
                if all(compress.has_free(self.bundle, layer) for layer in layers):
                    break
                out.append(compress.compress(self, x["domain"], progress) | {
                    "converged": x["converged"], "drift": x["drift"]})
            return out + compress.retire(self, layers, growing, progress)
        forms = ("prefill", "decode", "score")  # and the one-pass ones too (`form`)
        held = getattr(self.engine, "held", set)()  # the torch reference holds none
        loaded = {f for f in forms if {f, f"{f}_gated"} & held}
        report = growth.idle(self, seconds, domain, growth.Limits(**limits), progress,
                             reclaim, interrupt, policy)
        # the new version's serving programs, or those the slice released, now, not at the
        # next keystroke: ONNX Runtime writes their shared packed weights as it first loads
        # them (`backends.OnnxRuntime.prepare`), which takes seconds on a larger model. Only
        # the forms the process had loaded before the slice stay loaded (a process that never
        # typed holds no keyboard session); the others' packs are written and their
        # sessions dropped, to map them at their first run
        names = [*dict.fromkeys([*map(self.program, forms), *forms * self._one_pass_too])]
        keep = {n for n in names if n.removesuffix("_gated") in loaded}
        if not report["committed"]:
            names = keep = report.get("released")
        prepare = getattr(self.engine, "prepare", None)  # the torch reference has none
        if names and prepare:
            start = time.monotonic()
            prepare(names, set(keep))
            report["prepare_seconds"] = time.monotonic() - start
        report["loaded"] = sorted(getattr(self.engine, "held", set)())
        backends.give_back()  # the slice's working copy and activations, freed
        return report

    def windows(self, ids: np.ndarray) -> Iterator[tuple[np.ndarray, slice]]:
        return windows(ids, self.bundle.context)

    def observe(self, text: str, domain: str | None = None) -> dict:
        """Score `text` with the error taps and add them to the bundle's error map (and its
        tokens to the replay buffer) under `domain`; returns what was added."""
        if not text.strip():
            raise InputError("the text is empty")
        domain = domain or "default"
        ids = np.array([BOS] + self.sp.encode(text), np.int64)
        experts = layout.dims(self.bundle.config)[0]
        folded = np.zeros((self.bundle.config["num_hidden_layers"], experts, 3))
        losses = []
        for chunk, new in self.windows(ids):
            out = dict(zip(OBSERVE, self.run("observe", chunk[None]), strict=True))
            losses.append(out["nll"][new].astype(np.float64))
            folded += errormap.fold(out["ids"][:, new], out["update"][:, new], experts)
        nll = np.concatenate(losses)
        store = errormap.Store(self.bundle.path)
        saved = learnable.saved(store.replay(domain), ids, nll)
        window = self.bundle.context
        replay = [ids[i:i + window] for i in range(0, len(ids), window)]
        store.add(domain, folded, len(nll), float(nll.sum()), float((nll * nll).sum()), replay,
                  saved)
        backends.give_back()
        return {"domain": domain, "tokens": len(nll), "nll": float(nll.mean()),
                "ppl": float(np.exp(nll.mean()))}


def open(path: str | Path, backend: str = "executorch", threads: int | None = None) -> Runtime:
    """Load and verify a bundle, then bind it to an engine."""
    return Runtime(bundle_format.load(path), backend, threads)

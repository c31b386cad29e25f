"""Predictive-coding deepening programs (PC.md): local updates for one layer's experts.

`Deepen(model, layer, length)` is the default schedule, fixed-prediction exact: value nodes
start at their feed-forward values, predictions stay fixed, eta = 1, one top-down sweep. The
error that reaches the layer's output is then exactly d nll / d z_{layer+1}, and the local
updates of every expert of the layer (PC.md, "Local weight updates") are the NLL gradient
restricted to those experts, with every router's gates and top-k held fixed.

The sweep is written once, in torch, as the gradient of the windowed NLL (`Loss`), taken a
layer at a time (`Layered`: each layer's activations are made again from its input when
the error reaches it, so a sweep holds one layer's, not all): at export time
`torch.func.vjp` is traced by `make_fx` into plain aten ops (the VJPs of every sublayer
above the layer, the final norm's and the head's), so the program the engines run contains
no autograd and the device never traces anything. Two details make that trace exportable:
attention runs through the explicit (cached-path) matmuls, since the decomposition of
SDPA's CPU backward gives wrong gradients, and the one `empty_permuted` buffer the trace
leaves (fully overwritten) becomes `zeros`, which ExecuTorch accepts.

Inputs: tokens [1, W] and valid [W] (1 where position t's next token is a real target; a
window shorter than W is padded at the end, which causal attention never lets earlier
positions see). Outputs, for the E experts and S spare slots of the layer (the program
differentiates both sets of linears, `moe.Slots`, and stacks them): dwg, dwu
[E + S, F, C], dwd [E + S, C, F] (d nll_sum / dW: step against them), count [E + S] (valid
tokens routed to each), nll [W], and energy [E + S] = sum over its tokens of |g_k eps|^2,
eps the error at the layer's output.

A quantized bundle's programs (`bits` 8 or 4) run its frozen linears as the serving programs
hold them (`frozen.Frozen`: their codes and scales, dequantized in the graph; no fp32 copy
of them in the weight file) and differentiate only the spare slots: dwg, dwu, dwd cover the
last S slots ([S, F, C], [S, C, F]), the rest of the outputs every slot.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import frozen, moe, programs
from .models import layers

OUTPUTS = ("dwg", "dwu", "dwd", "count", "nll", "energy", "novelty", "x")


def expert_weights(mlp: moe.DenseMoE, spare: bool = False) -> list[str]:
    """The names, inside a MoE block, of the weights of its trainable experts: the base
    experts' gate, up, down (unless `frozen.Frozen`: a quantized bundle's, or `spare`),
    then the spare slots' (`moe.Slots`)."""
    base = isinstance(mlp.gate_proj, nn.Linear) and not spare
    names = ["gate_proj", "up_proj", "down_proj"] * base
    return [f"{n}.weight" for n in names + ["spare_gate", "spare_up", "spare_down"] * bool(
        mlp.spare)]


def _model(model: layers.CausalLM, bits: int) -> layers.CausalLM:
    """The deepening programs' copy of `model`: `moe.FixedRouteMoE` blocks, and at `bits` < 32
    the quantized bundle's frozen linears (`frozen.freeze`)."""
    out = programs.with_moe(model, moe.FixedRouteMoE)
    return out if bits == 32 else frozen.freeze(out, bits)


def stack(f: int, grads: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Gradients of `expert_weights(mlp)` (experts of hidden size `f`) -> per slot: gate, up
    [E + S, F, C], down [E + S, C, F]."""
    c = grads[0].shape[1]
    parts = [grads[i:i + 3] for i in range(0, len(grads), 3)]
    return (torch.cat([g.reshape(-1, f, c) for g, _, _ in parts]),
            torch.cat([u.reshape(-1, f, c) for _, u, _ in parts]),
            torch.cat([d.reshape(c, -1, f).permute(1, 0, 2) for _, _, d in parts]))


def _gate(model: layers.CausalLM, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`programs.gate`, held fixed for the gradient."""
    return programs.gate(model, tokens, slots).detach()


class Loss(nn.Module):
    """(tokens [1, W], valid [W], probe [N, W, C], slots) -> (summed NLL, (nll [W], gates
    [N, W, E], the gate's class scores [W, D] ("novelty"), the router inputs [N, W, C])) for
    the N layers `at`; probe n is added to layer at[n]'s output, so d loss / d probe is the
    error arriving there. The gates are set as in every program (`programs.gate`). `bits`:
    the bundle's (`_model`). The eager reference: the programs take its gradients with
    `Layered`."""

    def __init__(self, model: layers.CausalLM, at: list[int], bits: int = 32):
        super().__init__()
        self.model = _model(model, bits)
        self.at = at

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, probe: torch.Tensor,
                slots: torch.Tensor):
        m = self.model
        nov = _gate(m, tokens, slots)
        pos = torch.arange(tokens.shape[1])
        cos, sin = layers.rope(pos, m.args.dim_head, m.args.rope_theta)
        cache = programs.Cache()  # no past
        x = m.model.embed_tokens(tokens)
        gates, router_in = [], []
        for i, block in enumerate(m.model.layers):
            x, _ = block(x, cos, sin, pos, cache)
            if i in self.at:
                x = x + probe[self.at.index(i)]
                gates.append(block.mlp.last)
                router_in.append(block.mlp.input)
        nll = programs.losses(m.lm_head(m.model.norm(x))[0].float(), tokens)[0] * valid
        return nll.sum(), (nll, torch.stack(gates), nov, torch.stack(router_in))


def _fresh(module: nn.Module, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Copies of `module`'s buffers (a quantized bundle's codes and scales) made to depend
    on `t`: the weights the module dequantizes from them are computed once `t` is, not
    hoisted to the start of the program by an engine (and held live from there)."""
    ready = t.reshape(-1)[0] == t.reshape(-1)[0]
    return {n: torch.where(ready, b, b) for n, b in module.named_buffers()}


class Layered(nn.Module):
    """`loss`'s gradients a layer at a time (checkpointed per layer): the forward keeps each
    layer's input, then the top-down transport runs each layer again from its input as the
    error reaches it and takes that layer's VJP (its input's error, its `targets`'
    gradients). The same numbers as `torch.func.grad` of `Loss`, with one layer's
    activations live instead of every layer's (a dense MoE's hidden over all its experts is
    most of them), for a second forward of every layer but the top one (whose activations
    stay live until its VJP anyway). The second run reads the error arriving at the layer
    (times 0), so that no engine merges it with the first or runs it before the layers
    above are done; it reads the first run's dequantized weights (one node each after
    `_trace`'s CSE), which stay live from the forward to that layer's VJP.

    `lean` (ONNX Runtime's quantized programs): the top layer runs again too, each second
    run dequantizes its layer's weights again (`_fresh` of that run's input, so no engine
    merges the two; the int4 sweep's peak in use 59 -> 46 MB for ~5% more time), and the
    head runs over chunks of tokens (`_chunked_head`; `chunked` alone: ONNX Runtime's fp32
    programs). ExecuTorch's portable kernels dequantize slowly (+47% a sweep); an fp32
    sweep has nothing to dequantize."""

    chunk = 64  # tokens per chunk of a lean sweep's loss head (`_chunked_head`)

    def __init__(self, loss: Loss, targets: list[str], lean: bool = False,
                 chunked: bool = False):
        super().__init__()
        self.loss, self.targets, self.lean, self.chunked = loss, targets, lean, chunked or lean

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor):
        m, at = self.loss.model, self.loss.at
        blocks = m.model.layers
        nov = _gate(m, tokens, slots)
        pos = torch.arange(tokens.shape[1])
        cos, sin = layers.rope(pos, m.args.dim_head, m.args.rope_theta)

        def layer(i: int, x: torch.Tensor, bufs: dict[str, torch.Tensor]):
            """Layer i's output on x as a function of x and its targets (for `vjp`), with
            the gates and router inputs it saw; its codes and scales `bufs`."""
            def run(x, weights):
                out = torch.func.functional_call(blocks[i], bufs | weights,
                                                 (x, cos, sin, pos, programs.Cache()))
                return out[0], (blocks[i].mlp.last, blocks[i].mlp.input)
            prefix = f"model.model.layers.{i}."
            mine = {n[len(prefix):]: functools.reduce(getattr, n[len(prefix):].split("."),
                                                      blocks[i])
                    for n in self.targets if n.startswith(prefix)}
            return torch.func.vjp(run, x, mine, has_aux=True)

        x = m.model.embed_tokens(tokens)
        inputs, fresh, vjps, gates, router_in = [], [], {}, [], []
        for i in range(len(blocks)):
            inputs.append(x)
            fresh.append(_fresh(blocks[i], x))
            # the top layer's activations stay live until its VJP anyway (the head's comes
            # between): kept, not recomputed, unless lean
            x, vjp, (g, r) = layer(i, x, fresh[i])
            if i == len(blocks) - 1 and not self.lean:
                vjps[i] = vjp
            if i in at:
                gates.append(g)
                router_in.append(r)

        def head(x):
            logits = torch.func.functional_call(m.lm_head, _fresh(m.lm_head, x),
                                                (m.model.norm(x),))
            nll = programs.losses(logits[0].float(), tokens)[0] * valid
            return nll.sum(), nll

        err, nll = (self._chunked_head(x, tokens, valid) if self.chunked
                    else torch.func.grad(head, has_aux=True)(x))
        grads, eps = {}, []
        for i in range(len(blocks) - 1, min(at) - 1, -1):
            if i in at:
                eps.insert(0, err[0])
            if i not in vjps:
                x = inputs[i] + 0 * err[0, 0, 0]
                vjps[i] = layer(i, x, _fresh(blocks[i], x) if self.lean else fresh[i])[1]
            vjp = vjps.pop(i)
            err, dw = vjp(err)
            grads |= {f"model.model.layers.{i}.{n}": g for n, g in dw.items()}
        return ([grads[t] for t in self.targets], torch.stack(eps), nll, torch.stack(gates),
                nov, torch.stack(router_in))

    def _chunked_head(self, x: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor):
        """`head`'s gradient and NLL `chunk` tokens at a time (`programs.chunked_nll_grad`):
        one chunk's [chunk, vocab] tensors live, not the window's (docs/benchmarks.md)."""
        m = self.loss.model
        return programs.chunked_nll_grad(
            lambda x: torch.func.functional_call(m.lm_head, _fresh(m.lm_head, x),
                                                 (m.model.norm(x),))[0].float(),
            x, tokens, valid, self.chunk)


def _cse(g: torch.fx.Graph) -> None:
    """One node for equal computations (`Layered`'s second run of a layer dequantizes the
    weights its first run did; ExecuTorch runs the graph as it is): an op with a schema
    that mutates nothing and gives values (not `empty`'s), on the same arguments as an
    earlier node, is that node."""
    def key(a):
        if isinstance(a, (list, tuple)):
            return tuple(key(x) for x in a)
        return tuple(sorted((k, key(v)) for k, v in a.items())) if isinstance(a, dict) else a

    seen = {}
    for node in list(g.nodes):
        schema = getattr(node.target, "_schema", None)
        if (node.op != "call_function" or schema is None or schema.is_mutable
                or schema.name.startswith("aten::empty")):
            continue
        k = (node.target, key(node.args), key(node.kwargs))
        if k in seen:
            node.replace_all_uses_with(seen[k])
            g.erase_node(node)
        else:
            seen[k] = node


def _trace(fn, module: nn.Module, example: tuple[torch.Tensor, ...], symbolic: bool = False):
    """`fn(params, buffers, *example)` traced by make_fx into plain aten ops (no autograd
    left), with the one fully overwritten `empty_permuted` buffer made `zeros` for
    ExecuTorch, and every matrix product written as a batch of one (`bmm`): XNNPACK
    delegates `mm` only with a constant weight in the layout of a linear, which the
    backward's products (an expert's weight gradient, the input gradient through a
    transposed weight) are not, and ExecuTorch's portable `mm` is a naive loop. All as
    `bmm`, a deepening sweep ran in 47 ms instead of 82 on ExecuTorch (tiny model,
    docs/growth.md)."""
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(fn, decomposition_table=core_aten_decompositions(),
                    tracing_mode="symbolic" if symbolic else "real")(
        [p.detach() for p in module.parameters()], list(module.buffers()), *example)
    g = graph.graph
    _cse(g)
    for node in list(g.nodes):
        if node.target == torch.ops.aten.empty_permuted.default:
            node.target, node.args = torch.ops.aten.zeros.default, (node.args[0],)
        elif node.target == torch.ops.aten.mm.default:
            with g.inserting_before(node):
                a, b = (g.call_function(torch.ops.aten.unsqueeze.default, (x, 0))
                        for x in node.args)
                out = g.call_function(torch.ops.aten.squeeze.dim, (
                    g.call_function(torch.ops.aten.bmm.default, (a, b)), 0))
            node.replace_all_uses_with(out)
            g.erase_node(node)
    graph.recompile()
    return graph


class Deepen(nn.Module):
    """The fixed-prediction exact sweep for `layer`'s experts on windows of `length` tokens."""

    outputs = OUTPUTS
    fold_weights = False  # ONNX: keep the weights' transposes as ops (lower.to_onnx)
    quantize = False  # of a quantized bundle: built on `quantize.dequantized`, lowered as is

    def __init__(self, model: layers.CausalLM, layer: int, length: int, bits: int = 32):
        super().__init__()
        self._build(model, [layer], length, bits)

    def _build(self, model: layers.CausalLM, at: list[int], length: int, bits: int,
               spare: bool = False, lean: bool = False, rows: bool = False,
               chunked: bool = False) -> None:
        targets, names, buffers = self._setup(Loss(model, at, bits), at, length, spare)
        for block in self.loss.model.model.layers:
            block.mlp.rows = rows
        layered = Layered(self.loss, targets, lean, chunked)

        def sweep(params, bufs, tokens, valid, slots):
            state = dict(zip(names, params, strict=True)) | dict(zip(buffers, bufs, strict=True))
            d, *out = torch.func.functional_call(layered, {f"loss.{n}": t for n, t in
                                                           state.items()},
                                                 (tokens, valid, slots))
            return *d, *out

        # rows: data-dependent shapes (NonZero), traced symbolically
        self.sweep = _trace(sweep, self.loss, self.example()[0], symbolic=rows)

    def _setup(self, loss: nn.Module, at: list[int], length: int, spare: bool = False):
        """Hold `loss` (whose parameters the traced sweep reads) -> the names of the expert
        weights of the layers `at` (`expert_weights`), of every parameter and of every
        buffer."""
        self.loss, self.length, self.at = loss, length, at
        # not `self.mlp`: a second name for the layer's weights in the exported program,
        # the same in every deepen{l}, makes ExecuTorch's weight file keep one layer's only
        mlps = [loss.model.model.layers[i].mlp for i in at]
        self.hidden = mlps[0].hidden
        self.targets = [f"model.model.layers.{i}.mlp.{n}" for i, mlp in zip(at, mlps,
                                                                            strict=True)
                        for n in expert_weights(mlp, spare)]
        return (self.targets, [n for n, _ in loss.named_parameters()],
                [n for n, _ in loss.named_buffers()])

    def example(self) -> tuple[tuple[torch.Tensor, ...], None]:
        return (torch.zeros(1, self.length, dtype=torch.long), torch.ones(self.length),
                programs.slot_state(self.loss.model)), None

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor,
                slots: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        slots = programs.slot_state(self.loss.model) if slots is None else slots
        out = self.sweep(list(self.loss.parameters()), list(self.loss.buffers()), tokens,
                         valid, slots)
        n = len(self.targets)
        eps, nll, gates, nov, x, *extra = out[n:]
        if eps.dim() == 3:  # Loss's [N, W, .] (the strict schedule's are one layer's)
            eps, gates, x = eps[0], gates[0], x[0]
        live = gates * valid[:, None]  # [W, E + S]
        energy = F.linear((live * live).T, (eps * eps).sum(-1)[None])[:, 0]
        count = (live > 0).float().sum(0)
        return (*stack(self.hidden, list(out[:n])), count, nll, energy, nov, x, *extra)


class Sweep(Deepen):
    """The fixed-prediction exact sweep for the experts of every layer at once: one
    forward pass and one top-down transport (the NLL's backward) give each layer's local
    updates, as `deepen{l}` gives one layer's. Outputs as `Deepen`'s with a leading layer
    axis [L, ...] on dwg, dwu, dwd, count, energy and x (nll [W], novelty [W, D] once).
    With `spare`, the gradients of the spare slots only (as a quantized bundle's always
    are): an fp32 bundle's `sweep_spare`, for a slice that trains clones alone, without
    the base experts' weight gradients (a quarter of an fp32 sweep's time). ONNX Runtime's
    programs: `lean` and `chunked` (`Layered`'s) and `rows` (each expert on the rows of the
    tokens that chose it, `moe.FixedRouteMoE`; traced with symbolic shapes, `_trace`)."""

    def __init__(self, model: layers.CausalLM, length: int, bits: int = 32,
                 spare: bool = False, lean: bool = False, rows: bool = False,
                 chunked: bool = False):
        nn.Module.__init__(self)
        self._build(model, list(range(model.args.num_hidden_layers)), length, bits, spare,
                    lean, rows, chunked)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor,
                slots: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        slots = programs.slot_state(self.loss.model) if slots is None else slots
        out = self.sweep(list(self.loss.parameters()), list(self.loss.buffers()), tokens,
                         valid, slots)
        n, per = len(self.targets), len(self.targets) // len(self.at)
        eps, nll, gates, nov, x = out[n:]
        live = gates * valid[None, :, None]  # [L, W, E + S]
        energy = torch.bmm((live * live).transpose(1, 2), (eps * eps).sum(-1)[..., None])
        grads = [stack(self.hidden, list(out[i:i + per])) for i in range(0, n, per)]
        return (*[torch.stack(g) for g in zip(*grads, strict=True)], (live > 0).float().sum(1),
                nll, energy[..., 0], nov, x)


class Adam(nn.Module):
    """One Adam step (torch.optim.Adam's, bias-corrected) on one expert's weights: growth's
    optimizer as a program (DESIGN rule 1: the device's math runs in the engines).

    Inputs: the expert's gate, up [F, C], down [C, F]; the gradients summed over the step's
    tokens, in the same shapes; the first and the second moments of each; and `hyper` [5]
    = (lr, 1 / (1 - beta1^t), 1 / (1 - beta2^t), 1 / tokens, eps). Outputs: the new weights,
    then the new first and second moments (`outputs`). eps is an input because torch's ONNX
    exporter drops an added constant of 1e-8 (1e-7 and more it keeps): a slot no token
    reached then stepped to 0 / 0."""

    outputs = ("gate", "up", "down", "m_gate", "m_up", "m_down", "v_gate", "v_up", "v_down")
    quantize = False  # no weights: plain fp32 arithmetic in every bundle
    betas = (0.9, 0.999)

    def __init__(self, model: layers.CausalLM):
        super().__init__()
        _, hidden, width = model.model.layers[0].mlp.experts.gate_proj.shape
        self.shapes = [(hidden, width)] * 2 + [(width, hidden)]

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w, g, m, v, hyper = args[0:3], args[3:6], args[6:9], args[9:12], args[12]
        b1, b2 = self.betas
        ws, ms, vs = [], [], []
        for wi, gi, mi, vi in zip(w, g, m, v, strict=True):
            gi = gi * hyper[3]
            mi = b1 * mi + (1 - b1) * gi
            vi = b2 * vi + (1 - b2) * gi * gi
            ws.append(wi - hyper[0] * (mi * hyper[1]) / (torch.sqrt(vi * hyper[2]) + hyper[4]))
            ms.append(mi)
            vs.append(vi)
        return (*ws, *ms, *vs)

    def example(self) -> tuple[tuple[torch.Tensor, ...], None]:
        return (*[torch.zeros(s) for s in self.shapes * 4], torch.ones(5)), None

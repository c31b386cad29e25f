"""Predictive-coding deepening programs (PC.md): local updates for one layer's experts.

`Deepen(model, layer, length)` is the default schedule, fixed-prediction exact: value nodes
start at their feed-forward values, predictions stay fixed, eta = 1, one top-down sweep. The
error that reaches the layer's output is then exactly d nll / d z_{layer+1}, and the local
updates of every expert of the layer (PC.md, "Local weight updates") are the NLL gradient
restricted to those experts, with every router's gates and top-k held fixed.

The sweep is written once, in torch, as the gradient of the windowed NLL: at export time
`torch.func.grad` is traced by `make_fx` into plain aten ops (the VJPs of every sublayer above
the layer, the final norm's and the head's), so the program the engines run contains no
autograd and the device never traces anything. Two details make that trace exportable:
attention runs through the explicit (cached-path) matmuls, since the decomposition of
SDPA's CPU backward gives wrong gradients, and the one `empty_permuted` buffer the trace
leaves (fully overwritten) becomes `zeros`, which ExecuTorch accepts.

Inputs: tokens [1, W] and valid [W] (1 where position t's next token is a real target; a
window shorter than W is padded at the end, which causal attention never lets earlier
positions see). Outputs, for the E experts of the layer: dwg, dwu [E, F, C], dwd [E, C, F]
(d nll_sum / dW: step against them), count [E] (valid tokens routed to each), nll [W], and
energy [E] = sum over its tokens of |g_k eps|^2, eps the error at the layer's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import programs
from .models import layers

OUTPUTS = ("dwg", "dwu", "dwd", "count", "nll", "energy")


class FixedRouteMoE(programs.DenseMoE):
    """`DenseMoE` whose gates are constants for the gradient (the router is held fixed)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, ids = self.route(x)
        gates = torch.zeros_like(logits).scatter(1, ids, weights).detach()  # [N, E]
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        self.last = gates
        out = self.down_proj((h.reshape(-1, self.experts, self.hidden) * gates[:, :, None])
                             .reshape(-1, self.experts * self.hidden))
        return out.reshape(shape), logits


class Loss(nn.Module):
    """(tokens [1, W], valid [W], probe [W, C]) -> (summed NLL, (nll [W], gates [W, E])); the
    probe is added to the layer's output, so d loss / d probe is the error arriving there."""

    def __init__(self, model: layers.CausalLM, layer: int):
        super().__init__()
        self.model = programs.with_moe(model, FixedRouteMoE)
        self.layer = layer

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, probe: torch.Tensor):
        m = self.model
        pos = torch.arange(tokens.shape[1])
        cos, sin = layers.rope(pos, m.args.dim_head, m.args.rope_theta)
        cache = programs.Cache(*programs.empty_cache(m, tokens.shape[1]))
        x = m.model.embed_tokens(tokens)
        gates = None
        for i, block in enumerate(m.model.layers):
            x, _ = block(x, cos, sin, pos, cache)
            if i == self.layer:
                x = x + probe
                gates = block.mlp.last
        nll = programs.losses(m.lm_head(m.model.norm(x))[0].float(), tokens)[0] * valid
        return nll.sum(), (nll, gates)


class Deepen(nn.Module):
    """The fixed-prediction exact sweep for `layer`'s experts on windows of `length` tokens."""

    outputs = OUTPUTS
    fold_weights = False  # ONNX: keep the weights' transposes as ops (lower.to_onnx)

    def __init__(self, model: layers.CausalLM, layer: int, length: int):
        super().__init__()
        from torch._decomp import core_aten_decompositions
        from torch.fx.experimental.proxy_tensor import make_fx

        self.loss = Loss(model, layer)
        self.length = length
        mlp = self.loss.model.model.layers[layer].mlp
        self.experts, self.hidden = mlp.experts, mlp.hidden
        prefix = f"model.model.layers.{layer}.mlp."
        targets = [f"{prefix}{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
        names = [n for n, _ in self.loss.named_parameters()]
        buffers = [n for n, _ in self.loss.named_buffers()]
        width = model.args.hidden_size

        def sweep(params, bufs, tokens, valid):
            state = dict(zip(names, params, strict=True)) | dict(zip(buffers, bufs, strict=True))

            def loss(target, probe):
                return torch.func.functional_call(self.loss, state | target,
                                                  (tokens, valid, probe))

            (d, eps), (nll, gates) = torch.func.grad(loss, argnums=(0, 1), has_aux=True)(
                {n: state[n] for n in targets}, torch.zeros(tokens.shape[1], width))
            return d[targets[0]], d[targets[1]], d[targets[2]], eps, nll, gates

        example = self.example()[0]
        graph = make_fx(sweep, decomposition_table=core_aten_decompositions())(
            [p.detach() for p in self.loss.parameters()], list(self.loss.buffers()), *example)
        for node in graph.graph.nodes:  # a fully overwritten buffer; ExecuTorch wants zeros
            if node.target == torch.ops.aten.empty_permuted.default:
                node.target, node.args = torch.ops.aten.zeros.default, (node.args[0],)
        graph.recompile()
        self.sweep = graph

    def example(self) -> tuple[tuple[torch.Tensor, torch.Tensor], None]:
        return (torch.zeros(1, self.length, dtype=torch.long), torch.ones(self.length)), None

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dg, du, dd, eps, nll, gates = self.sweep(list(self.loss.parameters()),
                                                 list(self.loss.buffers()), tokens, valid)
        e, f, c = self.experts, self.hidden, dg.shape[1]
        live = gates * valid[:, None]  # [W, E]
        energy = F.linear((live * live).T, (eps * eps).sum(-1)[None])[:, 0]
        count = (live > 0).float().sum(0)
        return (dg.reshape(e, f, c), du.reshape(e, f, c), dd.reshape(c, e, f).permute(1, 0, 2),
                count, nll, energy)

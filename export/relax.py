"""Strict predictive coding's programs (PC.md, "Schedules"): the free energy over the value
nodes above a layer (`Energy`) and its relaxation before the local updates (`Strict`,
prospective configuration), beside the default fixed-prediction exact schedule of
`pc.Deepen`, which they share their setup, trace and outputs with. `moegrow export
--strict-steps` writes them; tools/strict.py measures their schedules.
"""

from __future__ import annotations

import torch
from torch import nn

from . import programs
from .models import layers
from .pc import OUTPUTS, Deepen, _gate, _model, _trace


class Energy(nn.Module):
    """PC's free energy over the value nodes above `layer` (PC.md, "Value nodes and energy").

    Nodes: z_{layer+1}, then u_i and z_{i+1} for every block i above, each [1, W, C]; the
    residual stream below is clamped (`base` = u_layer). Gates stay at their feed-forward
    values. `forward(tokens, valid)` is the feed-forward pass -> (nodes, gates, base, nll);
    `forward(tokens, valid, nodes, gates, base)` -> F = sum over valid positions of
    1/2 |v - mu(parent)|^2 over the nodes plus the NLL of the head on the top node."""

    def __init__(self, model: layers.CausalLM, layer: int, bits: int = 32):
        super().__init__()
        self.model = _model(model, bits)
        self.layer = layer

    def _attention(self, block, x, rope):
        cache = programs.Cache()  # no past
        return block.self_attn(block.input_layernorm(x), *rope, cache)

    @staticmethod
    def _moe(block, u, gates):
        return block.mlp.combine(block.post_attention_layernorm(u)[0], gates)[0][None]

    def forward(self, tokens, valid, slots, nodes=None, gates=None, base=None):
        m = self.model
        blocks = m.model.layers
        if nodes is None:
            rope = self._rope(tokens)
            nov = _gate(m, tokens, slots)
            x, nodes, gates = m.model.embed_tokens(tokens), [], []
            for i, block in enumerate(blocks):
                u = x + self._attention(block, x, rope)
                x = u + block.mlp(block.post_attention_layernorm(u))[0]
                gates.append(block.mlp.last)
                if i == self.layer:
                    base, router_in = u, block.mlp.input
                nodes += ([u] if i > self.layer else []) + ([x] if i >= self.layer else [])
            nll = programs.losses(m.lm_head(m.model.norm(x))[0].float(), tokens)[0] * valid
            return nodes, gates, base, nll, nov, router_in
        eps, nll = self.errors(tokens, nodes, gates, base)
        energy = sum(0.5 * (e[0] * e[0]).sum(-1) for e in eps)
        return ((energy + nll) * valid).sum()

    def _rope(self, tokens):
        pos = torch.arange(tokens.shape[1])
        return (*layers.rope(pos, self.model.args.dim_head, self.model.args.rope_theta), pos)

    def _predictions(self, tokens, gates, base):
        """Each node's prediction from its parent's value: one function per node."""
        blocks, rope = self.model.model.layers, self._rope(tokens)
        yield lambda _: base + self._moe(blocks[self.layer], base, gates[self.layer])
        for i in range(self.layer + 1, len(blocks)):
            yield lambda prev, b=blocks[i]: prev + self._attention(b, prev, rope)
            yield lambda u, b=blocks[i], g=gates[i]: u + self._moe(b, u, g)

    def errors(self, tokens, nodes, gates, base):
        """The nodes' errors eps_v = v - mu(parent) and the head's NLL [W] on the top node."""
        parents = [None, *nodes[:-1]]
        eps = [v - mu(p) for v, p, mu in zip(nodes, parents,
                                             self._predictions(tokens, gates, base),
                                             strict=True)]
        nll = programs.losses(self.model.lm_head(self.model.model.norm(nodes[-1]))[0].float(),
                              tokens)[0]
        return eps, nll

    def compose(self, tokens, errors, gates, base):
        """Error-space PC's nodes: v_i = mu_i(v_{i-1}) + e_i from the errors up."""
        nodes, prev = [], None
        for e, mu in zip(errors, self._predictions(tokens, gates, base), strict=True):
            prev = mu(prev) + e
            nodes.append(prev)
        return nodes


class Strict(Deepen):
    """Strict PC (prospective configuration; PC.md "Schedules"): from the feed-forward
    values, `steps` relaxation steps v <- v - eta dF/dv over the nodes above `layer`,
    predictions recomputed each step; halts (keeping the last accepted values) as soon as F
    rises. The local updates are then dF/dW for the layer's experts at the relaxed values.
    Outputs as `Deepen`'s, with `nll` the feed-forward NLL and two more: free_energy
    [steps + 1] (F after each accepted step) and steps_used [1]."""

    outputs = (*OUTPUTS, "free_energy", "steps_used")

    def __init__(self, model: layers.CausalLM, layer: int, length: int, steps: int,
                 eta: float = 0.1, bits: int = 32):
        nn.Module.__init__(self)
        targets, names, buffers = self._setup(Energy(model, layer, bits), [layer], length)

        def relax(params, bufs, tokens, valid, slots):
            state = dict(zip(names, params, strict=True)) | dict(zip(buffers, bufs, strict=True))

            def free(nodes, target=None):
                return torch.func.functional_call(self.loss, state | (target or {}),
                                                  (tokens, valid, slots, nodes, gates, base))

            nodes, gates, base, nll, nov, x = torch.func.functional_call(
                self.loss, state, (tokens, valid, slots))
            last, f_last, alive, used, trace = nodes, torch.tensor(float("inf")), 1.0, 0.0, []
            for step in range(steps + 1):
                grad, f = torch.func.grad_and_value(free)(nodes)
                ok = alive * (f <= f_last).float()  # F did not rise: keep this step
                nodes = [torch.where(ok > 0, n, old) for n, old in zip(nodes, last,
                                                                        strict=True)]
                f_last = torch.where(ok > 0, f, f_last)
                used, alive, last = used + ok * (step > 0), ok, nodes
                trace.append(f_last)
                if step < steps:
                    nodes = [n - eta * ok * g for n, g in zip(nodes, grad, strict=True)]
            d = torch.func.grad(lambda t: free(last, t))({n: state[n] for n in targets})
            mlp_ = self.loss.model.model.layers[layer]
            eps = last[0] - base - Energy._moe(mlp_, base, gates[layer])
            return (*[d[t] for t in targets], eps[0], nll, gates[layer], nov, x,
                    torch.stack(trace), used * torch.ones(1))

        self.sweep = _trace(relax, self.loss, self.example()[0])

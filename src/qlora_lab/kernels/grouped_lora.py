"""LoRA layers that share an input (q, k, v; gate, up) as one autograd function.

Llama's attention calls q_proj, k_proj and v_proj on the same hidden states, and its MLP calls gate_proj
and up_proj on the same input. Through fused_lora.py each is its own LoRALinearFunction: three autograd
nodes, three input gradients that autograd then adds, three small A matmuls. `GroupedLoRAFunction` runs a
group as one node: the input reshaped once, each base matmul as before, the input gradient accumulated in
one buffer (`addmm_`), and without dropout one A matmul for the group (the A matrices stacked: x [A_q; A_k;
A_v]^T), one for its input-gradient term and one for the A gradients. With dropout every layer keeps its
own mask, drawn in the same order as the layers' own calls would draw them (and drawn again in the
backward, as fused_lora.py does), so the same random numbers train the same way.

`group(model)` links each group's layers (the first computes the group; the others take their output when
the model calls them on the same input tensor, in any order; on any other input they compute alone). On by
default (`train.group_lora`; +11% on an H200, assets/bench/README.md run 7).
tests/unit/kernels/test_grouped_lora.py compares the loss and every adapter gradient with peft's path and
with the ungrouped fused layers.
"""
from __future__ import annotations

import torch

from .fused_lora import GROUP, PENDING, _ATTR, _as, _dequantize, add_dropped_, drop, redraw, route

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def group(model) -> int:
    """Link the fused LoRA layers that share an input (GROUPS, siblings in one module); returns how many groups."""
    n = 0
    for parent in model.modules():
        for names in GROUPS:
            layers = [getattr(parent, name, None) for name in names]
            if all(layer is not None and hasattr(layer, _ATTR) for layer in layers):
                layers[0].__dict__[GROUP] = tuple(layers)  # a plain attribute: not a submodule, not saved
                n += 1
    return n


def ungroup(model) -> int:
    n = 0
    for m in model.modules():
        n += m.__dict__.pop(GROUP, None) is not None
        m.__dict__.pop(PENDING, None)
    return n


def count(model) -> int:
    return sum(1 for m in model.modules() if GROUP in m.__dict__)


def forward_group(layers, x, first_args):
    """The first layer's output; the others' wait on them (PENDING). None if a layer cannot join (then every
    layer computes alone)."""
    args = [first_args] + [route(layer, x) for layer in layers[1:]]
    if any(a is None for a in args) or len({a[-1] for a in args}) != 1:  # one compute dtype
        return None
    dtype = args[0][-1]
    meta = tuple((a[1], a[5], a[6], a[7]) for a in args)  # quant state, scale, p, dropout stream
    flat = [t for a in args for t in (a[0], a[2], a[3], a[4])]  # weight, bias, A, B
    outs = GroupedLoRAFunction.apply(x, dtype, meta, *flat)
    if not torch.is_autocast_enabled(x.device.type):
        outs = tuple(o.to(x.dtype) for o in outs)
    for layer, out in zip(layers[1:], outs[1:]):
        layer.__dict__[PENDING] = (x, out)
    return outs[0]


class GroupedLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dtype, meta, *flat):
        shape = x.shape
        x2 = _as(x.reshape(-1, shape[-1]), dtype)
        n = len(meta)
        ws, biases = flat[0::4], flat[1::4]
        a = [_as(t, dtype) for t in flat[2::4]]
        b = [_as(t, dtype) for t in flat[3::4]]
        ys = []
        for i in range(n):
            w = _dequantize(ws[i], meta[i][0], dtype)
            y = torch.empty(*shape[:-1], w.shape[0], dtype=dtype, device=x.device)
            if biases[i] is None:
                torch.mm(x2, w.t(), out=y.view(-1, w.shape[0]))
            else:
                torch.addmm(_as(biases[i], dtype), x2, w.t(), out=y.view(-1, w.shape[0]))
            ys.append(y)
            del w  # before the next layer's is dequantized: one dequantized weight alive at a time
        ctx.rngs = [None] * n
        if all(m[2] == 0.0 for m in meta):  # no dropout: one A matmul for the group
            xa = list(torch.mm(x2, torch.cat(a).t()).split([t.shape[0] for t in a], dim=1))
        else:
            xa = []
            for i in range(n):
                xd = x2
                if meta[i][2] > 0.0:
                    xd, ctx.rngs[i] = drop(x2, meta[i][2], meta[i][3])
                xa.append(torch.mm(xd, a[i].t()))
        for i in range(n):
            ys[i].view(-1, ys[i].shape[-1]).addmm_(xa[i], b[i].t(), alpha=meta[i][1])
        ctx.save_for_backward(x2, *xa, *ws, *a, *b)
        ctx.meta, ctx.dtype, ctx.n = meta, dtype, n
        ctx.x_shape, ctx.x_dtype = shape, x.dtype
        ctx.ab_dtypes = [(flat[4 * i + 2].dtype, flat[4 * i + 3].dtype) for i in range(n)]
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        n, dtype, meta = ctx.n, ctx.dtype, ctx.meta
        saved = ctx.saved_tensors
        x2, xa, ws, a, b = saved[0], saved[1:1 + n], saved[1 + n:1 + 2 * n], saved[1 + 2 * n:1 + 3 * n], saved[1 + 3 * n:]
        live = [i for i in range(n) if grads[i] is not None]
        g = {i: _as(grads[i].reshape(-1, grads[i].shape[-1]), dtype) for i in live}
        ga = {i: torch.addmm(xa[i], g[i], b[i], beta=0, alpha=meta[i][1]) for i in live}
        stacked = all(m[2] == 0.0 for m in meta) and len(live) == n
        dx = None
        if ctx.needs_input_grad[0]:
            for i in live:
                w = _dequantize(ws[i], meta[i][0], dtype)
                dx = torch.mm(g[i], w) if dx is None else dx.addmm_(g[i], w)
                del w  # as in the forward
        out = [None] * (4 * n)
        ga_all = torch.cat([ga[i] for i in range(n)], dim=1) if stacked else None
        if stacked:  # one matmul each for the input-gradient term and the A gradients
            a_all = torch.cat(a)
            if dx is not None:
                dx.addmm_(ga_all, a_all)
            da_all = torch.mm(ga_all.t(), x2).split([t.shape[0] for t in a])
        for i in live:
            p = meta[i][2]
            xd, mask = redraw(x2, p, ctx.rngs[i]) if ctx.rngs[i] is not None else (x2, None)
            if dx is not None and not stacked:
                if ctx.rngs[i] is None:
                    dx.addmm_(ga[i], a[i])
                else:
                    add_dropped_(dx, torch.mm(ga[i], a[i]), p, ctx.rngs[i], mask)
            a_dtype, b_dtype = ctx.ab_dtypes[i]
            if ctx.needs_input_grad[3 + 4 * i + 2]:
                out[4 * i + 2] = _as(da_all[i] if stacked else torch.mm(ga[i].t(), xd), a_dtype)
            if ctx.needs_input_grad[3 + 4 * i + 3]:
                out[4 * i + 3] = _as(torch.addmm(b[i], g[i].t(), xa[i], beta=0, alpha=meta[i][1]), b_dtype)
            del xd, mask  # before the next layer's mask is drawn
        if dx is not None:
            dx = _as(dx.view(ctx.x_shape), ctx.x_dtype)
        return (dx, None, None, *out)

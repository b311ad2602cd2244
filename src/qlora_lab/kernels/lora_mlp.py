"""A LoRA MLP block as one autograd function: the activation's output is never stored (`train.fused_mlp`).

Llama's MLP is down(silu(gate(x)) * up(x)), Falcon's dense_4h_to_h(gelu(dense_h_to_4h(x))). Run layer by
layer, autograd keeps the up projections' outputs for the activation's backward *and* the activation's output
as the down projection's input: per token and layer one MLP-width vector twice (Llama-2-7B: 2 x 11,008 bytes
of 16-bit values, 2.7 GiB at 4,096 tokens a step over 32 layers; Falcon-7B: 2 x 18,176 bytes). `LoRAMLPFunction`
keeps only what the activation needs and computes its output again in the backward (one elementwise kernel):

    forward:  g[, u] = x W_up^T + LoRA (grouped_lora.py), h = act(g[, u]), y = h W_down^T + s (drop(h) A^T) B^T
    saved:    x, g[, u], drop(h) A^T (tokens x r): not h
    backward: h again, the down adapters' gradients, h freed; then down's input gradient (its weight dequantized
              only now: h and that weight, 86 MiB each at 4,096 Llama-2-7B tokens, are never alive together);
              the activation's backward; the up projections' backward

In a recomputation (recompute.py) the block's output is thrown away, so the down projection's base matmul is
skipped: its saved tensors are all the backward needs.

`enable(model)` swaps the forward of every MLP whose projections are fused LoRA layers (fused_lora.enable
first) and whose activation is SiLU-gated (Llama) or exact GELU (Falcon), checked by evaluating it; the swapped
forward falls back to the module's own wherever a layer would (eval, no grad, merged adapters).
tests/unit/kernels/test_lora_mlp.py compares the loss and every adapter gradient with peft's path on the CPU.
"""
from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

from . import recompute
from .fused_lora import _ATTR, _as, _dequantize, adapter_grads, drop, input_grad, route
from .grouped_lora import GroupedLoRAFunction

_ORIGINAL = "_qlora_lab_mlp_forward"
_KIND = "_qlora_lab_mlp_kind"
SHAPES = {"swiglu": ("gate_proj", "up_proj", "down_proj", "act_fn"),
          "gelu": ("dense_h_to_4h", None, "dense_4h_to_h", "act")}


# ----------------------------------------------------------------------------- activations

@functools.cache
def _liger_swiglu():
    try:
        from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward
    except ImportError:
        return None
    return swiglu_forward, swiglu_backward


def _act_forward(kind, ups):
    if kind == "gelu":
        return F.gelu(ups[0])
    g, u = ups
    if g.is_cuda and (liger := _liger_swiglu()) is not None:
        return liger[0](g, u)[2]
    return F.silu(g) * u


def _act_backward(kind, ups, dh):
    """d loss / d (each up projection's output); on a GPU with Liger written over the saved ones (used once)."""
    if kind == "gelu":
        return (torch.ops.aten.gelu_backward(dh, ups[0]),)
    g, u = ups
    if g.is_cuda and (liger := _liger_swiglu()) is not None:
        return liger[1](g, u, dh)
    gf = g.float()
    sig = torch.sigmoid(gf)
    silu = gf * sig
    dhf = dh.float()
    return ((dhf * u.float() * sig * (1 + gf * (1 - sig))).to(g.dtype), (dhf * silu).to(u.dtype))


class _Sub:
    """The ctx of GroupedLoRAFunction's forward and backward when they run inside this function."""

    def save_for_backward(self, *tensors):
        self.saved = tensors


# ----------------------------------------------------------------------------- the function

class LoRAMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dtype, kind, up_meta, down_meta, *flat):
        n = len(up_meta)
        sub = _Sub()
        ups = GroupedLoRAFunction.forward(sub, x, dtype, up_meta, *flat[:4 * n])
        h = _act_forward(kind, ups)
        weight, bias, lora_a, lora_b = flat[4 * n:]
        quant_state, scale, p, salt, out_features = down_meta
        h2 = h.view(-1, h.shape[-1])
        ctx.rng = None
        xd = h2
        if p > 0.0:
            xd, ctx.rng = drop(h2, p, salt)
        a, b = _as(lora_a, dtype), _as(lora_b, dtype)
        xa = torch.mm(xd, a.t())
        del xd
        y = torch.empty(*x.shape[:-1], out_features, dtype=dtype, device=x.device)
        if not recompute.active():  # a recomputation's output is thrown away: its saved tensors are what counts
            y2 = y.view(-1, out_features)
            w = _dequantize(weight, quant_state, dtype)
            if bias is None:
                torch.mm(h2, w.t(), out=y2)
            else:
                torch.addmm(_as(bias, dtype), h2, w.t(), out=y2)
            del w
            y2.addmm_(xa, b.t(), alpha=scale)
        del h, h2
        ctx.n_sub = len(sub.saved)
        ctx.save_for_backward(*sub.saved, *ups, xa, weight, a, b)
        del sub.saved  # through save_for_backward only: a checkpoint (which drops what is saved) must free them
        ctx.sub, ctx.kind, ctx.n, ctx.dtype, ctx.down_meta = sub, kind, n, dtype, down_meta
        ctx.ab_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.done = False
        return y

    @staticmethod
    def backward(ctx, grad):
        if ctx.done:  # the activation's backward wrote over its saved inputs
            raise RuntimeError("LoRA MLP: a second backward through the same forward (retain_graph) is not supported")
        ctx.done = True
        saved = ctx.saved_tensors
        sub, n, dtype = ctx.sub, ctx.n, ctx.dtype
        sub.saved_tensors = saved[:ctx.n_sub]
        ups = saved[ctx.n_sub:ctx.n_sub + n]
        xa, weight, a, b = saved[ctx.n_sub + n:]
        quant_state, scale, p, _, out_features = ctx.down_meta
        h2 = _act_forward(ctx.kind, ups).view(-1, ups[0].shape[-1])  # computed again instead of stored
        g = _as(grad.reshape(-1, out_features), dtype)
        needs = ctx.needs_input_grad
        ga, da, db, mask = adapter_grads(g, h2, xa, a, b, scale, p, ctx.rng, needs[-2], needs[-1])
        del h2  # before the down weight is dequantized: one MLP-width tensor fewer at the backward's peak
        dh = input_grad(g, ga, weight, quant_state, a, p, ctx.rng, mask, dtype)
        del ga, mask
        da = _as(da, ctx.ab_dtypes[0]) if da is not None else None
        db = _as(db, ctx.ab_dtypes[1]) if db is not None else None
        dups = _act_backward(ctx.kind, ups, dh.view(ups[0].shape))
        del dh
        sub.needs_input_grad = (needs[0], False, False, *needs[5:5 + 4 * n])
        dx, _, _, *up_grads = GroupedLoRAFunction.backward(sub, *dups)
        return (dx, None, None, None, None, *up_grads, None, None, da, db)


# ----------------------------------------------------------------------------- the modules

def _mlp_forward(self, x, *args, **kwargs):
    original = self.__dict__[_ORIGINAL]
    kind = self.__dict__[_KIND]
    up_names, down_name = [n for n in SHAPES[kind][:2] if n], SHAPES[kind][2]
    layers = [getattr(self, name) for name in up_names + [down_name]]
    if args or kwargs or not all(hasattr(layer, _ATTR) for layer in layers):  # fused_lora.disable'd since
        return original(x, *args, **kwargs)
    calls = [route(getattr(self, name), x) for name in up_names]
    down = getattr(self, down_name)
    down_call = route(down, x)
    if any(c is None for c in calls) or down_call is None or len({c[-1] for c in calls + [down_call]}) != 1:
        return original(x)
    dtype = calls[0][-1]
    up_meta = tuple((c[1], c[5], c[6], c[7]) for c in calls)  # quant state, scale, p, dropout stream
    w, qs, bias, lora_a, lora_b, scale, p, salt, _ = down_call
    down_meta = (qs, scale, p, salt, down.get_base_layer().out_features)
    flat = [t for c in calls for t in (c[0], c[2], c[3], c[4])] + [w, bias, lora_a, lora_b]
    out = LoRAMLPFunction.apply(x, dtype, kind, up_meta, down_meta, *flat)
    if not torch.is_autocast_enabled(x.device.type):
        out = out.to(x.dtype)
    return out


def _kind(module) -> str | None:
    """'swiglu' or 'gelu' where the module is such an MLP over fused LoRA layers, else None. Its activation is
    evaluated; a Liger SwiGLU MLP (which Liger puts in place of LlamaMLP for models built after it patched the
    class, with no activation module of its own) is known by its config's hidden_act."""
    for kind, (up0, up1, down, act) in SHAPES.items():
        names = [n for n in (up0, up1, down) if n]
        if not all(hasattr(getattr(module, n, None), _ATTR) for n in names):
            continue
        fn = getattr(module, act, None)
        if fn is None and kind == "swiglu":
            hidden_act = getattr(getattr(module, "config", None), "hidden_act", None)
            return kind if hidden_act in ("silu", "swish") and type(module).__name__.startswith("Liger") else None
        if not callable(fn):
            return None
        t = torch.linspace(-4, 4, 33)
        want = F.silu(t) if kind == "swiglu" else F.gelu(t)
        with torch.no_grad():
            got = fn(t)
        return kind if torch.allclose(got, want, atol=1e-6) else None
    return None


def enable(model) -> int:
    """Route every eligible MLP block through LoRAMLPFunction; returns how many."""
    n = 0
    for m in model.modules():
        if _ORIGINAL in m.__dict__:
            n += 1
            continue
        kind = _kind(m)
        if kind is None:
            continue
        m.__dict__[_ORIGINAL] = m.forward
        m.__dict__[_KIND] = kind
        m.forward = types.MethodType(_mlp_forward, m)
        n += 1
    return n


def disable(model) -> int:
    n = 0
    for m in model.modules():
        original = m.__dict__.pop(_ORIGINAL, None)
        if original is not None:
            m.__dict__.pop(_KIND, None)
            if getattr(original, "__self__", None) is m and original.__func__ is type(m).forward:
                del m.forward  # the class's forward shows through again
            else:
                m.forward = original  # an instance forward set before (Liger's SwiGLU)
            n += 1
    return n


def count(model) -> int:
    return sum(1 for m in model.modules() if _ORIGINAL in m.__dict__)

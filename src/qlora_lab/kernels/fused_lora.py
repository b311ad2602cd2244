"""One autograd function per LoRA linear layer: dequantize, base matmul, dropout, A, B, in a handful of kernels.

Stock peft + bitsandbytes run a LoRA layer of a 4-bit model as a chain of Python modules and autograd
nodes: bnb's 4-bit matmul (its own autograd Function), a defensive copy of its output, the dropout
module, lora_A, lora_B, a scaling multiply and an add, each op dispatched separately (with autocast
casts of the fp32 adapter weights in between). A 7B model has 224 such layers, so a training step
launches thousands of small kernels and the GPU waits on the host (assets/bench/README.md).

`LoRALinearFunction` computes the same thing directly:

    y = x W^T + b + s * (dropout(x) A^T) B^T            (W dequantized from NF4 on the fly)

forward:  dequantize W, y = x W^T (+ b), x_d = dropout(x), x_a = x_d A^T, y += s x_a B^T
backward: dequantize W again, g_a = s g B, (x_d, mask) drawn again, dx = g W + mask/(1-p) * (g_a A),
          dA = g_a^T x_d, dB = s g^T x_a

It saves x and the small x_a (tokens x r), and no dropout mask: the backward draws the forward's mask again.
On a GPU with Triton the mask is a function of (seed, layer, element) (dropout.py: nothing to rewind, safe
inside a CUDA graph); elsewhere it is torch's, the generator rewound to the state the forward started from
(bit for bit: the same generator, state and shape). peft saves each layer's dropped-out input and its
1-byte mask; q, k, v (and gate, up) share one input, which this saves once. Frozen base weights get no
gradient; adapters get theirs in their own dtype (fp32 masters).

`enable(model)` swaps the forward of every eligible peft LoRA layer (one active adapter, no DoRA,
no LoRA bias, base layer nn.Linear or bitsandbytes Linear4bit). The swapped forward falls back to
peft's own whenever it does not apply: eval, no grad (generation), merged or disabled adapters, or
extra forward arguments. `disable(model)` restores peft's forward. Adapters, state dicts and saving
are untouched: only the arithmetic's route changes. tests/unit/kernels/test_fused_lora.py checks outputs and
gradients against peft's path on the CPU, in 4-bit and 16-bit.
"""
from __future__ import annotations

import types

import torch

from ..quant import is_4bit
from . import dropout, recompute

_ATTR = "_qlora_lab_fused_lora"
SALT = "_qlora_lab_lora_salt"        # the layer's index among the fused ones: its dropout stream (dropout.py)
_HOOK = "_qlora_lab_dropout_hook"    # on the model: the forward pre-hook that draws new masks per forward
GROUP = "_qlora_lab_lora_group"      # on a group's first layer: the group's layers (grouped_lora.py)
PENDING = "_qlora_lab_lora_pending"  # on another layer of a group: (input, output) its first layer computed


def _dequantize(weight, quant_state, dtype):
    """The base weight in `dtype`: NF4 in one kernel on a GPU (nf4.py)."""
    if quant_state is None:
        return weight.to(dtype)
    from . import nf4

    return nf4.dequantize(weight, quant_state, dtype)


def _rng_state(device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state, device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def drop(x2, p: float, salt: int):
    """(dropout(x2), how to draw its mask again): on a GPU with Triton the mask of (seed, layer `salt`)
    (dropout.py: nothing to save, graph-safe); elsewhere torch's, with the generator state it started from."""
    if dropout.usable(x2.device):
        return dropout.apply(x2, p, salt), (salt, dropout.generation)
    state = _rng_state(x2.device)
    return torch.native_dropout(x2, p, True)[0], state


def redraw(x2, p: float, token):
    """(x_d, mask) exactly as `drop` drew them (mask None where dropout.py draws it)."""
    if isinstance(token, tuple):
        salt, generation = token
        if generation != dropout.generation:
            raise RuntimeError("fused LoRA: the model ran another training forward between this layer's forward "
                               "and its backward, so its dropout mask cannot be drawn again")
        return dropout.apply(x2, p, salt), None
    now = _rng_state(x2.device)
    _set_rng_state(token, x2.device)
    try:
        return torch.native_dropout(x2, p, True)
    finally:
        _set_rng_state(now, x2.device)


def add_dropped_(dx, t, p: float, token, mask):
    """dx += the dropout backward of t: t masked as the forward's input was, scaled by 1 / (1 - p)."""
    if mask is None:
        return dropout.add_masked_(dx, t, p, token[0])
    return dx.add_(torch.ops.aten.native_dropout_backward(t, mask, 1.0 / (1.0 - p)))


def _as(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, quant_state, bias, lora_a, lora_b, scale: float, p: float, salt: int, dtype):
        shape = x.shape
        x2 = _as(x.reshape(-1, shape[-1]), dtype)
        w = _dequantize(weight, quant_state, dtype)
        # The output is allocated in x's shape and written through a 2-D view: returning a view would
        # forbid the in-place adds that models do on it (Falcon's mlp_output += attention_output).
        y = torch.empty(*shape[:-1], w.shape[0], dtype=dtype, device=x.device)
        y2 = y.view(-1, w.shape[0])
        if bias is None:
            torch.mm(x2, w.t(), out=y2)
        else:
            torch.addmm(_as(bias, dtype), x2, w.t(), out=y2)
        del w
        ctx.rng = None
        if p > 0.0:
            xd, ctx.rng = drop(x2, p, salt)  # the backward draws the same mask again from ctx.rng
        else:
            xd = x2
        # The adapters in the compute dtype, kept for the backward (r x (in + out) each: small) so that
        # it does not cast them again.
        a, b = _as(lora_a, dtype), _as(lora_b, dtype)
        xa = torch.mm(xd, a.t())
        del xd
        y2.addmm_(xa, b.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, weight, a, b)
        ctx.quant_state, ctx.scale, ctx.p, ctx.dtype = quant_state, scale, p, dtype
        ctx.x_shape, ctx.x_dtype = shape, x.dtype
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        x2, xa, weight, a, b = ctx.saved_tensors
        g = _as(grad.reshape(-1, grad.shape[-1]), ctx.dtype)
        needs = ctx.needs_input_grad
        ga, da, db, mask = adapter_grads(g, x2, xa, a, b, ctx.scale, ctx.p, ctx.rng, needs[4], needs[5])
        dx = None
        if needs[0]:
            dx = input_grad(g, ga, weight, ctx.quant_state, a, ctx.p, ctx.rng, mask, ctx.dtype)
            dx = _as(dx.view(ctx.x_shape), ctx.x_dtype)
        da = _as(da, ctx.a_dtype) if da is not None else None
        db = _as(db, ctx.b_dtype) if db is not None else None
        return dx, None, None, None, da, db, None, None, None, None


# The backward of y = x W^T + s drop(x) A^T B^T for 2-D x and output gradient g, in the compute dtype, in two
# parts: the adapters' gradients first, which need x (as dropped out in the forward), then the input gradient,
# which needs the dequantized W but not x. A caller that computed x for the backward (lora_mlp.py recomputes the
# down projection's input) frees it between the two, so x and W are never alive together.

def adapter_grads(g, x2, xa, a, b, scale: float, p: float, rng, need_da: bool, need_db: bool):
    """(ga, dA, dB, mask): ga = s g B (d loss / d x_a, which `input_grad` needs too); dA and dB (None where not
    needed); xa = drop(x) A^T as the forward saved it, the mask drawn again from `rng` (None: no dropout), and
    returned where torch drew it (None where dropout.py draws it again from its seed)."""
    xd, mask = redraw(x2, p, rng) if rng is not None else (x2, None)
    ga = torch.addmm(xa, g, b, beta=0, alpha=scale)          # xa: shape only
    da = torch.mm(ga.t(), xd) if need_da else None
    db = torch.addmm(b, g.t(), xa, beta=0, alpha=scale) if need_db else None  # s g^T x_a (b: shape only)
    return ga, da, db, mask


def input_grad(g, ga, weight, quant_state, a, p: float, rng, mask, dtype):
    """dx = g W + the dropout backward of ga A (ga, mask: from `adapter_grads`)."""
    w = _dequantize(weight, quant_state, dtype)
    dx = torch.mm(g, w)
    del w
    if rng is None:
        dx.addmm_(ga, a)
    else:
        add_dropped_(dx, torch.mm(ga, a), p, rng, mask)
    return dx


def _quant_state(base):
    """The 4-bit weight's quantization state, or None for a 16-bit nn.Linear base layer."""
    if not is_4bit(base):
        return None
    qs = getattr(base.weight, "quant_state", None)
    return qs if qs is not None else base.quant_state


def _compute_dtype(base, x):
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if is_4bit(base) and base.compute_dtype is not None:
        return base.compute_dtype
    return base.weight.dtype if base.weight.is_floating_point() else x.dtype


def route(layer, x):
    """LoRALinearFunction's arguments after x for this layer and input, or None where peft's own forward
    applies: eval, no grad (generation), merged or disabled adapters, several active adapters, DoRA, bias."""
    # An offloaded layer's first forward runs without grad (recompute.py) but must draw the training masks.
    if not (layer.training and (torch.is_grad_enabled() or recompute.training_without_grad())) \
            or layer.disable_adapters or layer.merged \
            or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}) or \
            getattr(layer, "lora_bias", {}).get(name, False):
        return None
    base = layer.get_base_layer()
    drop = layer.lora_dropout[name]
    p = float(drop.p) if isinstance(drop, torch.nn.Dropout) else 0.0
    return (base.weight, _quant_state(base), base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
            float(layer.scaling[name]), p, layer.__dict__.get(SALT, 0), _compute_dtype(base, x))


def _fused_forward(self, x, *args, **kwargs):
    original = getattr(self, _ATTR)
    if args or kwargs:
        return original(x, *args, **kwargs)
    done = self.__dict__.pop(PENDING, None)  # computed with the other layers of its group (grouped_lora.py)
    if done is not None and done[0] is x:
        return done[1]
    call = route(self, x)
    if call is None:
        return original(x)
    group = self.__dict__.get(GROUP)
    if group is not None:
        from .grouped_lora import forward_group

        out = forward_group(group, x, call)
        if out is not None:
            return out
    out = LoRALinearFunction.apply(x, *call)
    if not torch.is_autocast_enabled(x.device.type):
        out = out.to(x.dtype)  # as peft + bitsandbytes return it
    return out


def eligible(module) -> bool:
    """A peft LoRA linear layer over nn.Linear or a 4-bit Linear4bit, plain LoRA (no DoRA, no bias)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
        return False
    base = module.get_base_layer()
    if type(base) is not torch.nn.Linear and not is_4bit(base):
        return False
    if any(getattr(module, "use_dora", {}).values()) or any(getattr(module, "lora_bias", {}).values()):
        return False
    dropouts = [d for d in module.lora_dropout.values()]
    return all(isinstance(d, (torch.nn.Dropout, torch.nn.Identity)) for d in dropouts)


def enable(model) -> int:
    """Route every eligible LoRA layer through LoRALinearFunction; returns how many. Each gets its own dropout
    stream (its index), and the model draws new dropout masks before each training forward (dropout.py)."""
    n = 0
    for m in model.modules():
        if eligible(m):
            if not hasattr(m, _ATTR):
                setattr(m, _ATTR, m.forward)
                m.forward = types.MethodType(_fused_forward, m)
            m.__dict__[SALT] = n
            n += 1
    if n and _HOOK not in model.__dict__:
        model.__dict__[_HOOK] = model.register_forward_pre_hook(_new_masks)
    return n


def _new_masks(model, args):
    if model.training and torch.is_grad_enabled():
        dropout.advance()


def disable(model) -> int:
    """Give every layer back peft's own forward; returns how many were fused."""
    n = 0
    for m in model.modules():
        if hasattr(m, _ATTR):
            del m.forward  # the instance attribute: the class's forward shows through again
            delattr(m, _ATTR)
            m.__dict__.pop(GROUP, None)
            m.__dict__.pop(PENDING, None)
            m.__dict__.pop(SALT, None)
            n += 1
    hook = model.__dict__.pop(_HOOK, None)
    if hook is not None:
        hook.remove()
    return n


def count(model) -> int:
    return sum(1 for m in model.modules() if hasattr(m, _ATTR))

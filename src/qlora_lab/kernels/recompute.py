"""Recomputation (activation checkpointing): what a recomputed forward may skip, and where a layer's input waits.

A recomputed decoder layer runs its forward a second time inside the backward, for the tensors its backward
needs; the output of that second forward is thrown away. `context_fn` (torch.utils.checkpoint's hook, used by
model.set_recomputation and graphs.py) marks that second forward, and `active()` lets a fused function skip
work whose only product is that output: lora_mlp.py skips the down projection's base matmul, ~22% of a Llama
layer's matmul work, so ~7% of a step with every layer recomputed.

`offloaded(fn, x, slot=i)` checkpoints a layer with its input kept in pinned CPU memory instead of on the GPU
(`train.offload_checkpoints`): the copy out starts on a side stream as the forward goes on, and the backward of
layer i fetches layer i-1's input on that stream while it computes, so the copies hide behind the matmuls. The
GPU then holds no activation at all for a recomputed layer (2 x hidden bytes a token less per layer: 1 GiB for
a 7B at 4,096 tokens). It runs the layer as torch's reentrant checkpoint does (forward without a graph, then
forward and backward again in the backward), with the RNG states and autocast of the first forward restored.
tests/unit/kernels/test_recompute.py compares the loss and every adapter gradient with torch's checkpoint.
Where the layers replay from CUDA graphs (graphs.py), the same stash copies the graphs' static input buffers out
and back (`copy_out`, `copy_in`) on the same side stream, between the replays.
"""
from __future__ import annotations

import contextlib

import torch

class _Depth:
    """A context that counts how deep its own `with` blocks nest (a module-wide flag that nests)."""

    def __init__(self):
        self.n = 0

    def __enter__(self):
        self.n += 1

    def __exit__(self, *exc):
        self.n -= 1


# Entered while a recomputation runs (the autograd engine's thread; forwards never overlap it).
_recomputation = _Depth()
# Entered while an offloaded layer runs its first forward, without autograd but as training.
_first_forward = _Depth()


def context_fn():
    """(forward context, recomputation context) for torch.utils.checkpoint(..., context_fn=context_fn)."""
    return contextlib.nullcontext(), _recomputation


def recomputing() -> _Depth:
    """The context of a recomputation (what torch's checkpoint enters through context_fn); graphs.py captures
    an offloaded layer's recomputation in it."""
    return _recomputation


def first_forward() -> _Depth:
    """The context of an offloaded layer's first forward: no autograd graph, the training arithmetic."""
    return _first_forward


def active() -> bool:
    """Whether the forward running now is a recomputation, whose output nobody reads."""
    return _recomputation.n > 0


def training_without_grad() -> bool:
    """Whether an offloaded layer's first forward runs now: no autograd graph, but the training arithmetic
    (fused LoRA and its dropout masks), which the recomputation in the backward must repeat exactly."""
    return _first_forward.n > 0


# ----------------------------------------------------------------------------- offloaded checkpoints

class _Stash:
    """One pinned host buffer per layer slot, reused every step, and one copy stream for both directions."""

    def __init__(self):
        self.host: dict = {}      # slot -> pinned tensor
        self.owner: dict = {}     # slot -> the forward (a token) whose input the buffer holds now
        self.ready: dict = {}     # slot -> event: the copy out has finished
        self.fetched: dict = {}   # slot -> (device tensor, event): copied back ahead of its backward
        self.stream = None
        self.out_done: dict = {}  # slot -> event: a graph's input copied out (copy_out)
        self.in_done: dict = {}   # slot -> event: copied back into a graph's staging buffer (copy_in)

    def _host(self, slot, x):
        buf = self.host.get(slot)
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
            buf = self.host[slot] = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)
        return buf

    def put(self, slot, x, token) -> None:
        buf = self._host(slot, x)
        self.owner[slot] = token
        self.fetched.pop(slot, None)
        if not x.is_cuda:
            buf.copy_(x)
            return
        if self.stream is None:
            self.stream = torch.cuda.Stream(x.device)
        self.stream.wait_stream(torch.cuda.current_stream(x.device))  # x has been written
        with torch.cuda.stream(self.stream):
            buf.copy_(x, non_blocking=True)
            self.ready[slot] = torch.cuda.Event()
            self.ready[slot].record()
        x.record_stream(self.stream)  # the allocator keeps x's memory until the copy has read it

    def _fetch(self, slot, device):
        buf = self.host[slot]
        if device.type != "cuda":
            return buf.clone(), None
        current = torch.cuda.current_stream(device)
        x = torch.empty(buf.shape, dtype=buf.dtype, device=device)  # allocated on the stream that will use it
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.ready[slot])
            x.copy_(buf, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        x.record_stream(self.stream)
        return x, done

    def get(self, slot, token, device):
        """The input saved for `token`, back on `device`; starts copying the previous slot's input too."""
        if self.owner.get(slot) is not token:
            raise RuntimeError(f"offloaded checkpoint: layer {slot} ran another training forward before this "
                               "backward, so the input kept for it is gone (one backward per forward)")
        x, done = self.fetched.pop(slot, None) or self._fetch(slot, device)
        if done is not None:
            torch.cuda.current_stream(device).wait_event(done)
        prev = slot - 1
        if prev in self.host and prev not in self.fetched and self.owner.get(prev) is not None:
            self.fetched[prev] = self._fetch(prev, device)
        self.owner[slot] = None
        return x


    # -- for graphs.py: a layer's input in a static buffer, copied out and back on the side stream ----------
    def copy_out(self, slot, x) -> None:
        """Start copying x (a CUDA graph's static buffer) to the slot's pinned buffer once the work queued so far
        has written it; whatever overwrites x must first `wait_out(slot)`."""
        buf = self._host(slot, x)
        self.owner[slot] = None  # an eager backward may not read what a replay wrote
        self.in_done.pop(slot, None)  # a copy back started before this one (a forward without backward) is stale
        if self.stream is None:
            self.stream = torch.cuda.Stream(x.device)
        self.stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(self.stream):
            buf.copy_(x, non_blocking=True)
            self.out_done[slot] = torch.cuda.Event()
            self.out_done[slot].record()

    def wait_out(self, slot) -> None:
        done = self.out_done.pop(slot, None)
        if done is not None:
            torch.cuda.current_stream().wait_event(done)

    def copy_in(self, slot, dst) -> None:
        """Start copying the slot's saved input into dst (a staging buffer) once the work queued so far has read
        dst; a no-op where that copy has started already. `wait_in(slot)` before reading dst."""
        if slot in self.in_done:
            return
        self.stream.wait_stream(torch.cuda.current_stream(dst.device))
        with torch.cuda.stream(self.stream):  # after this slot's copy_out: one stream, in order
            dst.copy_(self.host[slot], non_blocking=True)
            self.in_done[slot] = torch.cuda.Event()
            self.in_done[slot].record()

    def wait_in(self, slot, dst) -> None:
        self.copy_in(slot, dst)
        torch.cuda.current_stream(dst.device).wait_event(self.in_done.pop(slot))

    def release_idle(self) -> None:
        """Free the pinned buffers of the eager offloaded layers whose input nobody waits for."""
        for slot in [k for k in self.host if isinstance(k, int) and self.owner.get(k) is None]:
            del self.host[slot]
            self.fetched.pop(slot, None)


stash = _Stash()


def _rng_states(device):
    cpu = torch.get_rng_state()
    return cpu, (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


class _Offloaded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, slot, x, anchor):
        ctx.run, ctx.slot, ctx.token = run, slot, object()
        ctx.rng = _rng_states(x.device)
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        stash.put(slot, x, ctx.token)
        with torch.no_grad(), first_forward():
            return run(x)

    @staticmethod
    def backward(ctx, grad):
        device = grad.device
        wants_dx = ctx.needs_input_grad[2]
        x = stash.get(ctx.slot, ctx.token, device).detach().requires_grad_(wants_dx)
        cpu_rng, cuda_rng = ctx.rng
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=[device] if cuda_rng is not None else [], device_type=device.type):
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, device)
            with torch.enable_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled), _recomputation:
                out = ctx.run(x)
        if out.requires_grad:  # adapter gradients accumulate into their .grad (reentrant style)
            _drop_values(out)
            torch.autograd.backward(out, grad)
        return None, None, x.grad if wants_dx else None, None


def _drop_values(out) -> None:
    """Free the recomputed output's memory before the backward runs through the layer (one hidden-size tensor
    fewer at its peak: 32 MiB at 4,096 Llama-2-7B tokens in bf16, 64 in a T4's fp32 residual stream). Its values are
    thrown away, and autograd.backward reads only its shape. Only where the layer ends in an addition of its own (the
    residual add of Llama's and Falcon's layers): an add keeps nothing for its backward, and its result is no view
    of a tensor anything else reads."""
    if out._base is None and type(out.grad_fn).__name__ == "AddBackward0":
        out.untyped_storage().resize_(0)


_ANCHORS: dict = {}


def _anchor(device):
    """An empty tensor that requires grad, one per device: an input of every offloaded call, so that autograd runs
    its backward (and with it the adapters') even where x does not require grad. Its gradient is None."""
    t = _ANCHORS.get(device)
    if t is None:
        t = _ANCHORS[device] = torch.empty(0, device=device, requires_grad=True)
    return t


def is_offloaded(layer) -> bool:
    """Whether a decoder layer recomputes with its input in CPU memory (as model.set_recomputation sets it)."""
    fn = getattr(layer, "_gradient_checkpointing_func", None)
    return getattr(fn, "func", None) is offloaded and bool(getattr(layer, "gradient_checkpointing", False))


def offloaded(run, x, *args, slot: int):
    """A checkpointed call of run(x, *args) whose input x waits in pinned CPU memory until the backward: the
    signature of a decoder layer's `_gradient_checkpointing_func`, with the layer's index as `slot`. x need not
    require grad (the first layer's input, the embeddings' output, does not): the call's backward runs for the
    layer's adapters all the same, and gives x a gradient only where x wants one."""
    extra = []

    def first(h):  # the hidden states; what else a layer returns (None in training) is handed back as it was
        out = run(h, *args)
        if isinstance(out, tuple):
            extra[:] = [out[1:]]
            return out[0]
        return out

    out = _Offloaded.apply(first, slot, x, _anchor(x.device))
    return (out, *extra[0]) if extra else out

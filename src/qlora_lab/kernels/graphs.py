"""Every decoder layer's forward and backward replayed from a CUDA graph (`train.cuda_graphs`).

A training step of a 7B model launches ~4,000 kernels, most of them small, from Python: on a fast GPU the
host, not the GPU, sets the pace (assets/bench/README.md), and a slower host (a Colab VM) falls further
behind. A CUDA graph records a layer's kernels once and launches them all with one call. Here each decoder
layer gets two graphs, its forward and its backward (recomputation included where the plan recomputes
that layer), captured together on the first training step of a batch shape:

    forward:  layers 0..n-1 in order, each reading the previous one's output buffer in place
    backward: layers n-1..0, each reading the gradient the next one wrote (two buffers, used in turn)

so a step launches one graph per layer and direction, plus the embedding, head, loss and optimizer
eagerly. The graphs share one memory pool, safe because they replay in the order they were captured; a
layer's inputs and outputs are the buffers its neighbours use, so the graphs store what eager training
stores (measured in assets/bench/). The adapters' gradients are the backward graphs' own buffers, handed
to the optimizer as `.grad` (added up where micro-batches accumulate).

A layer whose input waits in CPU memory (recompute.offloaded, the first layers where the plan offloads) gets
two graphs too: its forward without autograd, writing one of two buffers used in turn when the next layer is
offloaded as well (it keeps nothing of its input), and its recomputation with its backward, reading its input
from the buffer it was read from in the forward. The copies to pinned memory and back run between replays on
recompute.py's side stream, ordered by events: layer i's input is copied out while layer i replays its forward
(layer i+1 waits for that copy before it overwrites the buffer), and layer i-1's input comes back into its
buffer while layer i replays its backward. The last two offloaded layers' inputs are not overwritten before
their backward, so they stay in their buffers and are not copied at all. One gradient buffer serves every
backward graph: each reads its output's gradient there and then writes its input's over it.

What a replay cannot see must not change between steps: the captured shapes, dtypes and Python arguments
form the key; a training forward with another key runs eagerly (and drops the graphs, giving their memory
back); a shape seen again (REPEATS times) is captured anew, at most MAX_CAPTURES times a run. Eval,
generation and no-grad forwards never use them. Where a layer could not be replayed faithfully (no GPU,
several processes, LoRA layers outside the fused path, adapter dropout without the graph-safe kernel of
dropout.py) `enable` declines and says why. tests/integration/test_gpu.py compares graphed and eager
training (loss and every adapter gradient, with dropout, with recomputation and with offloaded inputs).
"""
from __future__ import annotations

import logging
import types
import weakref

import torch

from . import recompute

log = logging.getLogger("qlora_lab.train")

_STATE = "_qlora_lab_layer_graphs"   # on the model: its LayerGraphs
_LAYER = "_qlora_lab_graph_index"    # on a decoder layer: its index in LayerGraphs.layers
REPEATS = 2        # a batch shape is captured once it has been seen this many times in training forwards
MAX_CAPTURES = 4   # after this many captures in a run (shapes keep changing), layers run eagerly


def decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


VERIFIED = ("llama", "falcon")  # architectures whose layers test_gpu.py trains graphed against eager


def why_not(model, fp16: bool = False, offloaded: bool = False) -> str | None:
    """None if every decoder layer can be replayed from a graph, else the reason it cannot. offloaded: replay
    layers whose input waits in CPU memory too (train.offload_graphs)."""
    from . import dropout, fused_lora

    if not torch.cuda.is_available():
        return "no CUDA device"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in VERIFIED:
        return f"model_type {model_type!r} is not verified under graph capture (verified: {', '.join(VERIFIED)})"
    from .falcon_attention import SPLIT

    if any(hasattr(m, "_split_heads") and not m.__dict__.get(SPLIT) for m in model.modules()):
        return ("an attention whose heads transformers splits with a list index (a host copy per call; "
                "kernels.liger.apply splits Falcon-7B's by slicing)")
    if fp16:
        return ("fp16 compute (a T4): its memory plan is measured without the graphs' pool, which holds one "
                "layer's working memory on top")
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return "several processes (their gradient hooks run outside a graph)"
    layers = decoder_layers(model)
    if not layers:
        return "no decoder layers found"
    off = [recompute.is_offloaded(l) for l in layers]
    if any(off) and not offloaded:
        return ("offloaded checkpoints (their copies to and from CPU memory run between layers; "
                "train.offload_graphs replays them too)")
    if any(b and not a for a, b in zip(off, off[1:])):
        return ("an offloaded layer after one that is not (model.set_recomputation offloads the first layers; the "
                "buffers used in turn hold only inputs that are copied out)")
    for layer in layers:
        for m in layer.modules():
            if hasattr(m, "lora_A") and len(m.lora_A) and not hasattr(m, fused_lora._ATTR):
                return "a LoRA layer outside the fused path"
            drop = getattr(m, "lora_dropout", {})
            if any(isinstance(d, torch.nn.Dropout) and d.p > 0 for d in drop.values()):
                dev = next(p.device for p in m.parameters())
                if not dropout.usable(dev):
                    return "adapter dropout needs the graph-safe kernel (Triton)"
        if any(isinstance(m, torch.nn.Dropout) and m.p > 0 and "lora_dropout" not in n for n, m in layer.named_modules()):
            return "a dropout in the layer itself (its mask would not be drawn again on recomputation)"
    return None


def enable(model, fp16: bool = False, offloaded: bool = False) -> int:
    """Replay the decoder layers of `model` from CUDA graphs where they apply; returns how many layers (0 and
    one log line saying why, where they cannot). fp16: the plan computes in fp16 (a T4); offloaded: layers whose
    input waits in CPU memory replay too (train.offload_graphs)."""
    reason = why_not(model, fp16, offloaded)
    if reason is not None:
        log.info("cuda graphs: off (%s)", reason)
        return 0
    state = model.__dict__.get(_STATE)
    if state is None:
        state = model.__dict__[_STATE] = LayerGraphs(decoder_layers(model))
    return len(state.layers)


def disable(model) -> int:
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return 0
    state.unhook()
    return len(state.layers)


def count(model) -> int:
    state = model.__dict__.get(_STATE)
    return len(state.layers) if state is not None else 0


def captures(model) -> int:
    state = model.__dict__.get(_STATE)
    return state.captures if state is not None else 0


def _recomputation(layers) -> tuple:
    """Per layer: recomputed or not, and whether its input waits in CPU memory."""
    return tuple((bool(getattr(l, "gradient_checkpointing", False)), recompute.is_offloaded(l)) for l in layers)


def _key(x, kwargs, training_layers):
    """What a replay depends on: the input's shape, dtype and grad flag, every keyword argument (tensors by
    shape and dtype, anything else by value), which layers recompute (and offload), and the autocast state."""
    def part(v):
        if isinstance(v, torch.Tensor):
            return ("T", tuple(v.shape), v.dtype, v.device, v.requires_grad)
        if isinstance(v, (tuple, list)):
            return tuple(part(t) for t in v)
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return ("id", id(v))  # an object (a cache): the same one only
    return (part(x), tuple(sorted((k, part(v)) for k, v in kwargs.items())), training_layers,
            torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))


def _tensors(v, out):
    if isinstance(v, torch.Tensor):
        out.append(v)
    elif isinstance(v, (tuple, list)):
        for t in v:
            _tensors(t, out)
    return out


def _rebuild(v, it):
    """v with its tensors replaced, in order, by those of `it`."""
    if isinstance(v, torch.Tensor):
        return next(it)
    if isinstance(v, (tuple, list)):
        return type(v)(_rebuild(t, it) for t in v)
    return v


class _Graph:
    """One layer's two graphs and the buffers they read and write."""

    def __init__(self, index):
        self.index = index
        self.fwd = self.bwd = None
        self.x = self.out = self.gout = self.gin = None
        self.params, self.pgrads, self.leaves = [], [], []
        self.extra = ()  # what the layer returns after its hidden states (None, for models that return tuples)
        self.offload = False   # the input waits in CPU memory: the forward keeps nothing, the backward recomputes
        self.copy_out = False  # the input is copied out as the forward replays and back into x before the backward
        self.stage = None      # copy_out: x, the buffer the input comes back to (None: nothing to wait for)
        self.wait_copy = None  # the slot whose copy out must finish before the forward replays (it overwrites it)


class LayerGraphs:
    """The graphs of one model's decoder layers, for one key at a time."""

    def __init__(self, layers):
        self.layers = layers
        self.graphs: list[_Graph] = []
        self.key = None
        self.seen: dict = {}
        self.captures = 0
        self.kwargs_src = None   # the keyword tensors last copied into the graphs' buffers (by identity)
        self.kwargs_static: list = []
        self.live = None         # a weak reference: the autograd graph of the last replayed forward, until its backward
        self.active = False      # whether this forward replays (decided at layer 0)
        self.replays = 0         # forwards replayed
        self.aliased = False     # some .grad is a backward graph's buffer, which the next forward replay overwrites
        self.pool = None
        for i, layer in enumerate(layers):
            layer.__dict__[_LAYER] = i
            layer.__dict__[_STATE] = self
            layer.forward = types.MethodType(_dispatch, layer)

    def unhook(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop(_LAYER, None)
            layer.__dict__.pop(_STATE, None)
        self.drop()

    def drop(self) -> None:
        """Free the graphs and their memory pool."""
        if self.graphs and recompute.stash.stream is not None:  # a copy may still read a buffer freed here
            torch.cuda.current_stream().wait_stream(recompute.stash.stream)
        self.graphs, self.key, self.pool, self.kwargs_src, self.kwargs_static, self.live = [], None, None, None, [], None

    def pending(self) -> bool:
        """Whether a replayed forward still waits for its backward (its saved activations are in the pool)."""
        return self.live is not None and self.live() is not None

    # -- layer 0 decides for the whole forward -------------------------------------------------------------
    def start(self, x, kwargs) -> bool:
        """Whether this training forward replays the graphs (capturing them first where the shape is due)."""
        if not (torch.is_grad_enabled() and self.layers[0].training) or not x.is_cuda:
            return False
        key = _key(x, kwargs, _recomputation(self.layers))
        if key != self.key:
            if self.key is not None:
                if self.pending():
                    return False
                log.info("cuda graphs: a new batch shape %s: running eagerly, graphs dropped", tuple(x.shape))
                self.drop()
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] < REPEATS or self.captures >= MAX_CAPTURES:
                if self.captures == MAX_CAPTURES and self.seen[key] == REPEATS:
                    log.info("cuda graphs: %d captures and the shapes keep changing: eager from here "
                             "(data.packing keeps every batch one shape)", MAX_CAPTURES)
                return False
            self.capture(x, kwargs, key)
        elif self.pending():  # two forwards before one backward: the first one's activations live in the pool
            return False
        return True

    # -- capture -------------------------------------------------------------------------------------------
    def capture(self, x, kwargs, key) -> None:
        import time
        from functools import partial

        from torch.utils.checkpoint import checkpoint

        recompute.stash.release_idle()  # the eager steps' host buffers: the graphs keep their own
        t0 = time.perf_counter()
        self.drop()
        tensors = _tensors(list(kwargs.values()), [])
        self.kwargs_static = [t.detach().clone() for t in tensors]
        it = iter(self.kwargs_static)
        kw = {k: _rebuild(v, it) for k, v in kwargs.items()}
        n = len(self.layers)
        x0 = x.detach().clone().requires_grad_(x.requires_grad)
        gbuf = torch.empty_like(x)  # each backward graph reads its output's gradient here and writes its input's
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)

        def run(layer, h):
            fn = partial(_raw_forward(layer), layer, **kw)
            if recompute.is_offloaded(layer) and not torch.is_grad_enabled():
                with recompute.first_forward():  # no autograd graph, the training arithmetic (recompute.py)
                    return fn(h)
            if getattr(layer, "gradient_checkpointing", False):
                return checkpoint(fn, h, use_reentrant=False, preserve_rng_state=False,  # dropout.py: no generator
                                  context_fn=recompute.context_fn)  # marks it: lora_mlp.py skips a matmul
            return fn(h)

        def split(out):
            return (out, ()) if isinstance(out, torch.Tensor) else (out[0], tuple(out[1:]))

        graphs = [_Graph(i) for i in range(n)]
        swapped = [_swap_in_leaves(layer) for layer in self.layers]
        for g, layer in zip(graphs, self.layers):
            g.offload = recompute.is_offloaded(layer)
            g.recompute = partial(_raw_forward(layer), layer, **kw)
        try:
            self._capture(graphs, swapped, x0, gbuf, run, split, autocast)
        finally:
            for s in swapped:
                _swap_back(s)
        torch.cuda.synchronize()
        self.graphs, self.key = graphs, key
        self.captures += 1
        log.info("cuda graphs: %d decoder layers captured for batch shape %s in %.1f s", n, tuple(x.shape),
                 time.perf_counter() - t0)

    def _capture(self, graphs, swapped, x0, gbuf, run, split, autocast) -> None:
        n = len(graphs)
        for g, s in zip(graphs, swapped):
            g.params = [p for _, _, p, _ in s]
            g.leaves = [leaf for _, _, _, leaf in s]
        # Warm-up, eagerly on a side stream: compiles the Triton kernels, sets up cuBLAS, runs the NF4 check.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast:
            for _ in range(2):
                for g, layer in zip(graphs, self.layers):
                    h = x0.detach().requires_grad_(True)
                    if g.offload:
                        with torch.no_grad():
                            run(layer, h)
                    out, _ = split(run(layer, h))
                    torch.autograd.grad(out, [h] + g.leaves, torch.ones_like(out), allow_unused=True)
                    del out
        torch.cuda.current_stream().wait_stream(side)
        self.pool = torch.cuda.graph_pool_handle()
        # Offloaded layers after the first read their input from two buffers used in turn (`ahead`): layer i-1
        # writes ahead[(i-1) % 2], layer i reads it (and saves nothing of it). Where a later forward overwrites it,
        # layer i's input is copied out while layer i replays and back into the same buffer before its backward;
        # the last two offloaded layers' inputs are never overwritten and stay where they are.
        ahead = [torch.empty_like(x0), torch.empty_like(x0)] if any(g.offload for g in graphs[1:]) else None
        writes, copied = offload_schedule([g.offload for g in graphs])
        h = x0
        for i, (g, layer) in enumerate(zip(graphs, self.layers)):
            g.x = h
            feeds = writes[i]  # the next layer keeps nothing of this output
            g.copy_out = copied[i]
            g.wait_copy = i - 1 if feeds and i > 1 and graphs[i - 1].copy_out else None  # ahead[i % 2]: its input
            g.fwd = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g.fwd, pool=self.pool), autocast, torch.set_grad_enabled(not g.offload):
                out, extra = split(run(layer, h))
                if feeds:
                    out = ahead[i % 2].copy_(out)
            if any(e is not None for e in extra):
                raise RuntimeError("cuda graphs: a decoder layer returned more than its hidden states")
            g.out, g.extra = out, extra
            h = out if feeds else out.detach().requires_grad_(True)  # the next layer reads this buffer in place
        for i in reversed(range(n)):
            g = graphs[i]
            g.gout = gbuf
            wants_gin = i > 0 or g.x.requires_grad
            g.bwd = torch.cuda.CUDAGraph()
            if g.offload:  # the recomputation is part of the backward graph, from the input's buffer
                g.stage = g.x if g.copy_out else None
                x = g.x.detach().requires_grad_(wants_gin)
            else:
                x = g.x
            inputs = ([x] if wants_gin else []) + g.leaves
            with torch.cuda.graph(g.bwd, pool=self.pool):
                if g.offload:
                    with autocast, recompute.recomputing():  # recompute.py: the recomputed MLP skips its down matmul
                        out, _ = split(g.recompute(x))
                else:
                    out = g.out
                grads = torch.autograd.grad(out, inputs, g.gout, allow_unused=True)
                del out
                if wants_gin:  # over gout, which nothing reads after autograd.grad (one stream, in order)
                    gbuf.copy_(grads[0])
                    grads = grads[1:]
                g.pgrads = [gr if gr is not None else torch.zeros_like(p) for gr, p in zip(grads, g.params)]
                del grads
            g.gin = gbuf if wants_gin else None
            g.out = g.out.detach()
        for g in graphs:  # buffers only: no autograd graph of the capture kept
            g.x = g.x.detach()
            g.leaves = []
            g.recompute = None

    def own_grads(self) -> None:
        """Copy out every .grad that is still a backward graph's buffer: the forward graphs, captured before the
        backward ones, reuse that memory (micro-batches accumulating, or a forward before the optimizer step)."""
        for g in self.graphs:
            for p, pg in zip(g.params, g.pgrads):
                if p.grad is not None and p.grad.data_ptr() == pg.data_ptr():
                    p.grad = p.grad.clone()
        self.aliased = False

    def load_kwargs(self, kwargs) -> None:
        src = _tensors(list(kwargs.values()), [])
        if self.kwargs_src is not None and len(src) == len(self.kwargs_src) and \
                all(a is b for a, b in zip(src, self.kwargs_src)):
            return
        for s, t in zip(self.kwargs_static, src):
            if s.data_ptr() != t.data_ptr():
                s.copy_(t)
        self.kwargs_src = src


def offload_schedule(offload: list) -> tuple[list, list]:
    """(writes, copied) for layers whose input waits in CPU memory where `offload[i]`: writes[i], layer i's
    output goes to ahead[i % 2] (the next layer is offloaded and keeps nothing of it); copied[i], layer i's input
    (ahead[(i-1) % 2]) is overwritten by a later forward, so it is copied out and back. Layer 0's input is x0,
    which stays until the next forward."""
    n = len(offload)
    writes = [i + 1 < n and bool(offload[i + 1]) for i in range(n)]
    copied = [bool(offload[i]) and i > 0 and any(writes[j] for j in range(i + 1, n, 2)) for i in range(n)]
    return writes, copied


def _swap_in_leaves(layer) -> list:
    """Give the layer's trainable parameters fresh leaf tensors on the same memory for the capture, so its
    autograd graph owns its gradient accumulators: ones left alive by an earlier eager step (a loss still
    referenced) were made on another stream, which a capture may not wait on. [(module, name, parameter, leaf)]"""
    out = []
    for name, p in layer.named_parameters():
        if p.requires_grad:
            path, _, attr = name.rpartition(".")
            module = layer.get_submodule(path)
            leaf = torch.nn.Parameter(p.detach(), requires_grad=True)
            module._parameters[attr] = leaf
            out.append((module, attr, p, leaf))
    return out


def _swap_back(swapped) -> None:
    for module, attr, p, _ in swapped:
        module._parameters[attr] = p


def _raw_forward(layer):
    """The layer class's forward without transformers' checkpointing wrapper (graphs.py recomputes itself)."""
    f = type(layer).forward
    return getattr(f, "__wrapped__", f)


def _dispatch(layer, hidden_states, *args, **kwargs):
    kwargs.pop("num_items_in_batch", None)  # the loss's token count, passed down by the Trainer; no layer reads it
    state = layer.__dict__[_STATE]
    i = layer.__dict__[_LAYER]
    if args or not isinstance(hidden_states, torch.Tensor):
        state.active = False
        return type(layer).forward(layer, hidden_states, *args, **kwargs)
    if i == 0:
        state.active = state.start(hidden_states, kwargs)
    if not state.active or i >= len(state.graphs):
        return type(layer).forward(layer, hidden_states, *args, **kwargs)
    g = state.graphs[i]
    if hidden_states.shape != g.x.shape:
        state.active = False
        return type(layer).forward(layer, hidden_states, *args, **kwargs)
    state.load_kwargs(kwargs)
    out = _Replay.apply(state, g, hidden_states, *g.params)
    return (out, *g.extra) if g.extra else out


class _Token:
    """Lives as long as a replayed forward's autograd graph (LayerGraphs.pending)."""


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state, g, x, *params):
        if g.index == 0 and state.aliased:
            state.own_grads()
        if x.data_ptr() != g.x.data_ptr():
            g.x.copy_(x)
        if g.wait_copy is not None:  # this replay overwrites the buffer that copy reads
            recompute.stash.wait_out(("graph", g.wait_copy))
        if g.copy_out:  # runs beside the replay, on the side stream
            recompute.stash.copy_out(("graph", g.index), g.x)
        g.fwd.replay()
        ctx.state, ctx.g = state, g
        if g.index == 0:
            state.replays += 1
            ctx.token = _Token()
            state.live = weakref.ref(ctx.token)
        return g.out.detach()

    @staticmethod
    def backward(ctx, grad):
        g, state = ctx.g, ctx.state
        if grad.data_ptr() != g.gout.data_ptr():
            g.gout.copy_(grad)
        # A .grad that is still this graph's buffer (micro-batches accumulating) is copied out before the replay
        # writes the next micro-batch's gradient there.
        for p, pg in zip(g.params, g.pgrads):
            if p.grad is not None and p.grad.data_ptr() == pg.data_ptr():
                p.grad = p.grad.clone()
        if g.stage is not None:
            recompute.stash.wait_in(("graph", g.index), g.stage)
        prev = state.graphs[g.index - 1] if g.index else None
        if prev is not None and prev.stage is not None:  # comes back while this replay runs
            recompute.stash.copy_in(("graph", prev.index), prev.stage)
        g.bwd.replay()
        to, add = [], []
        for p, pg in zip(g.params, g.pgrads):
            if p.grad is None:
                p.grad = pg
                state.aliased = True
            else:
                to.append(p.grad)
                add.append(pg)
        if to:
            torch._foreach_add_(to, add)
        if g.index == 0:
            state.live = None
        gin = g.gin.detach() if g.gin is not None and ctx.needs_input_grad[2] else None
        return (None, None, gin, *[None] * len(g.params))

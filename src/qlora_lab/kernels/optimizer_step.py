"""bitsandbytes' optimizers wait for the GPU after every parameter's update; this waits once per step.

bitsandbytes' `Optimizer8bit.step` (0.50; the paged and 8-bit AdamW that `train.optim` names) updates one
parameter at a time and calls `torch.cuda.synchronize()` after each. A LoRA of rank 64 on every linear layer
of a 7B Llama has 448 adapter matrices: 448 device syncs per optimizer step, each leaving the GPU idle while
the host prefetches the next parameter's paged states and launches its update (a profile of a Llama-2-7B
8x512 step on an H200 counted 451 `cudaDeviceSynchronize` and ~900 page prefetches per step). The updates
are kernels on one stream, run in the order they are issued, so none needs a sync before the next.

`sync_once(optimizer)` gives a bitsandbytes optimizer a step that issues the same prefetches and the same
update kernels in the same order and synchronizes once, at the end (where bitsandbytes also does for paged
states): the same arithmetic, bit for bit (tests/unit/kernels/test_optimizer_step.py compares parameters and
states with bitsandbytes' own step). `train.optimizer_sync: per-step` (the default) turns it on: +16% on
an H200 (assets/bench/README.md run 7).

With `direct` (train.optimizer_direct, the default) the step also calls bitsandbytes' own C functions itself,
for every parameter whose states are 32-bit on a GPU: the page prefetches (`cprefetch`) and the update
(`c<name>32bit_grad_<dtype>`) with the arguments bitsandbytes' `update_step` passes them. What it skips is the
Python around them (bitsandbytes builds a config dict, checks devices and dispatches a custom op per
parameter): ~75 us of host time per parameter on an H100's host (33 ms a step for 448, where the GPU runs each
update in ~8 us), time the GPU waits for once the backward has finished (bench run 21: 27 ms of gaps between
the updates in a step's profile). A parameter with per-parameter overrides, an update-norm limit, 8-bit states
or not on a GPU goes through bitsandbytes' `update_step` as before. tests/integration/test_gpu.py compares
parameters and states with bitsandbytes' own step bit for bit (passed on an H100, 2026-12-08); bench run 22
measured +2.6-4.4% tokens/s on an H100 (Llama-2-7B shape, with and without offloaded recomputation).
"""
from __future__ import annotations

import types

import torch

_NEEDS = ("initialized", "check_overrides", "to_gpu", "init_state", "prefetch_state", "update_step", "param_groups")


def supported(optimizer) -> bool:
    """A bitsandbytes optimizer whose step is the per-parameter loop this replaces."""
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:
        return False
    return isinstance(optimizer, Optimizer8bit) and all(hasattr(optimizer, a) for a in _NEEDS)


@torch.no_grad()
def _step_sync_once(self, closure=None):
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    fused = getattr(self, "_qlora_lab_fused", None)
    if not self.initialized:
        self.check_overrides()
        if fused is not None:  # before to_gpu, which would move states loaded from a checkpoint to the GPU
            fused.ensure()
        page_loaded_states(self)  # likewise
        self.to_gpu()
        self.initialized = True
    done = fused.step() if fused is not None else ()
    direct = getattr(self, "_qlora_lab_direct", False)
    last = None
    for gindex, group in enumerate(self.param_groups):
        call = None
        for pindex, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if id(p) in done:  # updated by fused_adam.py's one launch
                last = p
                continue
            if len(self.state[p]) == 0:
                self.init_state(group, p, gindex, pindex)
            if direct and p.is_cuda:
                if call is None:
                    call = _Direct(self, group, *_c_functions(), torch.cuda.current_device())
                if call.update(p, gindex, pindex):
                    last = p
                    continue
            self.prefetch_state(p)
            self.update_step(group, p, gindex, pindex)
            last = p
    if last is not None and last.device.type == "cuda":
        torch.cuda.synchronize(last.device)
    return loss


def page_loaded_states(opt, on_gpu=lambda p: p.is_cuda) -> int:
    """Put states loaded from a checkpoint back in paged memory, where a fresh run's first step puts them; returns
    how many tensors moved.

    A paged bitsandbytes optimizer allocates the states of every tensor of 1e5 values or more in paged (managed)
    memory, outside torch's allocator, which the driver moves to the CPU under memory pressure. Its load_state_dict
    leaves the loaded states as they were read (the Trainer reads them to the CPU) and its first step then moves
    them to the GPU as ordinary tensors (`to_gpu`): for a Llama-2-7B LoRA of rank 64, 1.2 GiB more allocated on the
    GPU in a resumed run than in a fresh one. Here each such state is copied, unchanged, into the buffer bitsandbytes'
    own `get_state_buffer` gives a fresh run (paged or not by its rule). on_gpu: whether a parameter is on the GPU
    (the CPU tests stand in for one)."""
    if not getattr(opt, "is_paged", False):
        return 0
    moved = 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p)
            if not state or not on_gpu(p):
                continue
            for key in ("state1", "state2"):
                v = state.get(key)
                if not torch.is_tensor(v) or getattr(v, "is_paged", False) or v.shape != p.shape:
                    continue
                buf = opt.get_state_buffer(p, dtype=v.dtype)
                if not getattr(buf, "is_paged", False):  # a small tensor: bitsandbytes keeps it on the GPU, as to_gpu
                    continue
                buf.copy_(v)
                state[key] = buf
                moved += 1
    return moved


# bitsandbytes' table of 32-bit update functions: one per gradient dtype, in this order (its CUDA backend's)
_GRAD_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class _Direct:
    """One step of one parameter group through bitsandbytes' C functions (the module docstring says what it skips).

    The group's settings become C values once a step; `update` prefetches and updates one parameter with them, or
    returns False where bitsandbytes' own update_step must run (the caller then runs it)."""

    def __init__(self, opt, group, table: dict, lib, device):
        """table: bitsandbytes' 32-bit update functions by optimizer name; lib: its C library (cprefetch);
        device: the index of the GPU the parameters must be on (bitsandbytes would switch to theirs)."""
        import ctypes as ct

        self.opt, self.ct, self.lib = opt, ct, lib
        self.fns = table.get(opt.optimizer_name)
        args = opt.args
        betas = group["betas"]
        self.plain = self.fns is not None and args.optim_bits == 32 and args.max_unorm == 0.0
        f = ct.c_float
        # update_step's arguments after the pointers, in bitsandbytes' order: max_unorm, param_norm (0 without an
        # update-norm limit), beta1, beta2, beta3, alpha, eps, weight_decay; then step; then lr, gnorm_scale, skip_zeros.
        self.head = (f(args.max_unorm), f(0.0), f(betas[0]), f(betas[1]), f(betas[2] if len(betas) >= 3 else 0.0),
                     f(group.get("alpha", 0.0)), f(group["eps"]), f(group["weight_decay"]))
        self.tail = (f(group["lr"]), f(1.0), ct.c_bool(args.skip_zeros))
        self.device = device

    def update(self, p, gindex: int, pindex: int) -> bool:
        opt, ct = self.opt, self.ct
        state = opt.state[p]
        s1, s2 = state.get("state1"), state.get("state2")
        if (not self.plain or s1 is None or s1.dtype != torch.float32 or p.device.index != self.device
                or (gindex, pindex) in opt.mng.index2config or id(p) in opt.mng.pid2config):
            return False
        fn = _GRAD_DTYPES.get(p.grad.dtype)
        if fn is None or fn >= len(self.fns):
            return False
        if not p.data.is_contiguous():  # what update_step does, where it changes anything
            p.data = p.data.contiguous()
        if not p.grad.is_contiguous():
            p.grad = p.grad.contiguous()
        for s in (s1, s2):  # prefetch_state: paged states to this GPU
            if s is not None and getattr(s, "is_paged", False):
                self.lib.cprefetch(ct.c_void_p(s.data_ptr()), ct.c_size_t(s.nbytes), ct.c_int32(s.page_deviceid))
        state["step"] += 1
        self.fns[fn](ct.c_void_p(p.grad.data_ptr()), ct.c_void_p(p.data_ptr()), ct.c_void_p(s1.data_ptr()),
                     None if s2 is None else ct.c_void_p(s2.data_ptr()), None, *self.head,
                     ct.c_int32(state["step"]), *self.tail, ct.c_int32(p.grad.numel()))
        return True


def sync_once(optimizer, direct: bool = False, fused: bool = False) -> bool:
    """Give `optimizer` (a bitsandbytes optimizer) the once-per-step sync, with `direct` the direct calls of
    bitsandbytes' C functions where a parameter allows them, and with `fused` fused_adam.py's one launch for the
    tensors it takes (on this process's GPU, with Triton); False (unchanged) for any other optimizer."""
    if not supported(optimizer):
        return False
    optimizer.step = types.MethodType(_step_sync_once, optimizer)
    optimizer._qlora_lab_direct = bool(direct) and _direct_available()
    optimizer._qlora_lab_fused = None
    if fused and torch.cuda.is_available():
        from . import fused_adam

        device = torch.device("cuda", torch.cuda.current_device())
        if fused_adam.available(device):
            optimizer._qlora_lab_fused = fused_adam.FusedAdam(optimizer, device)
    return True


def _c_functions():
    """(bitsandbytes' table of 32-bit update functions, its C library): CUDA builds only."""
    from bitsandbytes.backends.cuda.ops import str2optimizer32bit
    from bitsandbytes.cextension import lib

    return str2optimizer32bit, lib


def _direct_available() -> bool:
    """bitsandbytes' CUDA library and its table of 32-bit update functions, where this bitsandbytes has them."""
    if not torch.cuda.is_available():
        return False
    try:
        table, lib = _c_functions()
    except (ImportError, AttributeError):
        return False
    return hasattr(lib, "cprefetch") and "adam" in table

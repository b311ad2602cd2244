"""bitsandbytes' 32-bit paged AdamW for every adapter tensor in one kernel launch a step (`train.optimizer_fused`).

Even through its C functions (optimizer_step.py, `train.optimizer_direct`), bitsandbytes' step launches one update
kernel per tensor and prefetches each tensor's two paged states with a driver call of its own: for a Llama-2-7B
LoRA of rank 64, 448 launches and 896 prefetches a step, each microseconds of host time beside ~8 us of GPU work.
Run 21's profile found 27 ms a step of GPU idle time between the updates; the direct calls took ~12 ms of it away
(run 22). `FusedAdam` takes the rest:

- the 32-bit states of every eligible tensor live in one buffer (paged, as bitsandbytes allocates them, for a paged
  optimizer), carved into the per-tensor views bitsandbytes' own state dict holds (`state1`, `state2`, marked
  paged as bitsandbytes marks its own), so one prefetch a step brings them all to the GPU;
- one Triton launch (_adam_triton.py) updates every tensor that has a gradient, reading a table of addresses.

States loaded from a checkpoint are copied into the buffer too: bitsandbytes itself would move them to the GPU as
ordinary tensors (its `to_gpu`), outside the paged memory a fresh run uses. Eligible: fp32 contiguous parameters
on this GPU, in groups with weight decay 0 (bitsandbytes' CUDA kernels and its other backends apply AdamW's decay
in different orders, bitsandbytes issue 2010), the Adam update without an update-norm limit, no per-parameter
overrides, one pair of betas. Anything else (and any gradient that is not fp32 and contiguous) goes through
optimizer_step.py's path. The arithmetic is bitsandbytes' (the kernel's docstring), except the step size and
eps * c2, which the host computes in float64 and rounds to fp32 where bitsandbytes computes them in fp32 on the
GPU: the same update to within the rounding of fp32.

Off by default until a GPU run measures it. tests/unit/kernels/test_fused_adam.py runs it in Triton's CPU
interpreter against bitsandbytes' CPU step; tests/integration/test_gpu.py against bitsandbytes' CUDA step.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

BLOCK = 1024   # values per program
ALIGN = 64     # each tensor's states start at a multiple of this many values (256 bytes)


@functools.cache
def _kernel():
    try:
        from ._adam_triton import adam32_many
    except ImportError:  # no Triton (a CPU-only install)
        return None
    return adam32_many


def available(device) -> bool:
    """Whether the fused step can run on `device`: a CUDA GPU with Triton."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available() and _kernel() is not None


def _group_ok(opt, group) -> bool:
    betas = group["betas"]
    return (opt.optimizer_name == "adam" and opt.args.optim_bits == 32 and opt.args.max_unorm == 0.0
            and group["weight_decay"] == 0.0 and (len(betas) == 2 or betas[2] == 0.0) and group.get("alpha", 0.0) == 0.0)


class FusedAdam:
    """The pooled states and the one-launch step of one bitsandbytes optimizer (module docstring).

    device: the GPU whose parameters it updates. on_device, alloc and prefetch stand in for the GPU in the CPU
    tests (Triton's interpreter): which parameters count as on the device, how the pool is allocated (numel,
    paged) -> tensor, and how it is prefetched."""

    def __init__(self, opt, device, on_device=None, alloc=None, prefetch=None):
        self.opt = opt
        self.device = torch.device(device)
        self.on_device = on_device or (lambda p: p.device == self.device)
        self.alloc = alloc or _alloc
        self.prefetch = prefetch or _prefetch
        self.params: list = []      # the eligible parameters, in the optimizer's order
        self.groups: list = []      # their groups' indices
        self.views: list = []       # their (state1, state2): views of the pool
        self.pool = None
        self.betas = None
        self.planned = False        # ensure() has chosen the tensors (perhaps none)

    # -- the pool ------------------------------------------------------------------------------------------
    def _eligible(self) -> list:
        opt, out, betas = self.opt, [], None
        for gi, group in enumerate(opt.param_groups):
            if not _group_ok(opt, group):
                continue
            b = tuple(float(x) for x in group["betas"][:2])
            if betas is None:
                betas = b
            if b != betas:  # the kernel takes one pair of betas
                continue
            for pi, p in enumerate(group["params"]):
                if (p.requires_grad and p.dtype == torch.float32 and p.is_contiguous() and self.on_device(p)
                        and (gi, pi) not in opt.mng.index2config and id(p) not in opt.mng.pid2config):
                    out.append((gi, p))
        self.betas = betas
        return out

    def ensure(self) -> None:
        """Pool the states where that has not been done, or where something replaced them since (a state dict
        loaded): after bitsandbytes' check_overrides, before its to_gpu."""
        if self.planned and all(self.opt.state.get(p, {}).get("state1") is v1
                                for p, (v1, _) in zip(self.params, self.views)):
            return
        self.planned = True
        chosen = self._eligible()
        self.params = [p for _, p in chosen]
        self.groups = [g for g, _ in chosen]
        sizes = [p.numel() for p in self.params]
        starts = np.zeros(len(sizes) + 1, dtype=np.int64)
        starts[1:] = np.cumsum([-(-n // ALIGN) * ALIGN for n in sizes])
        half = int(starts[-1])
        self.pool = self.alloc(2 * half, bool(getattr(self.opt, "is_paged", False))) if self.params else None
        paged = getattr(self.pool, "is_paged", False)  # views marked as bitsandbytes marks its paged states
        self.views = []
        for p, s, n in zip(self.params, starts[:-1], sizes):
            v1 = self.pool[s:s + n].view(p.shape)
            v2 = self.pool[half + s:half + s + n].view(p.shape)
            for v in (v1, v2):
                if paged:
                    v.is_paged, v.page_deviceid = True, self.device.index
            state = self.opt.state[p]
            old1, old2 = state.get("state1"), state.get("state2")
            if old1 is not None and old2 is not None:  # a fresh step count's states, or a checkpoint's: kept
                v1.copy_(old1.reshape(p.shape))
                v2.copy_(old2.reshape(p.shape))
            else:
                state["step"] = 0
            state["state1"], state["state2"] = v1, v2
            self.views.append((v1, v2))
        self._tables(sizes)

    def _tables(self, sizes) -> None:
        k = len(sizes)
        blocks = [-(-n // BLOCK) for n in sizes]
        pin = self.device.type == "cuda"
        self.block_param = torch.tensor(np.repeat(np.arange(k, dtype=np.int32), blocks), device=self.device)
        self.block_start = torch.tensor(np.concatenate([np.arange(b, dtype=np.int32) * BLOCK for b in blocks])
                                        if k else np.zeros(0, np.int32), device=self.device)
        self.table_host = torch.zeros((5, k), dtype=torch.int64, pin_memory=pin)
        self.scalars_host = torch.zeros((2, k), dtype=torch.float32, pin_memory=pin)
        self.table = torch.empty((5, k), dtype=torch.int64, device=self.device)
        self.scalars = torch.empty((2, k), dtype=torch.float32, device=self.device)
        self.sizes = np.asarray(sizes, dtype=np.int64)

    # -- the step ------------------------------------------------------------------------------------------
    def step(self) -> set:
        """Update every pooled parameter whose gradient is fp32 and contiguous, in one launch; returns their ids
        (the caller updates the others as before)."""
        self.ensure()
        if not self.params:
            return set()
        opt, k = self.opt, len(self.params)
        t, sc = self.table_host.numpy(), self.scalars_host.numpy()
        lr = np.zeros(k, dtype=np.float64)   # a tensor without a gradient this step: lr and eps 0, its row unused
        eps = np.zeros(k, dtype=np.float64)
        steps = np.ones(k, dtype=np.float64)
        done = set()
        for j, (p, gi, (v1, v2)) in enumerate(zip(self.params, self.groups, self.views)):
            g = p.grad
            if g is None or g.dtype != torch.float32 or not g.is_contiguous() or g.device != p.device:
                t[4, j] = 0
                continue
            state = opt.state[p]
            state["step"] += 1
            steps[j] = state["step"]
            group = opt.param_groups[gi]
            lr[j], eps[j] = group["lr"], group["eps"]
            t[0, j], t[1, j], t[2, j], t[3, j], t[4, j] = g.data_ptr(), p.data_ptr(), v1.data_ptr(), v2.data_ptr(), self.sizes[j]
            done.add(id(p))
        if not done:
            return done
        beta1, beta2 = self.betas
        c1 = 1.0 - beta1 ** steps
        c2 = np.sqrt(1.0 - beta2 ** steps)
        sc[0] = -lr * c2 / c1
        sc[1] = eps * c2
        self.table.copy_(self.table_host, non_blocking=True)
        self.scalars.copy_(self.scalars_host, non_blocking=True)
        self.prefetch(self.pool, self.device)
        _kernel()[(len(self.block_param),)](self.table, self.scalars, k, self.block_param, self.block_start,
                                            beta1, beta2, BLOCK=BLOCK)
        return done


def _alloc(numel: int, paged: bool):
    """The pool: paged (managed) memory as bitsandbytes allocates a paged state, zeroed by its fill; else a tensor."""
    import bitsandbytes.functional as F

    if not paged:
        return torch.zeros(numel, dtype=torch.float32, device="cuda")
    buf = F.get_paged(numel, dtype=torch.float32, device=torch.device("cuda", torch.cuda.current_device()))
    F.fill(buf, 0)
    F.GlobalPageManager.get_instance().paged_tensors.append(buf)
    return buf


def _prefetch(pool, device) -> None:
    """One prefetch of the whole pool to the GPU (what bitsandbytes' prefetch_state does per tensor)."""
    if not getattr(pool, "is_paged", False):
        return
    import ctypes as ct

    from bitsandbytes.cextension import lib

    lib.cprefetch(ct.c_void_p(pool.data_ptr()), ct.c_size_t(pool.nbytes), ct.c_int32(device.index))

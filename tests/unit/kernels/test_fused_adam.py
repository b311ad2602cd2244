"""kernels.fused_adam (train.optimizer_fused): the pooled states and the one-launch step update what bitsandbytes'
own step updates. On the CPU the pool is an ordinary tensor and the kernel runs in Triton's interpreter (skipped
where Triton is not installed), against bitsandbytes' CPU step; tests/integration/test_gpu.py compares the CUDA
kernel with bitsandbytes' CUDA step, paged memory included."""
from __future__ import annotations

import bitsandbytes as bnb
import numpy as np
import pytest
import torch

from qlora_lab.kernels import fused_adam, optimizer_step

from .conftest import run_in_triton_interpreter

SHAPES = [(64, 16), (40, 70), (8, 8), (3, 5)]  # one exactly a block, one over two blocks, small and odd ones


def _params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _optimizer(params, weight_decay: float = 0.0, split: bool = False):
    if split:  # a second group with weight decay: not pooled
        groups = [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.01}]
        return bnb.optim.PagedAdamW32bit(groups, lr=1e-2, betas=(0.9, 0.995), eps=1e-6, weight_decay=weight_decay)
    return bnb.optim.PagedAdamW32bit(params, lr=1e-2, betas=(0.9, 0.995), eps=1e-6, weight_decay=weight_decay)


def _cpu_fused(opt):
    """A FusedAdam for CPU tensors: the pool a plain tensor, no prefetch (the GPU's paged memory is the GPU test's)."""
    assert optimizer_step.sync_once(opt)
    opt._qlora_lab_fused = fused_adam.FusedAdam(opt, "cpu", on_device=lambda p: True,
                                                alloc=lambda n, paged: torch.zeros(n), prefetch=lambda pool, d: None)
    return opt._qlora_lab_fused


def _train(params, opt, steps: int = 5):
    g = torch.Generator().manual_seed(1)
    taken = []
    fused = getattr(opt, "_qlora_lab_fused", None)
    if fused is not None:  # record what each step's one launch took
        real = fused.step
        fused.step = lambda: taken.append(real()) or taken[-1]
    for step in range(steps):
        opt.param_groups[0]["lr"] = 1e-2 / (1 + step)  # a scheduler changes the lr between steps
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g)
            if i == 2 and step % 2:
                grad = None  # no gradient in some steps, as an unused adapter
            elif i == 1 and step == 3:
                grad = torch.randn(tuple(reversed(p.shape)), generator=g).t()  # not contiguous: bitsandbytes' path
            p.grad = grad
        opt.step()
    return taken


def _assert_rounding_apart(got, ref, what: str) -> None:
    """Apart by fp32 rounding only: within 4 units of the last place of the tensor's largest value (the kernel
    fuses multiply-adds where bitsandbytes' CPU step rounds twice, and its step size comes from the host)."""
    worst = (got.detach() - ref.detach()).abs().max().item()
    assert worst <= 4 * torch.finfo(torch.float32).eps * ref.detach().abs().max().item(), (what, worst)


def check_in_interpreter() -> None:
    """Run in a child process with TRITON_INTERPRET=1 (conftest.run_in_triton_interpreter)."""
    for split in (False, True):
        ref = _params()
        ref_opt = _optimizer(ref, split=split)
        _train(ref, ref_opt)
        got = _params()
        opt = _optimizer(got, split=split)
        fused = _cpu_fused(opt)
        taken = _train(got, opt)
        pooled = 2 if split else 4
        assert len(fused.params) == pooled
        # every step: the pooled tensors with an fp32 contiguous gradient (not the one without, not the strided one)
        expected = [{id(p) for i, p in enumerate(got[:pooled])
                     if not (i == 2 and s % 2) and not (i == 1 and s == 3)} for s in range(5)]
        assert taken == expected
        for i, (a, b) in enumerate(zip(ref, got)):
            _assert_rounding_apart(b, a, f"parameter {i}")
            sa, sb = ref_opt.state[a], opt.state[b]
            assert sa["step"] == sb["step"]
            for k in ("state1", "state2"):
                _assert_rounding_apart(sb[k], sa[k], f"{k} of parameter {i}")
            if i < pooled:  # a view of the pool
                assert sb["state1"].untyped_storage().data_ptr() == fused.pool.untyped_storage().data_ptr()
            else:  # bitsandbytes' own step, bit for bit
                assert torch.equal(a, b)
    print("checked")


def test_the_fused_step_is_bitsandbytes_step_in_the_interpreter():
    assert "checked" in run_in_triton_interpreter("test_fused_adam", "check_in_interpreter")


def test_the_pool_holds_each_tensor_aligned_and_takes_over_existing_states():
    """Without Triton: which tensors the pool takes, where their states sit, and states that existed before
    (a checkpoint's, loaded) copied in with their step counts."""
    params = _params()
    opt = _optimizer(params, split=True)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()  # bitsandbytes' own step: states and step counts exist
    before = {id(p): (opt.state[p]["state1"].clone(), opt.state[p]["state2"].clone()) for p in params}
    fused = _cpu_fused(opt)
    fused.ensure()
    assert fused.params == params[:2]  # the weight-decay group stays with bitsandbytes
    half = fused.pool.numel() // 2
    for p, (v1, v2) in zip(fused.params, fused.views):
        st = opt.state[p]
        assert st["state1"] is v1 and st["state2"] is v2 and st["step"] == 1
        assert torch.equal(v1, before[id(p)][0]) and torch.equal(v2, before[id(p)][1])
        off = v1.storage_offset()
        assert off % fused_adam.ALIGN == 0 and v2.storage_offset() == half + off
    for p in params[2:]:
        assert opt.state[p]["state1"].untyped_storage().data_ptr() != fused.pool.untyped_storage().data_ptr()
    # A state dict loaded over it: the next step pools the loaded states again.
    loaded = opt.state_dict()
    opt.load_state_dict(loaded)
    assert opt.state[params[0]]["state1"] is not fused.views[0][0]
    fused.ensure()
    assert opt.state[params[0]]["state1"] is fused.views[0][0]
    assert torch.equal(fused.views[0][0], before[id(params[0])][0])


def test_what_the_pool_leaves_to_bitsandbytes(monkeypatch):
    """Tensors with their own settings, other groups' betas, 8-bit states and other devices are not pooled. (The
    override goes into bitsandbytes' process-wide manager by monkeypatch, so that it ends with the test.)"""
    params = _params()
    opt = bnb.optim.PagedAdamW32bit([{"params": params[:2]}, {"params": params[2:], "betas": (0.8, 0.99)}], lr=1e-3,
                                    weight_decay=0.0)
    monkeypatch.setitem(opt.mng.pid2config, id(params[1]), {"lr": 1e-5})
    fused = _cpu_fused(opt)
    fused.ensure()
    assert fused.params == [params[0]]
    assert fused_adam.FusedAdam(bnb.optim.PagedAdamW8bit(params, lr=1e-3, weight_decay=0.0), "cpu", on_device=lambda p: True,
                                alloc=lambda n, paged: torch.zeros(n))._eligible() == []
    on_gpu_only = fused_adam.FusedAdam(_optimizer(params), "cuda:0", alloc=lambda n, paged: torch.zeros(n))
    assert on_gpu_only._eligible() == []  # CPU parameters
    assert not fused_adam.available("cpu")


def test_the_host_computes_the_step_size_of_each_tensor(monkeypatch):
    """The kernel's scalars: bitsandbytes' step size -lr c2 / c1 and eps c2 for each tensor's own step count, and
    its table: each tensor's gradient address and size (the launch itself recorded, not run)."""
    params = _params()
    fused = _cpu_fused(_optimizer(params))
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: launched.append((grid, fused.scalars.clone(), fused.table.clone()))

    monkeypatch.setattr(fused_adam, "_kernel", lambda: Kernel())
    for p in params:
        p.grad = torch.randn(p.shape)
    fused.ensure()
    fused.opt.state[params[3]]["step"] = 6  # a tensor that has taken more steps than the others
    fused.step()
    (grid, scalars, table), = launched
    assert grid == (sum(-(-p.numel() // fused_adam.BLOCK) for p in params),)
    for j, t in enumerate([1, 1, 1, 7]):
        c1, c2 = 1 - 0.9 ** t, np.sqrt(1 - 0.995 ** t)
        assert scalars[0, j].item() == pytest.approx(-1e-2 * c2 / c1, rel=1e-7)
        assert scalars[1, j].item() == pytest.approx(1e-6 * c2, rel=1e-7)
        assert table[4, j].item() == params[j].numel() and table[0, j].item() == params[j].grad.data_ptr()

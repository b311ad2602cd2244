"""kernels.optimizer_step: a bitsandbytes optimizer step with one device sync computes what bitsandbytes'
own step computes, bit for bit (on the CPU, where bitsandbytes runs its optimizers too; the sync itself is
a CUDA matter, and the GPU run is the bench's `train.optimizer_sync` variant)."""
from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from qlora_lab.kernels import optimizer_step


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 16), (16, 48), (8, 8), (32, 4)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _train(cls, once: bool, steps: int = 4, direct: bool = False):
    params = _params(0)
    opt = cls(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    if once:
        assert optimizer_step.sync_once(opt, direct=direct)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, p in enumerate(params):
            # one parameter without a gradient in some steps, as a frozen or unused adapter would be
            p.grad = None if (i == 2 and step % 2) else torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("cls", [bnb.optim.PagedAdamW32bit, bnb.optim.AdamW32bit, bnb.optim.PagedAdamW8bit])
def test_one_sync_step_is_bitsandbytes_step_bit_for_bit(cls, direct):
    """On the CPU; `direct` asks for bitsandbytes' C functions called directly, which only a GPU's parameters take
    (tests/integration/test_gpu.py compares that path on the GPU): here every parameter goes through update_step."""
    ref, ref_opt = _train(cls, once=False)
    got, got_opt = _train(cls, once=True, direct=direct)
    assert got_opt._qlora_lab_direct is (direct and torch.cuda.is_available())
    assert got_opt.step.__func__ is optimizer_step._step_sync_once
    for a, b, p0 in zip(ref, got, _params(0)):
        assert torch.equal(a, b)
        assert not torch.equal(b, p0)  # it did train
    for a, b in zip(ref, got):
        sa, sb = ref_opt.state[a], got_opt.state[b]
        assert sa.keys() == sb.keys()
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert torch.equal(sa[k], sb[k]), k
            else:
                assert sa[k] == sb[k], k


def test_other_optimizers_are_left_alone():
    opt = torch.optim.AdamW(_params(0), lr=1e-3)
    step = opt.step
    assert not optimizer_step.supported(opt) and not optimizer_step.sync_once(opt)
    assert opt.step == step


def test_trainer_applies_it_when_the_config_asks(tmp_path):
    from transformers import TrainingArguments

    from qlora_lab.training import Trainer

    model = torch.nn.Linear(4, 1)
    for sync, expected in (("per-step", True), ("per-parameter", False)):
        args = TrainingArguments(output_dir=str(tmp_path), optim="paged_adamw_32bit", use_cpu=True, report_to=[])
        tr = Trainer(model=model, args=args, optimizer_sync=sync)
        opt = tr.create_optimizer()
        assert optimizer_step.supported(opt)  # the Trainer's bitsandbytes AdamW (paged on a GPU)
        assert (getattr(opt.step, "__func__", None) is optimizer_step._step_sync_once) is expected

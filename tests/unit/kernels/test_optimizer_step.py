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


def _f32(x) -> float:
    return float(torch.tensor(float(x), dtype=torch.float32))


def test_direct_calls_pass_the_values_bitsandbytes_update_step_passes(monkeypatch):
    """_Direct (train.optimizer_direct) calls bitsandbytes' C update with what bitsandbytes' update_step hands its
    functional layer, in the order bitsandbytes' CUDA backend passes it on (g, p, state1, state2, unorm, max_unorm,
    param_norm, beta1, beta2, beta3, alpha, eps, weight_decay, step, lr, gnorm_scale, skip_zeros, n), and prefetches
    the paged states prefetch_state prefetches. On the CPU, where the C functions do not exist: both sides are
    recorded, not run. The numbers themselves are compared on the GPU (tests/integration/test_gpu.py)."""
    import bitsandbytes.functional as F

    params = _params(0)
    opt = bnb.optim.PagedAdamW32bit(params, lr=1e-2, betas=(0.9, 0.995), eps=1e-7, weight_decay=0.01)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()  # bitsandbytes' own (CPU) step: the states exist
    for p in params:  # as on a GPU, where states of >= 1e5 values live in paged memory
        for k in ("state1", "state2"):
            opt.state[p][k].is_paged, opt.state[p][k].page_deviceid = True, 3
    group = opt.param_groups[0]

    theirs, our_calls, fetched = [], [], {"theirs": [], "ours": []}

    def functional(name, g, p, state1, beta1, eps, step, lr, state2=None, beta2=0.0, beta3=0.0, alpha=0.0,
                   weight_decay=0.0, gnorm_scale=1.0, unorm_vec=None, max_unorm=0.0, skip_zeros=False):
        assert name == "adam" and unorm_vec is None and max_unorm == 0.0
        theirs.append((g.data_ptr(), p.data_ptr(), state1.data_ptr(), state2.data_ptr(), None, 0.0, 0.0,
                       _f32(beta1), _f32(beta2), _f32(beta3), _f32(alpha), _f32(eps), _f32(weight_decay), step,
                       _f32(lr), _f32(gnorm_scale), bool(skip_zeros), g.numel()))

    def c_update(*args):
        our_calls.append(tuple(getattr(a, "value", a) for a in args))

    class Lib:
        def cprefetch(self, ptr, nbytes, device):
            fetched["ours"].append((ptr.value, nbytes.value, device.value))

    monkeypatch.setattr(F, "optimizer_update_32bit", functional)
    monkeypatch.setattr(F, "prefetch_tensor", lambda t, to_cpu=False: fetched["theirs"].append(
        (t.data_ptr(), t.nbytes, t.page_deviceid)))
    for lr in (1e-2, 5e-3):  # a scheduler changes the group's lr between steps
        group["lr"] = lr
        steps = [opt.state[p]["step"] for p in params]
        for i, p in enumerate(params):
            opt.prefetch_state(p)
            opt.update_step(group, p, 0, i)
        for p, s in zip(params, steps):
            opt.state[p]["step"] = s
        direct = optimizer_step._Direct(opt, group, {"adam": (c_update, c_update, c_update)}, Lib(), None)
        assert all(direct.update(p, 0, i) for i, p in enumerate(params))
    assert our_calls == theirs and len(theirs) == 2 * len(params)
    assert [c[13] for c in our_calls] == [2] * len(params) + [3] * len(params)  # each parameter's step counter
    assert fetched["ours"] == fetched["theirs"] and len(fetched["ours"]) == 4 * len(params)


def test_direct_calls_leave_what_they_cannot_do_to_bitsandbytes(monkeypatch):
    """A parameter with its own settings (bitsandbytes' override_config), an 8-bit optimizer or an update-norm
    limit goes through bitsandbytes' update_step: _Direct.update says False and calls nothing for it. (The
    override goes into bitsandbytes' process-wide manager by monkeypatch: it must not outlive the test, or a later
    tensor at the same address would take it.)"""
    def direct_says(cls, override=False, max_unorm=0.0):
        params = _params(0)
        opt = cls(params, lr=1e-3)
        opt.args.max_unorm = max_unorm  # what LAMB and LARS set; an AdamW could through its args
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
        if override:
            monkeypatch.setitem(opt.mng.pid2config, id(params[0]), {"lr": 1e-5})
        calls = []
        d = optimizer_step._Direct(opt, opt.param_groups[0], {"adam": (lambda *a: calls.append(a),) * 3}, None, None)
        said = [d.update(p, 0, i) for i, p in enumerate(params)]
        assert len(calls) == sum(said)
        return said

    assert direct_says(bnb.optim.PagedAdamW32bit) == [True] * 4
    assert direct_says(bnb.optim.PagedAdamW32bit, override=True) == [False, True, True, True]
    assert direct_says(bnb.optim.PagedAdamW8bit) == [False] * 4
    assert direct_says(bnb.optim.PagedAdamW32bit, max_unorm=0.5) == [False] * 4


def test_states_loaded_from_a_checkpoint_go_back_to_paged_memory(monkeypatch):
    """A resumed run's states live where a fresh run's do: bitsandbytes would move the loaded ones to the GPU as
    ordinary tensors. On the CPU bitsandbytes pages nothing, so its get_state_buffer is stood in for by one that marks
    what it gives as paged (as it does on a GPU for 1e5 values or more), and the prefetch of those by a no-op. The
    states arrive unchanged, and the steps after the resume are those of an uninterrupted run, bit for bit."""
    import io

    import bitsandbytes.functional as F

    monkeypatch.setattr(F, "prefetch_tensor", lambda t, to_cpu=False: None)
    whole, _ = _train(bnb.optim.PagedAdamW32bit, once=True, steps=4)

    first, opt = _train(bnb.optim.PagedAdamW32bit, once=True, steps=2)
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    params = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = bnb.optim.PagedAdamW32bit(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    assert optimizer_step.sync_once(resumed)
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    loaded = {(i, k): resumed.state[p][k].clone() for i, p in enumerate(params) for k in ("state1", "state2")}
    given = []

    def paged_buffer(p, dtype=torch.float32):
        t = torch.zeros_like(p, dtype=dtype)
        t.is_paged = True
        given.append(t)
        return t

    monkeypatch.setattr(resumed, "get_state_buffer", paged_buffer)
    assert optimizer_step.page_loaded_states(resumed, on_gpu=lambda p: True) == 2 * len(params)
    for i, p in enumerate(params):
        for k in ("state1", "state2"):
            v = resumed.state[p][k]
            assert any(v is t for t in given) and torch.equal(v, loaded[(i, k)])
    assert optimizer_step.page_loaded_states(resumed, on_gpu=lambda p: True) == 0  # already paged: left alone

    g = torch.Generator().manual_seed(1)
    for step in range(4):  # the same gradients as _train's, from where the resume picks up
        for i, p in enumerate(params):
            grad = None if (i == 2 and step % 2) else torch.randn(p.shape, generator=g)
            p.grad = grad if step >= 2 else None
        if step >= 2:
            resumed.step()
    for a, b in zip(whole, params):
        assert torch.equal(a, b)

"""The Trainer subclass around Trainer.train: what it does to the process's garbage collector."""
from __future__ import annotations

import gc

import torch


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(4, 1)

    def forward(self, x, labels=None):
        return {"loss": ((self.w(x).squeeze(-1) - labels) ** 2).mean()}


def test_train_freezes_what_is_alive_and_releases_it_after(tmp_path):
    from transformers import TrainerCallback, TrainingArguments

    from qlora_lab.training import Trainer

    frozen_during = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            frozen_during.append(gc.get_freeze_count())

    data = [{"x": torch.randn(4), "labels": torch.tensor(1.0)} for _ in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    before = gc.get_freeze_count()
    tr = Trainer(model=_Tiny(), args=args, train_dataset=data, callbacks=[Probe()])
    tr.train()
    assert len(frozen_during) == 2 and min(frozen_during) > before + 1000  # the model, torch, transformers...
    assert gc.get_freeze_count() == before


class _Counted(_Tiny):
    """A model that counts how often the Trainer asks it for its FLOPs (transformers' models walk every module)."""

    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.asked = 0

    def num_parameters(self, exclude_embeddings=False):
        self.asked += 1
        return 5


def _trainer(tmp_path, model):
    from transformers import TrainingArguments

    from qlora_lab.training import Trainer

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=[{"x": torch.randn(4), "labels": torch.tensor(1.0)}] * 4)


def test_floating_point_ops_counts_the_parameters_once(tmp_path):
    model = _Counted()
    tr = _trainer(tmp_path, model)
    for tokens in (16, 16, 40):
        assert tr.floating_point_ops({"input_ids": torch.zeros(1, tokens)}) == 6 * tokens * 5  # the model's estimate
    assert model.asked == 1
    assert tr.floating_point_ops({"x": torch.zeros(2)}) == 0  # no input_ids: the Trainer's own answer


def test_zero_grad_clears_the_trainable_parameters_only(tmp_path):
    model = _Counted()
    _trainer(tmp_path, model)
    model.frozen.weight.grad = torch.ones(4, 4)  # a frozen weight never gets one in training; this one stays
    model.w(torch.randn(3, 4)).sum().backward()
    assert model.w.weight.grad is not None
    model.zero_grad(set_to_none=False)
    assert model.w.weight.grad.eq(0).all() and model.w.bias.grad.eq(0).all()
    model.zero_grad()
    assert model.w.weight.grad is None and model.w.bias.grad is None
    assert model.frozen.weight.grad.eq(1).all()


def test_adapters_finite_reads_every_trainable_tensor_and_only_those(tmp_path):
    model = _Counted()
    tr = _trainer(tmp_path, model)
    assert tr.adapters_finite()
    with torch.no_grad():
        model.frozen.weight[0, 0] = float("nan")  # frozen: not an adapter
    assert tr.adapters_finite()
    with torch.no_grad():
        model.w.bias[0] = float("inf")
    assert not tr.adapters_finite()

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

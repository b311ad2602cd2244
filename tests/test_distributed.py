"""Data-parallel training through torchrun (gloo on the CPU): the same losses as one process."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qlora_lab.runs import RunFolder
from qlora_lab.hardware import split_global_batch
from qlora_lab.errors import ConfigError

from .conftest import CONFIGS, ROOT, run_cli

SETS = ["train.max_steps=4", "train.gradient_accumulation_steps=2", "train.per_device_train_batch_size=4",
        "data.eval_size=0", "train.save_steps=100"]


def _sets():
    return sum((["--set", s] for s in SETS), [])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_llama_qlora"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, name):
    one = tmp_path / "one"
    r = run_cli("train", CONFIGS / f"{name}.yaml", "--output-dir", one, *_sets())
    assert r.returncode == 0, r.stderr[-2000:]
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                        "-m", "qlora_lab.cli", "train", str(CONFIGS / f"{name}.yaml"), "--output-dir", str(two),
                        *_sets()], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "over 2 processes" in p.stderr
    a, b = RunFolder(one).metrics(), RunFolder(two).metrics()
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3, 4]  # written once, by rank 0
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        assert abs(x["loss"] - y["loss"]) <= 1e-3 * abs(x["loss"]), (a, b)
    assert (two / "adapter" / "adapter_model.safetensors").is_file()


def test_global_batch_split():
    reasons = []
    assert split_global_batch(4, 4, 1, reasons) == (4, 4)
    assert split_global_batch(4, 4, 2, reasons) == (4, 2)
    assert split_global_batch(4, 1, 2, reasons) == (2, 1)
    assert split_global_batch(3, 4, 4, reasons) == (3, 1)
    with pytest.raises(ConfigError, match="cannot be split evenly over 4"):
        split_global_batch(3, 1, 4, [])

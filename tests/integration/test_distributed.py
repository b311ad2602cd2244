"""Data-parallel training through torchrun (gloo on the CPU): the same losses as one process."""
from __future__ import annotations

import subprocess
import sys

import pytest

from qlora_lab.runs import RunFolder

from .conftest import CONFIGS, ROOT, background, run_cli

NAME = "tiny_llama_qlora"
SETS = ["train.max_steps=4", "train.gradient_accumulation_steps=2", "train.per_device_train_batch_size=4",
        "data.eval_size=0", "train.save_steps=100"]


def _sets():
    return sum((["--set", s] for s in SETS), [])


@background
def torchrun_two(tmp, env):
    """(run folder, CompletedProcess): NAME trained by torchrun over 2 processes, in the background lane
    (conftest.py)."""
    two = tmp / "two"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                        "-m", "qlora_lab.cli", "train", str(CONFIGS / f"{NAME}.yaml"), "--output-dir",
                        str(two), *_sets()], cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=600)
    return two, p


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, torchrun_two):
    from qlora_lab.cli import main

    one = tmp_path / "one"  # one process: this one
    assert main(["train", str(CONFIGS / f"{NAME}.yaml"), "--output-dir", str(one), *_sets()]) == 0
    two, p = torchrun_two
    assert p.returncode == 0, p.stderr[-3000:]
    assert "over 2 processes" in p.stderr
    a, b = RunFolder(one).metrics(), RunFolder(two).metrics()
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3, 4]  # written once, by rank 0
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        assert abs(x["loss"] - y["loss"]) <= 1e-3 * abs(x["loss"]), (a, b)
    assert (two / "adapter" / "adapter_model.safetensors").is_file()


@background
def bench_dp(tmp, env):
    """(JSON path, CompletedProcess) of `bench --multi-gpu dp:2` on the tiny Llama, in the background lane
    (conftest.py)."""
    out = tmp / "b.json"
    return out, run_cli("bench", "--preset", "tiny-llama", "--seq-len", "32", "--batch-size", "2", "4", "--steps",
                        "3", "--multi-gpu", "dp:2", "--output", out, env={"OMP_NUM_THREADS": "1"}, timeout=900,
                        base_env=env)


@pytest.mark.slow
def test_bench_data_parallel_rows_compare_with_one_process(bench_dp):
    """`bench --multi-gpu dp:2` (gloo here): rank 0 reports, global tokens, losses = one process's."""
    import json

    out, r = bench_dp
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    rows = {(x["path"], x["batch_size"]): x for x in rep["rows"]}
    assert set(rows) == {("ours", 2), ("ours", 4), ("ours[dp2]", 2), ("ours[dp2]", 4)}
    assert rows[("ours[dp2]", 4)]["world_size"] == 2 and rows[("ours", 4)]["world_size"] == 1
    assert rows[("ours[dp2]", 4)]["plan"]["per_device_train_batch_size"] == 2  # global 4 over 2 processes
    assert rows[("ours[dp2]", 4)]["trained_tokens_per_step"] == rows[("ours", 4)]["trained_tokens_per_step"]
    scaling = {(c["path"], c["batch_size"]): c for c in rep["scaling"]}
    assert scaling[("ours[dp2]", 4)]["per_gpu_batch"] == 2 and scaling[("ours[dp2]", 4)]["speedup"] > 0
    assert all(c["loss_ok"] and c["loss_steps"] == 3 for c in scaling.values())
    assert "2 GPUs, 4x32 in all" in rep["table"]

"""Data-parallel training through torchrun (gloo on the CPU): the same losses as one process."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

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


# ----------------------------------------------------------------------------- FSDP (sharded)

def test_fsdp_is_read_from_accelerates_environment(monkeypatch):
    from qlora_lab.distributed import fsdp_active, quant_storage

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not fsdp_active() and quant_storage("auto", "bfloat16")[0] == "uint8"
    for on in ("true", "True", "1"):  # `accelerate launch` writes "true"; accelerate's own helpers "True"
        monkeypatch.setenv("ACCELERATE_USE_FSDP", on)
        assert fsdp_active() and quant_storage("auto", "bfloat16")[0] == "bfloat16"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert not fsdp_active()
    assert quant_storage("float32", "bfloat16")[0] == "float32"  # set in config: kept


def test_adapter_is_saved_from_the_gathered_state_dict(tmp_path):
    """Under FSDP the model holds shards: the run folder's adapter comes from the full state dict."""
    from safetensors.torch import load_file

    from qlora_lab.config import load_config
    from qlora_lab.model import add_lora, load_adapter, load_model

    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml")
    model, _, _ = load_model(cfg, for_training=True)
    peft_model, _ = add_lora(model, cfg, gradient_checkpointing=False)
    full = {k: v.clone() for k, v in peft_model.state_dict().items()}
    key = next(k for k in full if "lora_B" in k)
    full[key] = torch.full_like(full[key], 0.25)  # what the gathered shards say, not the local model
    run = RunFolder(tmp_path)
    run.save_adapter(peft_model, state_dict=full)
    saved = load_file(run.adapter_dir / "adapter_model.safetensors")
    assert len(saved) == 2 * 7 * model.config.num_hidden_layers  # lora_A and lora_B, no base weights
    assert any(torch.equal(v, full[key]) for v in saved.values())
    base, _, _ = load_model(cfg)
    loaded = load_adapter(base, run.adapter_dir)
    assert any(torch.equal(p, full[key]) for n, p in loaded.named_parameters() if "lora_B" in n)


def test_accelerate_configs_parse_and_agree_with_the_recipe():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp = load_config_from_file(str(CONFIGS / "accelerate" / "ddp.yaml"))
    assert ddp.distributed_type.value == "MULTI_GPU" and ddp.num_processes == 2
    fsdp = load_config_from_file(str(CONFIGS / "accelerate" / "fsdp_qlora.yaml"))
    f = fsdp.fsdp_config
    assert fsdp.distributed_type.value == "FSDP" and fsdp.num_processes == 2
    assert f["fsdp_use_orig_params"] is False  # frozen 4-bit and trainable LoRA in separate flat params
    assert f["fsdp_activation_checkpointing"] is False  # model.add_lora recomputes, as the plan says
    assert f["fsdp_cpu_ram_efficient_loading"] and f["fsdp_sync_module_states"]
    assert f["fsdp_state_dict_type"] == "FULL_STATE_DICT"

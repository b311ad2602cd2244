"""hardware.plan: the one place where dtype, kernels, recomputation and micro-batch are chosen."""
from __future__ import annotations

import pytest

from qlora_lab import hardware
from qlora_lab.config import load_config
from qlora_lab.presets import model_config

from .conftest import CONFIGS


def test_cpu_plan_is_plain_and_explained():
    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml")
    p = hardware.plan(cfg, model_config("tiny-llama"))
    assert p.device == "cpu" and p.compute_dtype == "float32" and p.kernels == "none"
    assert p.gradient_checkpointing is False and p.checkpoint_layers == 0
    assert p.optim == "adamw_torch"  # paged optimizers need CUDA
    assert p.reasons and all(isinstance(r, str) for r in p.reasons)


def test_forced_checkpointing_is_kept():
    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml", ["train.gradient_checkpointing=true"])
    p = hardware.plan(cfg, model_config("tiny-llama"))
    assert p.gradient_checkpointing and p.checkpoint_layers == 2


@pytest.mark.parametrize("preset", ["llama2-7b", "falcon-7b"])
def test_h100_trains_7b_without_recomputation(preset):
    mc = model_config(preset)
    for seq_len, batch in [(512, 8), (2048, 2)]:
        micro, k, est, _ = hardware.choose_batch_and_checkpointing(mc, 4, seq_len, batch, 0.9 * 79.2)
        assert (micro, k) == (batch, 0) and est < 45  # measured peaks: 29.3 (Llama), 32.5 (Falcon) GiB


@pytest.mark.parametrize("preset", ["llama2-7b", "falcon-7b"])
def test_t4_budget_fits_by_recomputing(preset):
    mc = model_config(preset)
    micro, k, est, _ = hardware.choose_batch_and_checkpointing(mc, 4, 512, 8, 15.0)
    assert est <= 15.0 and 0 < k <= mc.num_hidden_layers and 8 % micro == 0


@pytest.mark.parametrize("preset,fused,measured", [("llama2-7b", True, 25.0), ("llama2-7b", False, 29.3),
                                                  ("falcon-7b", True, 25.4), ("falcon-7b", False, 32.5)])
def test_estimate_is_near_the_h100_peaks_of_bench_run_3(preset, fused, measured):
    """8x512, no recomputation: assets/bench/h100-run3-main.json (fused LoRA on, and off = peft's path)."""
    est = hardware.estimate_peak_gib(model_config(preset), 4, 4096, 0, fused_lora=fused)
    assert measured * 0.95 <= est <= measured * 1.15, est


def test_estimates_grow_with_tokens_and_shrink_with_recomputation():
    mc = model_config("llama2-7b")
    a = hardware.estimate_peak_gib(mc, 4, 4096, 0)
    assert hardware.estimate_peak_gib(mc, 4, 8192, 0) > a > hardware.estimate_peak_gib(mc, 4, 4096, 32)
    assert hardware.weights_gib(mc, 4) < 4 < hardware.weights_gib(mc, None)


def test_fsdp_is_named_in_the_plan(monkeypatch):
    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml", ["train.gradient_accumulation_steps=2"])
    p = hardware.plan(cfg, model_config("tiny-llama"))
    assert not any(r.startswith("fsdp") for r in p.reasons) and p.fused_lora
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    p = hardware.plan(cfg, model_config("tiny-llama"))
    line = next(r for r in p.reasons if r.startswith("fsdp"))
    assert "sharded over 2 GPUs" in line and "stored as float32" in line  # the CPU's compute dtype
    assert (p.per_device_train_batch_size, p.gradient_accumulation_steps) == (4, 1)  # same global batch
    assert not p.fused_lora and any(r.startswith("fused_lora=off: FSDP") for r in p.reasons)
    # bitsandbytes' optimizers hide their states from FSDP's gather: a checkpoint could not be resumed.
    paged = hardware.plan(cfg.set("train.optim=paged_adamw_32bit"), model_config("tiny-llama"))
    assert paged.optim == "adamw_torch" and any(r.startswith("optim=adamw_torch: under FSDP") for r in paged.reasons)

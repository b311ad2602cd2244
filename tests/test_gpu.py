"""GPU-only behaviour (skipped without CUDA): the plan's CUDA choices and a real QLoRA step on the GPU."""
from __future__ import annotations

import pytest

from qlora_lab.config import load_config
from qlora_lab.runs import RunFolder

from .conftest import CONFIGS, run_cli

pytestmark = pytest.mark.gpu


def test_plan_on_cuda_keeps_paged_optimizer_and_picks_a_16bit_dtype():
    import torch
    from transformers import AutoConfig

    from qlora_lab.hardware import plan
    from qlora_lab.model import model_path

    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml", ["train.optim=paged_adamw_32bit"])
    p = plan(cfg, AutoConfig.from_pretrained(model_path(cfg)))
    assert p.device == "cuda" and p.optim == "paged_adamw_32bit"
    expected = "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    assert p.compute_dtype == expected and p.mixed_precision in ("bf16", "fp16")


def test_qlora_trains_on_the_gpu(tmp_path):
    out = tmp_path / "gpu"
    r = run_cli("train", CONFIGS / "tiny_llama_qlora.yaml", "--output-dir", out, "--set", "train.max_steps=4",
                "--set", "train.optim=paged_adamw_32bit")
    assert r.returncode == 0, r.stderr[-3000:]
    run = RunFolder(out)
    s = run.read_json("train_summary.json")
    assert s["peak_memory_bytes"] and s["peak_memory_bytes"] > 0
    assert run.read_json("model_summary.json")["n_linear_4bit"] == 14
    assert run.read_json("env.json")["cuda_available"] is True


def test_fused_lora_matches_peft_in_bf16_4bit_on_the_gpu():
    """The bench's speed comparison rests on this: same loss and adapter gradients on CUDA, bf16 autocast."""
    import torch

    from qlora_lab import lora_fused
    from qlora_lab.model import add_lora, load_model

    cfg = load_config(CONFIGS / "tiny_llama_qlora.yaml", ["lora.lora_dropout=0.0", "train.fused_lora=false"])
    model, _, _ = load_model(cfg, for_training=True)
    model, _ = add_lora(model, cfg, False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.train()
    x = torch.randint(4, 200, (2, 32), device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref = step()
    assert lora_fused.enable(model) > 0
    loss, got = step()
    assert abs(loss - ref_loss) <= 1e-3 * abs(ref_loss)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=5e-2, atol=1e-4, msg=k)

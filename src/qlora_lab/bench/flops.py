"""FLOPs per trained token (model and hardware), the measured matmul ceiling, MFU and HFU.

Model FLOPs per trained token (`flops_per_token`): a frozen matmul weight costs its forward and the
gradient of its input, 4 x its params (no weight gradient); a LoRA weight 6 x its params; attention's
two matmuls 12 x layers x hidden x seq_len (forward and both input gradients, as in PaLM's appendix B).
Recomputation is work the hardware does, not the model: HFU adds each recomputed layer's forward again.
"""
from __future__ import annotations

import statistics


def flops_per_token(hf_config, seq_len: int, lora_r: int, recomputed_layers: int = 0) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per trained token of LoRA on every linear layer of a frozen base.

    Model: 4 x frozen matmul params (forward + input gradient) + 6 x LoRA params (forward + input and
    weight gradients) + 12 x layers x hidden x seq_len (attention scores and mixing: forward + two
    input gradients). Hardware: plus the forward of each recomputed layer (2 x its params + its
    attention, 4 x hidden x seq_len).
    """
    from ..memory import param_counts

    p = param_counts(hf_config, lora_r)
    layers, h = hf_config.num_hidden_layers, hf_config.hidden_size
    model = 4 * (p["linear"] + p["lm_head"]) + 6 * p["lora"] + 12 * layers * h * seq_len
    per_layer_forward = 2 * (p["linear"] + p["lora"]) / layers + 4 * h * seq_len
    return model, model + recomputed_layers * per_layer_forward


def row_flops(hf_config, seq_len: int, lora_r: int, recomputed_layers: int) -> dict:
    """The two FLOPs keys of a bench row."""
    model, hw = flops_per_token(hf_config, seq_len, lora_r, recomputed_layers)
    return {"flops_per_token": model, "hw_flops_per_token": hw}


def mfu(row: dict, matmul_tflops, key: str = "flops_per_token") -> float | None:
    """Model FLOPs utilization; key="hw_flops_per_token" gives HFU (recomputation counted)."""
    if not matmul_tflops or not row.get("tokens_per_s") or not row.get(key):
        return None
    gpus = row.get("world_size") or 1  # tokens/s is the whole job's; the matmul rate one GPU's
    return row["tokens_per_s"] * row[key] / (matmul_tflops * 1e12 * gpus)


def matmul_tflops(n: int = 8192, reps: int = 20) -> float | None:
    """Median bf16 matmul rate (TFLOP/s) on random data: the ceiling MFU is measured against."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return round(2 * n**3 / statistics.median(times) / 1e12, 1)

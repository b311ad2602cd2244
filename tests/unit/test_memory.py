"""memory.py: the peak-memory estimate, fitted to measured H100 peaks, and the fastest split that fits a budget."""
from __future__ import annotations

import pytest

from qlora_lab import memory
from qlora_lab.presets import model_config


@pytest.mark.parametrize("preset", ["llama2-7b", "falcon-7b"])
def test_h100_trains_7b_without_recomputation(preset):
    mc = model_config(preset)
    for seq_len, batch in [(512, 8), (2048, 2)]:
        micro, k, est, *_ = memory.fastest_fit(mc, 4, seq_len, batch, 0.9 * 79.2)
        assert (micro, k) == (batch, 0) and est < 45  # measured peaks: 29.3 (Llama), 32.5 (Falcon) GiB


@pytest.mark.parametrize("preset", ["llama2-7b", "falcon-7b"])
def test_t4_budget_fits_by_recomputing(preset):
    mc = model_config(preset)
    micro, k, est, *_ = memory.fastest_fit(mc, 4, 512, 8, 15.0)
    assert est <= 15.0 and 0 < k <= mc.num_hidden_layers and 8 % micro == 0


@pytest.mark.parametrize("preset,fused,mlp,measured", [
    ("llama2-7b", True, False, 21.1), ("llama2-7b", True, True, 18.6), ("llama2-7b", False, False, 29.3),
    ("falcon-7b", True, False, 21.9), ("falcon-7b", True, True, 19.9), ("falcon-7b", False, False, 32.5)])
def test_estimate_is_near_the_measured_peaks(preset, fused, mlp, measured):
    """8x512, dropout 0.05, no recomputation. Fused LoRA (no dropout mask kept, redrawn in the backward):
    Llama assets/bench/h200x2-run9-peer-llama-dropout0.05.json, Falcon
    assets/bench/h200x2-run8-peer-falcon-8x512-dropout0.05-partial.json; with the fused MLP
    assets/bench/h200-run13-peer-llama-dropout0.05.json and h200-run15-peer-falcon-dropout0.05.json; peft's path:
    assets/bench/h100-run3-main.json."""
    est = memory.estimate_peak_gib(model_config(preset), 4, 4096, 0, fused_lora=fused, fused_mlp=mlp)
    assert measured * 0.95 <= est <= measured * 1.15, est


def test_estimates_grow_with_tokens_and_shrink_with_recomputation():
    mc = model_config("llama2-7b")
    a = memory.estimate_peak_gib(mc, 4, 4096, 0)
    assert memory.estimate_peak_gib(mc, 4, 8192, 0) > a > memory.estimate_peak_gib(mc, 4, 4096, 32)
    assert memory.weights_gib(mc, 4) < 4 < memory.weights_gib(mc, None)


def test_nothing_fits_gives_the_smallest_split_and_says_so():
    mc = model_config("llama2-7b")
    micro, k, est, why, _ = memory.fastest_fit(mc, None, 2048, 8, 4.0)  # 16-bit 7B weights alone are ~12.5 GiB
    assert (micro, k) == (1, mc.num_hidden_layers) and est > 4.0 and why.startswith("nothing fits 4.0 GiB")


def test_the_fused_mlp_and_offloading_save_what_they_drop():
    """The fused MLP drops one MLP-width 16-bit vector per token and layer; offloading drops the recomputed
    layers' inputs (one hidden-size vector each)."""
    mc = model_config("llama2-7b")
    tokens, n, h, m = 4096, mc.num_hidden_layers, mc.hidden_size, mc.intermediate_size
    plain = memory.estimate_peak_gib(mc, 4, tokens, 0, fused_lora=True)
    fused = memory.estimate_peak_gib(mc, 4, tokens, 0, fused_lora=True, fused_mlp=True)
    assert plain - fused == pytest.approx(tokens * n * 2 * m / memory.GiB)  # 2.69 GiB
    kept = memory.estimate_peak_gib(mc, 4, tokens, n, fused_lora=True, fused_mlp=True)
    off = memory.estimate_peak_gib(mc, 4, tokens, n, fused_lora=True, fused_mlp=True, offload=True)
    assert kept - off == pytest.approx(tokens * n * 2 * h / memory.GiB)  # 1 GiB


def test_the_15_gib_plan_leaves_room_for_the_graphs_pool():
    """Run 13: with layer graphs, 16 of 32 layers recomputed ran out of a 15 GiB budget (14.0 GiB allocated,
    16.1 reserved; the graphs' pool was not counted); run 14: 22 of 32 fit (10.7 / 13.0 GiB)."""
    mc = model_config("llama2-7b")
    with_graphs = memory.fastest_fit(mc, 4, 512, 8, 15.0, fused_lora=True, fused_mlp=True, graphs=True)
    assert with_graphs.recompute_layers >= 20 and with_graphs.micro_batch == 8
    eager = memory.fastest_fit(mc, 4, 512, 8, 15.0, fused_lora=True, fused_mlp=True)
    assert eager.recompute_layers < with_graphs.recompute_layers


def test_fp16_compute_prices_its_fp32_embeddings_head_and_residual_stream():
    """A T4 (fp16 compute) keeps embeddings, norms and head in fp32. Run 15 (H200, fp16, 15 GiB) planned 16 of 32
    layers recomputed without these terms and ran out of memory at 13.8 GiB allocated, 15.0 reserved; run 12
    (20 of 32, no fused MLP) fit at 13.4 allocated: the estimate stays above both."""
    mc = model_config("llama2-7b")
    tokens, n, h = 4096, mc.num_hidden_layers, mc.hidden_size
    p = memory.param_counts(mc)
    bf16 = memory.estimate_peak_gib(mc, 4, tokens, n, fused_lora=True, fused_mlp=True)
    fp16 = memory.estimate_peak_gib(mc, 4, tokens, n, fused_lora=True, fused_mlp=True, fp16=True)
    # fp32 embeddings and head, every layer's saved input at 4 bytes, the re-materialized layer's two norm inputs
    extra = 2 * (p["embed"] + p["head_stored"]) + tokens * n * 2 * h + tokens * 2 * memory.FP32_RESIDUAL_VECTORS * h
    assert fp16 - bf16 == pytest.approx(extra / memory.GiB)
    t4 = memory.fastest_fit(mc, 4, 512, 8, 15.0, fused_lora=True, fused_mlp=True, fp16=True)
    assert t4.recompute_layers > 16 and t4.micro_batch == 8
    assert memory.estimate_peak_gib(mc, 4, tokens, 16, fused_lora=True, fused_mlp=True, fp16=True) > 15.0
    assert memory.estimate_peak_gib(mc, 4, tokens, 20, fused_lora=True, fp16=True) > 13.4

"""`qlora-lab bench` end to end on tiny presets (CPU): JSON fields and the two paths' loss agreement.

No speed assertions: CPU timings say nothing about a GPU.
"""
from __future__ import annotations

import json

import pytest
import torch

from qlora_lab.bench import LOSS_TOLERANCE, Shape, synthetic_examples
from qlora_lab.kernels import fused_loss, liger

from .conftest import background, run_cli


@background
def bench_tiny(tmp, env):
    """(JSON path, CompletedProcess) of `qlora-lab bench` on both tiny presets, with the standard recipe and a
    variant: five processes in a row, run in the background lane (conftest.py)."""
    out = tmp / "bench.json"
    return out, run_cli("bench", "--preset", "tiny-llama", "tiny-falcon", "--seq-len", "32", "--batch-size", "2",
                        "--steps", "3", "--baseline", "--variant", "peft:train.fused_lora=false",
                        "--variant", "ungrouped:train.group_lora=false", "--variant", "bnb:train.nf4_kernel=false",
                        "--output", out,
                        timeout=900, base_env=env)


def test_bench_cli_tiny_presets_agree_with_baseline(bench_tiny):
    out, r = bench_tiny
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file() and "| tiny-llama | 2x32 | ours |" in r.stdout
    rows = {(x["preset"], x["path"]): x for x in rep["rows"]}
    assert set(rows) == {(p, q) for p in ("tiny-llama", "tiny-falcon")
                         for q in ("ours", "ours[peft]", "ours[ungrouped]", "ours[bnb]", "baseline")}
    # A variant of runtime keys only trains in the ours process, on the model it loaded: no third process.
    assert sorted(w["label"] for w in rep["workers"]) == ["baseline", "baseline", "ours", "ours"]
    for p in ("tiny-llama", "tiny-falcon"):
        assert rows[(p, "ours")]["fused_lora_modules"] == rows[(p, "ours")]["n_lora_modules"]
        assert rows[(p, "ours[peft]")]["fused_lora_modules"] == 0
    # Grouped by default: q/k/v and gate/up on Llama, Falcon has no group; the variant ungroups the same
    # loaded model, and the next row would group it again.
    assert "grouped q/k/v, gate/up" in rows[("tiny-llama", "ours")]["plan_words"]
    assert "grouped" not in rows[("tiny-falcon", "ours")]["plan_words"]
    assert "grouped" not in rows[("tiny-llama", "ours[ungrouped]")]["plan_words"]
    # The NF4 kernel switched off for one row (a runtime key: the same loaded model)
    for p in ("tiny-llama", "tiny-falcon"):
        assert "bitsandbytes dequant" in rows[(p, "ours[bnb]")]["plan_words"]
        assert "bitsandbytes dequant" not in rows[(p, "ours")]["plan_words"]
    for row in rows.values():
        assert row["status"] == "ok" and row["steps"] == 3 and len(row["losses"]) == 3
        assert len(row["host_probe_ms"]) == 3 and min(row["host_probe_ms"]) > 0  # the host probe after each step
        # where the host was in each step, every path (median over the timed steps)
        assert list(row["host_phases_ms"]) == ["batch", "backward", "optimizer", "bookkeeping"]
        assert min(row["host_phases_ms"].values()) >= 0 and row["host_phases_ms"]["backward"] > 0
        for key in ("median_step_s", "tokens_per_s", "weights_bytes", "flops_per_token", "n_lora_modules"):
            assert row[key] > 0, key
        assert "peak_allocated_bytes" in row and "peak_reserved_bytes" in row and row["mfu"] is None  # CPU
        assert len(row["host_load_1min"]) == 2 and min(row["host_load_1min"]) >= 0  # before / after its worker
        assert rows[(row["preset"], "ours")]["n_lora_modules"] == rows[(row["preset"], "baseline")]["n_lora_modules"]
    # The standard recipe leaves Falcon's FalconLinear layers 16-bit, and the table says so.
    assert rows[("tiny-falcon", "baseline")]["n_linear_16bit"] == rows[("tiny-falcon", "baseline")]["n_linear"] > 0
    assert rows[("tiny-falcon", "ours")]["n_linear_16bit"] == 0
    assert "16-bit" in rep["table"] and "Host load (1-minute average" in rep["table"]
    assert "Host probe (a fixed Python loop" not in rep["table"]  # 3 steps: too few to split in halves
    assert len(rep["comparisons"]) == 8  # each of our 4 rows per preset against the standard recipe
    for c in rep["comparisons"]:
        assert c["loss_ok"] and c["loss_max_rel_diff"] <= LOSS_TOLERANCE and c["speedup"] > 0


@background
def bench_isolated(tmp, env):
    """(JSON path, CompletedProcess) of a tiny-llama bench whose one variant (our default config again) trains in
    a process of its own (--isolate)."""
    out = tmp / "bench.json"
    return out, run_cli("bench", "--preset", "tiny-llama", "--seq-len", "32", "--batch-size", "2", "--steps", "3",
                        "--set", "lora.lora_dropout=0", "--variant", "again:train.optimizer_sync=per-step",
                        "--isolate", "--output", out, timeout=600, base_env=env)


def test_bench_isolate_trains_a_variant_in_a_fresh_process_from_the_same_lora_weights(bench_isolated):
    out, r = bench_isolated
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    workers = {w["label"]: w for w in rep["workers"]}
    assert set(workers) == {"ours", "ours[again]"} and workers["ours"]["pid"] != workers["ours[again]"]["pid"]
    assert workers["ours"]["lora_init"] == "saved" and workers["ours[again]"]["lora_init"] == "loaded"
    rows = {x["path"]: x for x in rep["rows"]}
    assert rows["ours[again]"]["status"] == "ok" and len(rows["ours[again]"]["losses"]) == 3
    # The same config from the same weights on the same batches, no dropout: the same losses (two processes on
    # one machine, the same CPU kernels).
    assert rows["ours[again]"]["losses"] == pytest.approx(rows["ours"]["losses"], rel=1e-4)


@background
def bench_profiled(tmp, env):
    """(JSON path, profile folder, CompletedProcess) of a tiny-llama bench with --profile."""
    out, prof = tmp / "bench.json", tmp / "profile"
    return out, prof, run_cli("bench", "--preset", "tiny-llama", "--seq-len", "32", "--batch-size", "2", "--steps", "5",
                              "--profile", prof, "--output", out, timeout=600, base_env=env)


def test_bench_profile_writes_each_rows_last_steps_and_times_the_others(bench_profiled):
    out, prof, r = bench_profiled
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(out.read_text())["rows"][0]
    assert row["path"] == "ours" and row["steps"] == 5
    # warm-up 1, profiled 3: the median is the one step between them
    assert row["median_step_s"] == pytest.approx(row["step_times_s"][1], abs=1e-4)
    got = json.loads((prof / "tiny-llama-ours-32x2.json").read_text())
    assert got["steps"] == 3 and got["title"] == "tiny-llama ours 2x32"
    assert got["kinds_ms_per_step"].get("matmul", 0) > 0  # CPU ops here (no CUDA): aten::mm and kin
    assert (prof / "tiny-llama-ours-32x2.txt").read_text().startswith("tiny-llama ours 2x32\n")


def test_default_output_is_in_the_current_folder():
    """An installed package has no assets/ folder: without --output the report lands where the user is."""
    import re
    from pathlib import Path

    from qlora_lab.bench import default_output

    out = default_output(["llama2-7b", "falcon-7b"], 15)
    assert out.parent == Path(".") and re.fullmatch(r"bench-llama2-7b-falcon-7b-budget15-\d{8}-\d{6}\.json", out.name)


def test_synthetic_batches_are_fixed_and_skip_special_ids():
    a = synthetic_examples(320, Shape(64, 2), steps=2)
    assert a == synthetic_examples(320, Shape(64, 2), steps=2) and len(a) == 4
    assert all(len(x["input_ids"]) == 64 and min(x["input_ids"]) >= 4 and x["labels"] == x["input_ids"] for x in a)


def test_falcon_fused_head_and_attention_compute_the_same(tmp_path):
    from transformers import AutoModelForCausalLM

    from qlora_lab.presets import make_model

    path = make_model("tiny-falcon", tmp_path / "m")
    ref = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").train()
    fast = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").train()
    assert liger.falcon_flash_attention(fast) == 2
    liger.fuse_lm_head_loss(fast, fused_loss.torch_linear_cross_entropy)
    ids = torch.randint(4, 320, (2, 40))
    labels = ids.clone()
    labels[:, :5] = -100
    la, lb = ref(input_ids=ids, labels=labels).loss, fast(input_ids=ids, labels=labels).loss
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, rtol=1e-5)
    ga = ref.transformer.h[0].self_attention.query_key_value.weight.grad
    gb = fast.transformer.h[0].self_attention.query_key_value.weight.grad
    assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6)
    mask = torch.ones_like(ids)
    mask[0, 30:] = 0  # padding keeps the real mask
    with torch.no_grad():
        assert torch.allclose(ref.eval()(input_ids=ids, attention_mask=mask).logits,
                              fast.eval()(input_ids=ids, attention_mask=mask).logits, atol=1e-5)


def test_model_flops_count_a_frozen_base_as_forward_and_input_gradients():
    """4 x frozen + 6 x LoRA + attention; recomputation only in the hardware count; the run's rank."""
    from qlora_lab.bench import flops_per_token
    from qlora_lab.memory import param_counts
    from qlora_lab.presets import model_config

    mc = model_config("llama2-7b")
    model, hw = flops_per_token(mc, 512, 64)
    p = param_counts(mc, 64)
    attention = 12 * 32 * 4096 * 512
    assert model == hw == 4 * (p["linear"] + p["lm_head"]) + 6 * p["lora"] + attention
    # The ceiling one H200 (~790 TFLOP/s bf16) puts on Llama-2-7B at 8x512: ~28k trained tokens/s.
    assert 27_500 < 790e12 / model < 28_500
    # Every layer recomputed: one more forward of the layers (not of the head), not counted as model work.
    _, hw_all = flops_per_token(mc, 512, 64, recomputed_layers=32)
    assert hw_all - model == 2 * (p["linear"] + p["lora"]) + 4 * 4096 * 512 * 32
    # Rank 16 instead of 64: the LoRA term scales with it.
    model16, _ = flops_per_token(mc, 512, 16)
    assert model - model16 == 6 * (p["lora"] - param_counts(mc, 16)["lora"])

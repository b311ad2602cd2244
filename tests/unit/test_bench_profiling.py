"""`qlora-lab bench --profile`: the per-step kernel tables (bench/profiling.py), on the CPU.

The profiler itself runs here on CPU ops (a machine without CUDA profiles those); on the GPU it records
CUDA kernels through the same code, exercised by the bench runs on the GPU machine.
"""
from __future__ import annotations

import json

import pytest
import torch

from qlora_lab import cli
from qlora_lab.bench import profiling


def test_kernel_names_of_both_paths_get_their_kind():
    kinds = {  # names as CUDA profiles of our path and the peer's spell them
        "nvjet_tst_192x192_64x4_1x2_h_bz_coopB_TNN": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>": "attention",
        "nf4_dequantize": "nf4 dequantize",
        "void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>": "nf4 dequantize",
        "dropout": "dropout",
        "void at::native::(anonymous namespace)::fused_dropout_kernel_vec<c10::BFloat16>": "dropout",
        "_rms_norm_forward_kernel": "norm, rope, swiglu (triton)",
        "liger_cross_entropy_kernel": "loss",
        "void kOptimizer32bit2State<float, 5, 0>": "optimizer",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "copy, fill",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>":
            "elementwise",
        "some_new_kernel": "other",
    }
    assert {n: profiling.kind_of(n) for n in kinds} == kinds


def test_summary_is_per_step_and_sorted_by_time():
    s = profiling.summarize([("gemm_a", 3000.0, 6), ("dropout", 9000.0, 3), ("x", 300.0, 3)], steps=3, wall_s=0.06)
    assert [k["name"] for k in s["kernels"]] == ["dropout", "gemm_a", "x"]
    assert s["kernels"][0]["ms_per_step"] == 3.0 and s["kernels"][1]["calls_per_step"] == 2
    assert s["wall_ms_per_step"] == 20.0 and abs(s["gpu_busy_ms_per_step"] - 4.1) < 1e-9
    assert s["kinds_ms_per_step"] == {"dropout": 3.0, "matmul": 1.0, "other": 0.1}


def test_timed_steps_leave_out_warmup_and_profiled_steps():
    times = [9, 1, 2, 3, 7, 7, 7]
    assert profiling.timed(times, 1, profiled=False) == [1, 2, 3, 7, 7, 7]
    assert profiling.timed(times, 1, profiled=True) == [1, 2, 3]


def test_step_profiler_writes_the_tables_of_its_steps_only(tmp_path):
    prof = profiling.StepProfiler(tmp_path, "tiny-ours-32x2", "tiny ours 32x2", first=1)
    a = torch.randn(64, 64)
    for step in range(5):  # profiled: steps 1, 2, 3; step s runs s + 1 matmuls
        prof.step_begin(step)
        for _ in range(step + 1):
            a = torch.mm(a, a).tanh()
        prof.step_end(step)
    got = json.loads((tmp_path / "tiny-ours-32x2.json").read_text())
    mm = next(k for k in got["kernels"] if k["name"] == "aten::mm")
    assert got["steps"] == profiling.STEPS == 3 and mm["calls_per_step"] == (2 + 3 + 4) / 3
    assert mm["kind"] == "matmul" and got["title"] == "tiny ours 32x2"
    table = (tmp_path / "tiny-ours-32x2.txt").read_text()
    assert table.startswith("tiny ours 32x2\n3 steps profiled") and "aten::mm |" in table


def _refused(capsys, tmp_path, steps: int, *flag) -> str:
    """The one-line error of a tiny bench refused before any worker starts: nothing written, neither the report nor
    the folder the flag names (tmp_path / "out")."""
    rc = cli.main(["bench", "--preset", "tiny-llama", "--seq-len", "32", "--batch-size", "2", "--steps", str(steps),
                   *flag, str(tmp_path / "out"), "--output", str(tmp_path / "b.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "out").exists()
    return err


def test_profile_needs_a_timed_step_left(tmp_path, capsys):
    assert "--steps >= 5" in _refused(capsys, tmp_path, 4, "--profile")


def test_idle_gaps_are_the_span_less_the_union_of_kernels_named_by_their_neighbours():
    us = 1000  # ns
    spans = [  # two steps; "copy" overlaps the matmul on a side stream, so it hides no idle time
        ("gemm_a", 0, 100 * us), ("memcpy128", 50 * us, 120 * us), ("_rms_norm_forward_kernel", 125 * us, 200 * us),
        ("void kOptimizer32bit2State<float, 0>", 200 * us, 260 * us),
        ("gemm_a", 900 * us, 1000 * us),  # 640 us after the optimizer: the step boundary
        ("gemm_a", 1030 * us, 1100 * us),  # a 30 us gap between matmuls
    ]
    got = profiling.idle(spans, steps=2)
    assert abs(got["span_ms_per_step"] - 0.55) < 1e-9
    assert abs(got["idle_ms_per_step"] - (5 + 640 + 30) / 2e3) < 1e-9  # the 5 us gap is short, but counted
    assert abs(got["short_gaps_ms_per_step"] - 0.0025) < 1e-9
    assert [(g["before"], g["after"]) for g in got["gaps"]] == [
        ("void kOptimizer32bit2State<float, 0>", "gemm_a"), ("gemm_a", "gemm_a")]
    assert [(g["before"], g["after"], g["per_step"]) for g in got["gaps_by_kind"]] == [
        ("optimizer", "matmul", 0.5), ("matmul", "matmul", 0.5)]
    table = profiling.text("t", {**profiling.summarize([("gemm_a", 1.0, 1)], 2, 0.01), "idle": got})
    assert "GPU idle: 0.34 ms per step of a " in table
    assert "optimizer -> matmul | 0.320 | 0.5" in table
    assert profiling.idle([], steps=3)["idle_ms_per_step"] == 0.0


def _alloc(addr, mib, *where):
    """A trace event: `where` are (file, line, function) frames, innermost first."""
    return {"action": "alloc", "addr": addr, "size": mib * 2**20,
            "frames": [{"filename": f, "line": ln, "name": fn} for f, ln, fn in where]}


def test_memory_peak_is_the_live_blocks_at_the_fullest_event_by_allocating_line():
    torch_f = ("/usr/lib/python3/site-packages/torch/nn/functional.py", 10, "linear")
    mlp = ("/repo/src/qlora_lab/kernels/lora_mlp.py", 80, "forward")
    loss = ("/usr/lib/python3/site-packages/liger_kernel/ops/fused_linear_cross_entropy.py", 50, "fwd")
    events = [
        _alloc(1, 100, torch_f, mlp),                  # named by our line, not torch's
        _alloc(2, 50, mlp),
        {"action": "free_requested", "addr": 2, "size": 50 * 2**20},
        {"action": "free_completed", "addr": 2, "size": 50 * 2**20},  # one free counted once
        _alloc(3, 30, loss),
        _alloc(4, 25, torch_f),                        # only torch's frames: its innermost; 155 live, the peak
        {"action": "segment_alloc", "addr": 99, "size": 10**9},  # segments are not blocks
        {"action": "free_completed", "addr": 4, "size": 25 * 2**20},
        _alloc(5, 10, mlp),                            # 140 live
        {"action": "free_requested", "addr": 77, "size": 5},     # a block from before the recording
    ]
    b = profiling.peak_breakdown(events, base_bytes=3 * 2**30)
    assert b["peak_event"] == 5 and b["events"] == len(events) and b["complete"]
    assert b["recorded_peak_bytes"] == 3 * 2**30 + 155 * 2**20
    assert b["sites"] == [{"site": "qlora_lab/kernels/lora_mlp.py:80 forward", "bytes": 100 * 2**20, "blocks": 1},
                          {"site": "liger_kernel/ops/fused_linear_cross_entropy.py:50 fwd", "bytes": 30 * 2**20, "blocks": 1},
                          {"site": "torch/nn/functional.py:10 linear", "bytes": 25 * 2**20, "blocks": 1}]
    assert b["peak_allocation"] == ["torch/nn/functional.py:10 linear"]
    b["max_allocated_bytes"] = b["recorded_peak_bytes"]
    text = profiling.memory_text("tiny ours 32x2", b)
    assert text.startswith("tiny ours 32x2\npeak allocated 3,227.0 MiB") and "event 5 of 10" in text
    assert "     100.0 MiB      1 blocks  qlora_lab/kernels/lora_mlp.py:80 forward" in text
    assert "overflowed" not in text
    assert b["base_freed_at_peak_bytes"] == 0 and "(0.0 MiB of it freed by then) + 155.0 MiB of blocks" in text
    assert profiling.peak_breakdown([], 0)["sites"] == [] and profiling.site_of([]) == "(no Python frame)"
    # Blocks from before the recording leave the base where they are freed (once, whichever free event comes)
    pre = [{"action": "free_requested", "addr": 88, "size": 10 * 2**20},
           {"action": "free_completed", "addr": 88, "size": 10 * 2**20}]
    b = profiling.peak_breakdown(pre + [_alloc(1, 4, mlp)], base_bytes=2**30)
    assert (b["peak_event"], b["recorded_peak_bytes"], b["sites"]) == (-1, 2**30, [])  # the start was the peak
    b = profiling.peak_breakdown([_alloc(1, 20, mlp)] + pre + [_alloc(2, 5, loss)], base_bytes=2**30)
    assert (b["peak_event"], b["recorded_peak_bytes"], b["base_freed_at_peak_bytes"]) == (0, 2**30 + 20 * 2**20, 0)
    b = profiling.peak_breakdown(pre + [_alloc(1, 8, mlp), _alloc(2, 5, loss)], base_bytes=2**30)
    assert (b["peak_event"], b["recorded_peak_bytes"]) == (3, 2**30 + 3 * 2**20)
    assert b["base_freed_at_peak_bytes"] == 10 * 2**20 and sum(x["bytes"] for x in b["sites"]) == 13 * 2**20


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_memory_profile_without_cuda_fails_in_one_line(tmp_path, capsys):
    assert "--memory-profile records CUDA allocations" in _refused(capsys, tmp_path, 2, "--memory-profile")


def test_memory_recorder_writes_its_breakdown_and_stops_recording_even_when_the_snapshot_fails(tmp_path, monkeypatch):
    """MemoryRecorder's own steps with torch.cuda's recording functions stood in for (this machine has no CUDA; the
    GPU test in tests/integration/test_gpu.py records real allocations)."""
    calls = []
    trace = [_alloc(1, 8, ("/repo/src/qlora_lab/kernels/graphs.py", 5, "capture"))]
    snapshot = {"device_traces": [trace]}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 2**30 + 8 * 2**20)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *a, **k: calls.append(k.get("enabled", "on")))
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: snapshot)
    rec = profiling.MemoryRecorder(tmp_path / "mem", "llama2-7b-ours-512x8", "llama2-7b ours 8x512")
    assert rec.finish() is None and calls == []  # never started: nothing recorded, nothing written
    rec.start()
    b = rec.finish()
    assert calls == ["on", None] and rec.finish() is None
    assert b["base_bytes"] == 2**30 and b["recorded_peak_bytes"] == b["max_allocated_bytes"] == 2**30 + 8 * 2**20
    assert b["sites"] == [{"site": "qlora_lab/kernels/graphs.py:5 capture", "bytes": 8 * 2**20, "blocks": 1}]
    saved = json.loads((tmp_path / "mem" / "llama2-7b-ours-512x8-memory.json").read_text())
    assert saved["title"] == "llama2-7b ours 8x512" and saved["sites"] == b["sites"]
    assert (tmp_path / "mem" / "llama2-7b-ours-512x8-memory.txt").read_text().startswith("llama2-7b ours 8x512\n")

    def broken():
        raise RuntimeError("snapshot failed")

    monkeypatch.setattr(torch.cuda.memory, "_snapshot", broken)
    rec.start()
    with pytest.raises(RuntimeError):
        rec.finish()
    assert calls[-2:] == ["on", None] and rec.finish() is None  # the recording stopped all the same, once

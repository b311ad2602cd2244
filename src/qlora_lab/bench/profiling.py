"""`qlora-lab bench --profile DIR`: where a row's GPU time goes, kernel by kernel, ours and the peer's alike.

Each worker profiles the last STEPS steps of every row (torch.profiler: GPU kernels; on a machine without
CUDA, CPU ops) and writes
DIR/<preset>-<row>-<seq_len>x<batch_size>.txt (the kernels by device time per step, and the time per step
in each kind: matmul, attention, NF4, dropout, ...) and a .json twin. The profiled steps are left out of
the row's median step time (`timed`), so its tokens/s are not the profiler's.

This file imports nothing from qlora_lab and no torch at import: the peer's worker (unsloth_worker.py),
which runs in the peer's interpreter, loads it by path.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

STEPS = 3  # profiled optimizer steps per row

# A kernel's kind, by the first pattern its (lowercased) name matches; the order matters.
KINDS = (
    ("nf4 dequantize", r"nf4|dequant"),
    ("dropout", r"dropout|masked_scale"),
    ("attention", r"flash|fmha|attention|sdpa|mha"),
    ("matmul", r"gemm|nvjet|cutlass|sm90_|sm80_|cublas|xmma|splitk|matmul|aten::(add|b)?mm\b"),
    ("loss", r"cross_entropy|liger_cross|fused_linear"),
    ("norm, rope, swiglu (triton)", r"rms|rope|swiglu|geglu|silu|triton"),
    ("optimizer", r"optimizer|adam|paged"),
    ("copy, fill", r"memcpy|memset|copy|fill|cat"),
    ("reduction", r"reduce|norm|sum|max"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise"),
)


def timed(times: list, warmup: int, profiled: bool) -> list:
    """The step times a row's median is taken over: after the warm-up, before any profiled step."""
    end = len(times) - STEPS if profiled else len(times)
    return times[warmup:end] or times[:end] or times


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def file_name(preset: str, label: str, seq_len: int, batch_size: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)
    return f"{preset}-{safe}-{seq_len}x{batch_size}"


def summarize(kernels: list[tuple[str, float, int]], steps: int, wall_s: float) -> dict:
    """kernels: (name, total device microseconds, calls) over `steps` steps of `wall_s` seconds in all."""
    per_step = sorted(((n, us / steps, calls / steps) for n, us, calls in kernels), key=lambda k: -k[1])
    kinds: dict[str, float] = {}
    for n, us, _ in per_step:
        kinds[kind_of(n)] = kinds.get(kind_of(n), 0.0) + us
    busy = sum(us for _, us, _ in per_step)
    return {"steps": steps, "wall_ms_per_step": wall_s * 1e3 / steps, "gpu_busy_ms_per_step": busy / 1e3,
            "kinds_ms_per_step": {k: round(v / 1e3, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "kernels": [{"name": n, "ms_per_step": round(us / 1e3, 4), "calls_per_step": round(c, 2),
                         "kind": kind_of(n)} for n, us, c in per_step]}


def text(title: str, s: dict, top: int = 40) -> str:
    lines = [title, f"{s['steps']} steps profiled: {s['wall_ms_per_step']:.1f} ms per step wall, "
             f"{s['gpu_busy_ms_per_step']:.1f} ms in the profiled ops (GPU kernels; CPU ops without CUDA)", "", "kind | ms per step", "---|---:"]
    lines += [f"{k} | {v:.2f}" for k, v in s["kinds_ms_per_step"].items()]
    lines += ["", f"top {top} kernels | ms per step | calls per step | kind", "---|---:|---:|---"]
    lines += [f"{k['name'][:120]} | {k['ms_per_step']:.3f} | {k['calls_per_step']:g} | {k['kind']}"
              for k in s["kernels"][:top]]
    return "\n".join(lines) + "\n"


class StepProfiler:
    """Profile the optimizer steps `first` .. `first + STEPS - 1` (0-based), then write the summary."""

    def __init__(self, out_dir, name: str, title: str, first: int):
        self.out_dir, self.name, self.title, self.first = Path(out_dir), name, title, first
        self._prof = None
        self._t0 = None

    def step_begin(self, step: int) -> None:
        if step != self.first:
            return
        import time

        import torch

        _sync()
        activity = torch.profiler.ProfilerActivity
        self._prof = torch.profiler.profile(activities=[activity.CUDA if torch.cuda.is_available() else activity.CPU])
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def step_end(self, step: int) -> None:
        if self._prof is None or step != self.first + STEPS - 1:
            return
        import time

        import torch

        _sync()
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        cuda = torch.cuda.is_available()
        kernels = [(e.key, float(e.self_device_time_total if cuda else e.self_cpu_time_total), int(e.count))
                   for e in self._prof.key_averages()]
        kernels = [k for k in kernels if k[1] > 0]
        self._prof = None
        s = summarize(kernels, STEPS, wall)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"{self.name}.json").write_text(json.dumps({"title": self.title, **s}, indent=1))
        (self.out_dir / f"{self.name}.txt").write_text(text(self.title, s))


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()

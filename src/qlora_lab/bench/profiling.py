"""`qlora-lab bench --profile DIR`: where a row's GPU time goes, kernel by kernel, ours and the peer's alike.

Each worker profiles the last STEPS steps of every row (torch.profiler: GPU kernels; on a machine without
CUDA, CPU ops) and writes
DIR/<preset>-<row>-<seq_len>x<batch_size>.txt (the kernels by device time per step, the time per step
in each kind: matmul, attention, NF4, dropout, ..., and on a GPU where it sat idle: the gaps between kernels,
each named by the kernels on either side) and a .json twin. The profiled steps are left out of
the row's median step time (`timed`), so its tokens/s are not the profiler's.

`qlora-lab bench --memory-profile DIR` records every CUDA allocation of each row instead (MemoryRecorder) and
writes DIR/<preset>-<row>-<seq_len>x<batch_size>-memory.txt and .json: at the row's peak, what was allocated
before it began (weights, adapters) and the live blocks allocated since, summed by the Python line that
allocated them (peak_breakdown). Recording slows the host, so those rows' speeds do not count.

It also holds what both workers time a step with (`host_probe_ms`, `host_phases`, `median_phases`), so ours and
the peer's rows are measured by one piece of code. This file imports nothing from qlora_lab and no torch at
import: the peer's worker (unsloth_worker.py), which runs in the peer's interpreter, loads it by path.
"""
from __future__ import annotations

import json
import re
import statistics
import time
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


PHASES = ("batch", "backward", "optimizer", "bookkeeping")  # host milestones of a step, in order


def host_probe_ms(n: int = 20000) -> float:
    """Milliseconds a fixed pure-Python loop takes: run between steps (outside their timing), a rise over a
    run says the host's CPU slowed down (clock, a neighbour), not the step."""
    t = time.perf_counter()
    x = 0
    for i in range(n):
        x += i * i
    return (time.perf_counter() - t) * 1e3


def host_phases(t0: float, marks: dict) -> dict:
    """Host milliseconds from the previous step's end (t0) to each milestone in `marks`, in PHASES order, each
    from the one before: "batch" (the next batch fetched: the step boundary), "backward" (forward and backward
    launched, gradients clipped), "optimizer" (its step returned: ours waits for the GPU there), "bookkeeping"
    (scheduler, zero_grad, callbacks). Where the host waits on the GPU, the wait lands in the phase that waits."""
    out, last = {}, t0
    for name in PHASES:
        if name in marks:
            out[name] = round((marks[name] - last) * 1e3, 3)
            last = marks[name]
    return out


def median_phases(phases: list[dict]) -> dict:
    """Each host phase's median over the steps given (host_phases), where every step has it."""
    names = [n for n in PHASES if phases and all(n in p for p in phases)]
    return {n: round(statistics.median(p[n] for p in phases), 3) for n in names}


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


GAP_NS = 20_000  # idle gaps this long or longer are listed one by one (shorter ones only counted)


def idle(intervals: list[tuple[str, int, int]], steps: int, top: int = 15) -> dict:
    """Where the GPU sat idle: `intervals` are (kernel name, start ns, end ns) on any stream, over `steps` steps.

    Busy time is the union of the intervals (kernels of two streams overlap); idle time is the rest of the span
    from the first start to the last end. Each gap of GAP_NS or more is named by the kernels that end before it
    and start after it; gaps are also summed by that pair of kinds, which says where in a step the GPU waits
    on the host (e.g. optimizer -> embedding: the step boundary).
    """
    if not intervals:
        return {"span_ms_per_step": 0.0, "idle_ms_per_step": 0.0, "short_gaps_ms_per_step": 0.0,
                "gaps": [], "gaps_by_kind": []}
    order = sorted(intervals, key=lambda k: (k[1], k[2]))
    gaps, short, end, last = [], 0, order[0][2], order[0][0]
    for name, start, stop in order[1:]:
        if start > end:
            if start - end >= GAP_NS:
                gaps.append((start - end, last, name))
            else:
                short += start - end
        if stop >= end:
            end, last = stop, name
    span = end - order[0][1]
    pairs: dict[tuple[str, str], list] = {}
    for ns, before, after in gaps:
        acc = pairs.setdefault((kind_of(before), kind_of(after)), [0, 0])
        acc[0] += ns
        acc[1] += 1
    ms = 1e6 * steps
    return {"span_ms_per_step": span / ms,
            "idle_ms_per_step": (sum(g[0] for g in gaps) + short) / ms,
            "short_gaps_ms_per_step": short / ms,
            "gaps": [{"ms": ns / 1e6, "before": b, "after": a} for ns, b, a in sorted(gaps, reverse=True)[:top]],
            "gaps_by_kind": [{"before": b, "after": a, "ms_per_step": v[0] / ms, "per_step": v[1] / steps}
                             for (b, a), v in sorted(pairs.items(), key=lambda kv: -kv[1][0])]}


def text(title: str, s: dict, top: int = 40) -> str:
    lines = [title, f"{s['steps']} steps profiled: {s['wall_ms_per_step']:.1f} ms per step wall, "
             f"{s['gpu_busy_ms_per_step']:.1f} ms in the profiled ops (GPU kernels; CPU ops without CUDA)", "", "kind | ms per step", "---|---:"]
    lines += [f"{k} | {v:.2f}" for k, v in s["kinds_ms_per_step"].items()]
    lines += ["", f"top {top} kernels | ms per step | calls per step | kind", "---|---:|---:|---"]
    lines += [f"{k['name'][:120]} | {k['ms_per_step']:.3f} | {k['calls_per_step']:g} | {k['kind']}"
              for k in s["kernels"][:top]]
    gaps = s.get("idle")
    if gaps and gaps["span_ms_per_step"]:
        lines += ["", f"GPU idle: {gaps['idle_ms_per_step']:.2f} ms per step of a {gaps['span_ms_per_step']:.1f} ms span "
                  f"(first kernel to last); {gaps['short_gaps_ms_per_step']:.2f} ms of it in gaps under "
                  f"{GAP_NS // 1000} us", "", "gaps by kinds on either side | ms per step | gaps per step", "---|---:|---:"]
        lines += [f"{g['before']} -> {g['after']} | {g['ms_per_step']:.3f} | {g['per_step']:g}"
                  for g in gaps["gaps_by_kind"]]
        lines += ["", "largest gaps | ms | kernel before | kernel after", "---|---:|---|---"]
        lines += [f"{i + 1} | {g['ms']:.3f} | {g['before'][:70]} | {g['after'][:70]}" for i, g in enumerate(gaps["gaps"])]
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
        spans = _device_intervals(self._prof) if cuda else []
        self._prof = None
        s = summarize(kernels, STEPS, wall)
        if spans:
            s["idle"] = idle(spans, STEPS)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"{self.name}.json").write_text(json.dumps({"title": self.title, **s}, indent=1))
        (self.out_dir / f"{self.name}.txt").write_text(text(self.title, s))


def _device_intervals(prof) -> list[tuple[str, int, int]]:
    """(name, start ns, end ns) of every GPU activity (kernels, copies, sets) the profiler recorded."""
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # a torch without kineto results: no gap table
        return []
    return [(e.name(), e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
            if str(e.device_type()).endswith("CUDA") and e.duration_ns() > 0]


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --memory-profile: where a row's peak allocated memory is, by the Python line that allocated each block.
MEMORY_EVENTS = 3_000_000  # allocation events kept (a ring: a row with more loses its first ones, and says so)
_TORCH_FRAME = re.compile(r"[/\\]torch[/\\]")  # torch's own Python: a block is named by the first frame outside it


def site_of(frames: list) -> str:
    """The allocating line of a recorded block: its innermost frame outside torch (the project's, peft's, the
    peer's ...), else its innermost frame; "file:line function" with the path from its package on."""
    chosen = next((f for f in frames if not _TORCH_FRAME.search(f.get("filename", ""))), frames[0] if frames else None)
    if chosen is None:
        return "(no Python frame)"
    path = re.split(r"site-packages[/\\]|[/\\]src[/\\]", chosen.get("filename", ""))[-1]
    return f"{path}:{chosen.get('line')} {chosen.get('name')}"


def peak_breakdown(events: list, base_bytes: int, top: int = 25, complete: bool = True) -> dict:
    """Where the peak of the recorded allocations is. `events`: a CUDA memory trace (torch.cuda.memory._snapshot's
    device_traces for one GPU, in order; "alloc" and "free_requested" / "free_completed" actions with addr, size and
    frames); `base_bytes`: allocated when the recording began (weights, adapters: no event of theirs is recorded).

    Replays the trace (a block counts from its alloc to its first free event; a block from before the recording
    leaves the base at its first free) to the event where the most bytes are live (-1: none above the start);
    the blocks allocated since and live there, summed by allocating line (site_of), largest first, are the
    breakdown."""
    frees = ("free_requested", "free_completed")
    live, gone, cur, best, best_i, base_freed, base_freed_at_peak = {}, set(), 0, 0, -1, 0, 0
    for i, e in enumerate(events):
        action, addr = e.get("action"), e.get("addr")
        if action == "alloc":
            live[addr] = e["size"]
            cur += e["size"]
            if cur > best:
                best, best_i, base_freed_at_peak = cur, i, base_freed
        elif action in frees and addr in live:
            cur -= live.pop(addr)
            gone.add(addr)
        elif action in frees and addr not in gone:  # allocated before the recording began
            gone.add(addr)
            cur -= e.get("size", 0)
            base_freed += e.get("size", 0)
    at_peak = {}
    for e in events[:best_i + 1]:
        if e.get("action") == "alloc":
            at_peak[e["addr"]] = e
        elif e.get("action") in frees:
            at_peak.pop(e.get("addr"), None)
    sites: dict[str, list] = {}
    for e in at_peak.values():
        acc = sites.setdefault(site_of(e.get("frames") or []), [0, 0])
        acc[0] += e["size"]
        acc[1] += 1
    peak_event = events[best_i] if best_i >= 0 else {}
    return {"base_bytes": base_bytes, "base_freed_at_peak_bytes": base_freed_at_peak,
            "recorded_peak_bytes": base_bytes + best, "events": len(events), "peak_event": best_i, "complete": complete,
            "peak_allocation": [site_of([f]) for f in (peak_event.get("frames") or [])[:10]],
            "sites": [{"site": s, "bytes": v[0], "blocks": v[1]}
                      for s, v in sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]]}


def memory_text(title: str, b: dict) -> str:
    mib = 2 ** 20
    lines = [title,
             f"peak allocated {b['max_allocated_bytes'] / mib:,.1f} MiB (torch.cuda.max_memory_allocated); at the "
             f"recorded peak (event {b['peak_event']:,} of {b['events']:,}): {b['base_bytes'] / mib:,.1f} MiB "
             f"allocated before the row began ({b['base_freed_at_peak_bytes'] / mib:,.1f} MiB of it freed by then) + "
             f"{(b['recorded_peak_bytes'] - b['base_bytes'] + b['base_freed_at_peak_bytes']) / mib:,.1f} MiB of "
             f"blocks allocated since, by line:" + ("" if b["complete"] else
                                                     " (the trace overflowed: its first events are lost)")]
    lines += [f"{s['bytes'] / mib:10,.1f} MiB {s['blocks']:6d} blocks  {s['site']}" for s in b["sites"]]
    lines += ["", "the allocation that reached the peak, innermost frame first:"] + \
             [f"  {f}" for f in b["peak_allocation"]]
    return "\n".join(lines) + "\n"


class MemoryRecorder:
    """Records every CUDA allocation of one row, from before its first step to after its last, and writes where
    its peak is: DIR/<name>-memory.txt and .json (peak_breakdown). Recording costs host time at every allocation:
    a recorded row's speed is not comparable with an unrecorded one's."""

    def __init__(self, out_dir, name: str, title: str):
        self.out_dir, self.name, self.title = Path(out_dir), name, title
        self.base = None

    def start(self) -> None:
        import torch

        self.base = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=MEMORY_EVENTS, context="alloc", stacks="python")

    def finish(self) -> dict | None:
        """Write the breakdown (None where start was not called); the recording stops either way."""
        import torch

        base, self.base = self.base, None
        if base is None:
            return None
        try:
            snap = torch.cuda.memory._snapshot()
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        traces = snap.get("device_traces") or [[]]
        events = traces[torch.cuda.current_device()] if torch.cuda.current_device() < len(traces) else []
        b = peak_breakdown(events, base, complete=len(events) < MEMORY_EVENTS)
        b["max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"{self.name}-memory.json").write_text(json.dumps({"title": self.title, **b}, indent=1))
        (self.out_dir / f"{self.name}-memory.txt").write_text(memory_text(self.title, b))
        return b

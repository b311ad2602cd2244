"""Speed and memory of our training path, side by side with the standard recipe (baseline.py).

    qlora-lab bench --preset llama2-7b --seq-len 512 --batch-size 8 --steps 20 --baseline
    qlora-lab bench --preset llama2-7b falcon-7b --seq-len 512 2048 --batch-size 8 2 --baseline
    qlora-lab bench --preset tiny-llama --seq-len 64 --batch-size 2 --steps 4 --baseline   # CPU

Each (preset, path) runs in its own process (one crash or OOM loses only its rows), loads the model
once and trains every (seq_len, batch_size) pair on the same synthetic batches, from the same initial
LoRA weights (the first process saves them, the others load them). "ours" is exactly what
`qlora-lab train` runs: training.load_plan -> training.load_model -> training.build_trainer -> Trainer.train.

Measured: median wall time per optimizer step after warm-up (data loading and logging included),
trained tokens/s, peak allocated and reserved GPU memory, the base weights' bytes, MFU and HFU, and
the losses of the first 20 steps, all against the bf16 matmul rate measured in the same process.
Model FLOPs per trained token (`flops_per_token`): a frozen matmul weight costs its forward and the
gradient of its input, 4 x its params (no weight gradient); a LoRA weight 6 x its params; attention's
two matmuls 12 x layers x hidden x seq_len (forward and both input gradients, as in PaLM's appendix B).
Recomputation is work the hardware does, not the model: HFU adds each recomputed layer's forward again.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .distributed import is_main_process, world_size

LORA_R = 64              # both paths' LoRA rank (ours: _bench_config; the standard recipe: baseline.load)
LOSS_STEPS = 20          # steps whose losses must agree between the two paths
LOSS_TOLERANCE = 0.01    # relative
# Variants that only change these keys run inside the "ours" process, on the model it already loaded.
RUNTIME_KEYS = ("train.fused_lora", "train.gradient_checkpointing", "train.memory_budget_gib")


@dataclass(frozen=True)
class Shape:
    seq_len: int
    batch_size: int

    @property
    def tokens(self) -> int:
        return self.seq_len * self.batch_size

    def __str__(self) -> str:
        return f"{self.batch_size}x{self.seq_len}"


# ----------------------------------------------------------------------------- parent

def run(presets, shapes, steps: int = 20, baseline: bool = False, memory_budget=None, overrides=(),
        variants=(), multi_gpu=(), output=None, warmup=None, timeout=None, command: str | None = None) -> dict:
    """Run every worker, print the table, write JSON (and a Markdown twin) to `output`. Returns the report."""
    from .fileio import atomic_write
    from .runs import atomic_write_json, env_info

    warmup = default_warmup(steps) if warmup is None else warmup
    output = Path(output) if output else default_output(presets, memory_budget)
    report = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": steps,
              "warmup_steps": warmup, "memory_budget_gib": memory_budget, "env": env_info(),
              "workers": [], "rows": [], "comparisons": []}
    runs = [("ours", list(overrides))]  # (label, overrides) trained by the ours process, in this order
    paths = [("ours", "ours", runs)]
    by_name = {}  # label -> our path's overrides plus the variant's
    for name, sets in variants:
        label = f"ours[{name}]"
        by_name[label] = list(overrides) + list(sets)
        if all(s.split("=", 1)[0].strip() in RUNTIME_KEYS for s in sets):
            runs.append((label, by_name[label]))
        else:
            paths.append((label, "ours", [(label, by_name[label])]))
    # Several GPUs: (kind, processes, variant name or None): that variant's overrides, launched by
    # torchrun (data-parallel) or accelerate with fsdp_qlora.yaml (sharded; the package's copy of configs/accelerate/).
    multi = []
    for kind, nproc, name in multi_gpu:
        ref = f"ours[{name}]" if name else "ours"
        label = f"{ref[:-1]},{kind}{nproc}]" if name else f"ours[{kind}{nproc}]"
        multi.append((label, "ours", [(label, by_name.get(ref, list(overrides)))], {"kind": kind, "nproc": nproc, "ref": ref}))
    if baseline:
        paths.append(("baseline", "baseline", [("baseline", [])]))
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as work:
        for preset in presets:
            init_lora = Path(work) / f"{preset}-lora-init.safetensors"
            # The Trainer wraps a model in FSDP once: a sharded path gets one process per shape.
            jobs = [(lb, pa, ru, None, shapes) for lb, pa, ru in paths]
            for lb, pa, ru, launch in multi:
                jobs += [(lb, pa, ru, launch, [s]) for s in shapes] if launch["kind"] == "fsdp" else \
                    [(lb, pa, ru, launch, shapes)]
            for label, path, path_runs, launch, job_shapes in jobs:
                spec = {"launch": launch, "path": path, "label": label, "preset": preset,
                        "shapes": [[s.seq_len, s.batch_size] for s in job_shapes],
                        "steps": steps, "warmup": warmup, "memory_budget": memory_budget, "runs": path_runs,
                        "workdir": str(Path(work) / f"{preset}-{label}-{job_shapes[0]}"), "init_lora": str(init_lora)}
                print(f"qlora-lab bench: {preset} {', '.join(lb for lb, _ in path_runs)} {' '.join(map(str, job_shapes))} ...",
                      file=sys.stderr, flush=True)
                rows, info = _run_worker(spec, timeout)
                report["workers"].append(info)
                report["rows"].extend(rows)
                report["comparisons"] = compare(report["rows"])
                report["scaling"] = compare_scaling(report["rows"])
                atomic_write_json(output, report)  # after every worker: a later crash keeps these
    report["matmul_tflops"] = max((w.get("matmul_tflops") or 0 for w in report["workers"]), default=0) or None
    for r in report["rows"]:
        r["mfu"] = mfu(r, report["matmul_tflops"])
        r["hfu"] = mfu(r, report["matmul_tflops"], "hw_flops_per_token")
    report["comparisons"] = compare(report["rows"])
    report["scaling"] = compare_scaling(report["rows"])
    table = markdown(report)
    report["table"] = table
    atomic_write_json(output, report)
    atomic_write(output.with_suffix(".md"), table + "\n")
    print(table)
    print(f"\nwrote {output} and {output.with_suffix('.md')}")
    return report


def default_warmup(steps: int) -> int:
    return max(1, min(5, steps // 4))


def default_output(presets, memory_budget) -> Path:
    """bench-<tag>-<time>.json in the current folder (an installed package has no repo folders to write into)."""
    tag = "-".join(presets) + (f"-budget{memory_budget:g}" if memory_budget else "")
    return Path(f"bench-{tag}-{time.strftime('%Y%m%d-%H%M%S')}.json")


def _run_worker(spec: dict, timeout) -> tuple[list, dict]:
    """One process per (preset, path); its results come back as JSON lines, one per event."""
    Path(spec["workdir"]).mkdir(parents=True, exist_ok=True)
    out = Path(spec["workdir"]) / "events.jsonl"
    spec = {**spec, "out": str(out)}
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off
    if not spec.get("launch"):  # one process, one GPU (the standard recipe would batch over all visible)
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(launch_command(spec.get("launch")) + ["-m", "qlora_lab.bench", json.dumps(spec)], env=env,
                           stdout=sys.stderr, stderr=subprocess.PIPE, text=True, timeout=timeout)
        rc, tail = p.returncode, (p.stderr or "")[-3000:]
        sys.stderr.write(tail)
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", (e.stderr or b"")[-3000:] if isinstance(e.stderr, bytes) else str(e.stderr or "")[-3000:]
    events = []
    if out.is_file():
        for line in out.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    info = {"preset": spec["preset"], "label": spec["label"], "returncode": rc, "seconds": round(time.perf_counter() - t0, 1)}
    for e in events:
        if e.get("event") == "start":
            info.update({k: v for k, v in e.items() if k != "event"})
    rows = [e["row"] for e in events if e.get("event") == "row"]
    done = {(r["path"], r["seq_len"], r["batch_size"]) for r in rows}
    for label, _ in spec["runs"]:
        for L, B in spec["shapes"]:
            if (label, L, B) not in done:  # the process died before this shape: say how
                why = _last_error(tail) if rc != 0 else "no result"
                rows.append({"preset": spec["preset"], "path": label, "seq_len": L, "batch_size": B,
                             "status": f"failed: {why}"})
    return rows, info


def launch_command(launch) -> list[str]:
    """How a worker starts: one process, torchrun (data-parallel) or accelerate + FSDP (sharded)."""
    if not launch:
        return [sys.executable]
    n = str(launch["nproc"])
    if launch["kind"] == "dp":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    config = accelerate_config("fsdp_qlora.yaml")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", n]


def accelerate_config(name: str) -> Path:
    """The launch config NAME shipped with the package (resources/accelerate/, a byte-identical copy of the
    repo's configs/accelerate/NAME, which users read and edit): found wherever the package is installed."""
    from importlib import resources

    p = resources.files("qlora_lab") / "resources" / "accelerate" / name
    if not p.is_file():
        from .errors import UserError

        raise UserError(f"qlora_lab/resources/accelerate/{name} not found (an incomplete install?)")
    return Path(str(p))


def _last_error(tail: str) -> str:
    lines = [ln.strip() for ln in (tail or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "Killed" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "crashed"


def mfu(row: dict, matmul_tflops, key: str = "flops_per_token") -> float | None:
    """Model FLOPs utilization; key="hw_flops_per_token" gives HFU (recomputation counted)."""
    if not matmul_tflops or not row.get("tokens_per_s") or not row.get(key):
        return None
    gpus = row.get("world_size") or 1  # tokens/s is the whole job's; the matmul rate one GPU's
    return row["tokens_per_s"] * row[key] / (matmul_tflops * 1e12 * gpus)


def compare(rows: list) -> list:
    """Each ours-row against the baseline of the same preset and shape: speed, memory, loss agreement."""
    out = []
    base = {(r["preset"], r["seq_len"], r["batch_size"]): r for r in rows if r["path"] == "baseline"}
    for r in rows:
        if not r["path"].startswith("ours"):
            continue
        b = base.get((r["preset"], r["seq_len"], r["batch_size"]))
        if b is None:
            continue
        c = {"preset": r["preset"], "seq_len": r["seq_len"], "batch_size": r["batch_size"], "path": r["path"]}
        if r.get("tokens_per_s") and b.get("tokens_per_s"):
            c["speedup"] = r["tokens_per_s"] / b["tokens_per_s"]
        if r.get("peak_allocated_bytes") and b.get("peak_allocated_bytes"):
            c["peak_ratio"] = r["peak_allocated_bytes"] / b["peak_allocated_bytes"]
        c.update(_loss_agreement(r, b))
        out.append(c)
    return out


def compare_scaling(rows: list) -> list:
    """Each several-GPU row against its one-GPU reference (same overrides): the same batch per GPU
    for speed and memory, the same global batch for the losses."""
    out = []
    one = {(r["preset"], r["path"], r["seq_len"], r["batch_size"]): r for r in rows
           if r.get("status") == "ok" and r.get("world_size", 1) == 1}
    for r in rows:
        n = r.get("world_size", 1)
        if n == 1 or r.get("status") != "ok" or r["batch_size"] % n:
            continue
        c = {"preset": r["preset"], "path": r["path"], "seq_len": r["seq_len"], "batch_size": r["batch_size"],
             "world_size": n, "reference": r["reference"]}
        per_gpu = one.get((r["preset"], r["reference"], r["seq_len"], r["batch_size"] // n))
        if per_gpu:
            c.update(per_gpu_batch=r["batch_size"] // n, speedup=r["tokens_per_s"] / per_gpu["tokens_per_s"])
            if r.get("peak_allocated_bytes") and per_gpu.get("peak_allocated_bytes"):
                c["peak_allocated_ratio"] = r["peak_allocated_bytes"] / per_gpu["peak_allocated_bytes"]
        c.update(_loss_agreement(r, one.get((r["preset"], r["reference"], r["seq_len"], r["batch_size"])) or {}))
        out.append(c)
    return out


def _loss_agreement(row: dict, ref: dict) -> dict:
    """Largest relative difference of the two rows' losses over the first LOSS_STEPS steps ({} if none)."""
    la, lb = row.get("losses") or [], ref.get("losses") or []
    n = min(len(la), len(lb), LOSS_STEPS)
    if not n:
        return {}
    d = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(la[:n], lb[:n]))
    return {"loss_steps": n, "loss_max_rel_diff": d, "loss_ok": d <= LOSS_TOLERANCE}


def _gib(x) -> str:
    return "-" if not x else f"{x / 2**30:.1f}"


def markdown(report: dict) -> str:
    """One table: a row per (preset, shape, path), baseline beside ours, then the losses."""
    env = report["env"]
    comp = {(c["preset"], c["seq_len"], c["batch_size"], c["path"]): c for c in report["comparisons"]}
    head = (f"Device: {env.get('device')} | torch {env.get('torch')} | transformers {env.get('transformers')} | "
            f"peft {env.get('peft')} | bitsandbytes {env.get('bitsandbytes')} | trl {env.get('trl')} | "
            f"liger-kernel {env.get('liger-kernel')}\n"
            f"Matmul rate measured (bf16, 8192^3): {report.get('matmul_tflops') or 'n/a'} TFLOP/s. "
            f"{report['steps']} steps, median after {report['warmup_steps']} warm-up steps"
            + (f"; memory budget {report['memory_budget_gib']} GiB" if report.get("memory_budget_gib") else "") + ".\n")
    lines = ["| model | batch x seq | path | plan | step s | tokens/s | MFU | HFU | peak alloc GiB | peak reserved GiB "
             "| weights GiB | vs baseline | loss max rel. diff (20 steps) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in report["rows"]:
        c = comp.get((r["preset"], r["seq_len"], r["batch_size"], r["path"]), {})
        if r.get("status", "ok") != "ok":
            lines.append(f"| {r['preset']} | {r['batch_size']}x{r['seq_len']} | {r['path']} | | {r['status']} "
                         "| | | | | | | | |")
            continue
        w = _gib(r.get("weights_bytes"))
        if r.get("n_linear_16bit"):
            w += f" (**16-bit**: {r['n_linear_16bit']} of {r['n_linear']} linear layers not quantized)"
        m, hw = r.get("mfu"), r.get("hfu")
        speed = f"{c['speedup']:.2f}x" if c.get("speedup") else ""
        loss = (f"{c['loss_max_rel_diff']:.2%} {'ok' if c['loss_ok'] else 'FAIL'}" if "loss_ok" in c else "")
        lines.append(f"| {r['preset']} | {r['batch_size']}x{r['seq_len']} | {r['path']} | {r.get('plan_words', '')} "
                     f"| {r['median_step_s']:.3f} | {r['tokens_per_s']:.0f} | {'n/a' if m is None else f'{m:.1%}'} "
                     f"| {'n/a' if hw is None else f'{hw:.1%}'} "
                     f"| {_gib(r.get('peak_allocated_bytes'))} | {_gib(r.get('peak_reserved_bytes'))} | {w} "
                     f"| {speed} | {loss} |")
    for c in report.get("scaling") or []:
        line = f"\n{c['preset']} {c['path']} ({c['world_size']} GPUs, {c['batch_size']}x{c['seq_len']} in all) vs {c['reference']} on 1 GPU:"
        if "speedup" in c:
            line += f" {c['speedup']:.2f}x its tokens/s at {c['per_gpu_batch']}x{c['seq_len']} per GPU"
            if "peak_allocated_ratio" in c:
                line += f", peak allocated per GPU {c['peak_allocated_ratio']:.2f}x its"
            line += ";"
        if "loss_ok" in c:
            line += (f" losses over {c['loss_steps']} steps vs the same global batch on 1 GPU: max rel. diff "
                     f"{c['loss_max_rel_diff']:.2%} {'ok' if c['loss_ok'] else 'FAIL'}")
        lines.append(line)
    return head + "\n" + "\n".join(lines)


# ----------------------------------------------------------------------------- worker (one process)

def synthetic_examples(vocab: int, shape: Shape, steps: int, seed: int = 1234) -> list[dict]:
    """steps x batch_size sequences of seq_len tokens: a random motif repeated (learnable by copying).

    Every token is trained (labels = input_ids); ids 0-3 (pad, bos, eos, unk) are never drawn.
    """
    import torch

    g = torch.Generator().manual_seed(seed + shape.seq_len * 1000 + shape.batch_size)
    rows = []
    for _ in range(steps * shape.batch_size):
        period = int(torch.randint(8, 65, (1,), generator=g))
        motif = torch.randint(4, vocab, (period,), generator=g)
        ids = motif.repeat(shape.seq_len // period + 1)[: shape.seq_len].tolist()
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


class _Emit:
    def __init__(self, path):
        self.path = Path(path)

    def __call__(self, event: str, **kw):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": event, **kw}, default=str) + "\n")


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


def _step_timer():
    """Trainer callback: wall time of every optimizer step (synchronized), and every logged loss."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.losses, self._t = [], [], None

        def _now(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            self._t = self._now()

        def on_step_end(self, args, state, control, **kw):
            t = self._now()
            self.times.append(t - self._t)
            self._t = t

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and "train_runtime" not in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def _bench_config(preset: str, shape: Shape, steps: int, budget, overrides):
    from .config import from_dict

    raw = {"model": {"random_init": preset},
           "lora": {"r": LORA_R, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"},
           "data": {"max_length": shape.seq_len, "eval_size": 0},
           "train": {"max_steps": steps, "per_device_train_batch_size": shape.batch_size,
                     "gradient_accumulation_steps": 1, "learning_rate": 2e-4, "lr_scheduler_type": "constant",
                     "warmup_ratio": 0.0, "max_grad_norm": 0.3, "logging_steps": 1, "eval_steps": None,
                     "save_steps": 10**9, "memory_budget_gib": budget},
           "logging": {"report_to": "none"}}
    cfg = from_dict(raw, source="<bench>")
    return cfg.set(*overrides) if overrides else cfg


bench_config = _bench_config  # public: the CLI validates --set before any worker starts


def _lora_state(model) -> dict:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def _sync_init_lora(model, path: str) -> str:
    """The first process saves its initial LoRA weights; every other one loads them (same start)."""
    import torch
    from safetensors.torch import load_file, save_file

    state = _lora_state(model)
    p = Path(path)
    if not p.is_file() and world_size() > 1:
        return "own (several processes start from their own, identically seeded, init)"
    if p.is_file():
        saved = load_file(str(p))
        if set(saved) != set(state):
            raise RuntimeError(f"LoRA parameters differ between paths: {sorted(set(saved) ^ set(state))[:4]}")
        with torch.no_grad():
            for n, t in state.items():
                t.copy_(saved[n])
        return "loaded"
    save_file({n: t.detach().to("cpu", copy=True).contiguous() for n, t in state.items()}, str(p))
    return "saved"


def _peak_reset():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peaks() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"peak_allocated_bytes": None, "peak_reserved_bytes": None}
    peaks = [torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()]
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # the largest GPU's
        t = torch.tensor(peaks, dtype=torch.float64, device="cuda")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        peaks = [int(x) for x in t.tolist()]
    return {"peak_allocated_bytes": peaks[0], "peak_reserved_bytes": peaks[1]}


def flops_per_token(hf_config, seq_len: int, lora_r: int, recomputed_layers: int = 0) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per trained token of LoRA on every linear layer of a frozen base.

    Model: 4 x frozen matmul params (forward + input gradient) + 6 x LoRA params (forward + input and
    weight gradients) + 12 x layers x hidden x seq_len (attention scores and mixing: forward + two
    input gradients). Hardware: plus the forward of each recomputed layer (2 x its params + its
    attention, 4 x hidden x seq_len).
    """
    from .hardware import param_counts

    p = param_counts(hf_config, lora_r)
    layers, h = hf_config.num_hidden_layers, hf_config.hidden_size
    model = 4 * (p["linear"] + p["lm_head"]) + 6 * p["lora"] + 12 * layers * h * seq_len
    per_layer_forward = 2 * (p["linear"] + p["lora"]) / layers + 4 * h * seq_len
    return model, model + recomputed_layers * per_layer_forward


def _row(spec, shape: Shape, timer, steps: int, warmup: int, hf_config, lora_r: int, recomputed: int,
         extra: dict) -> dict:
    times = timer.times[warmup:] or timer.times
    med = statistics.median(times)
    trained = shape.batch_size * (shape.seq_len - 1)  # tokens with a next-token label, as training.Trainer counts
    return {"preset": spec["preset"], "path": spec["label"], "seq_len": shape.seq_len,
            "batch_size": shape.batch_size, "status": "ok", "steps": len(timer.times),
            "median_step_s": med, "step_times_s": [round(t, 4) for t in timer.times],
            "tokens_per_s": trained / med, "trained_tokens_per_step": trained,
            **dict(zip(("flops_per_token", "hw_flops_per_token"),
                       flops_per_token(hf_config, shape.seq_len, lora_r, recomputed))),
            "lora_r": lora_r,
            "world_size": world_size(),
            "losses": timer.losses[:max(steps, LOSS_STEPS)], **_peaks(), **extra}


def _oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def worker(spec: dict) -> int:
    emit = _Emit(spec["out"])
    emit("start", pid=os.getpid(), matmul_tflops=matmul_tflops())
    shapes = [Shape(L, B) for L, B in spec["shapes"]]
    fn = _worker_ours if spec["path"] == "ours" else _worker_baseline
    if not is_main_process():  # several processes: rank 0 reports
        emit = _no_emit
    return fn(spec, shapes, emit)


def _no_emit(event: str, **kw):
    pass


def _worker_ours(spec, shapes, emit) -> int:
    """Load the model once; train every (run, shape) on it, each run with its own plan."""
    model = summary = None
    for label, overrides in spec["runs"]:
        for shape in shapes:
            model, summary = _train_ours(spec, label, overrides, shape, model, summary, emit)
    return 0


def _train_ours(spec, label, overrides, shape, model, summary, emit):
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import set_seed

    from . import training
    from .kernels import fused_lora

    trainer = None
    cfg = _bench_config(spec["preset"], shape, spec["steps"], spec["memory_budget"], overrides)
    run = training.prepare_run_folder(cfg, Path(spec["workdir"]) / f"run-{label}-{shape}", resume=False)
    set_seed(cfg.train.seed)
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(1.0, 0)  # load_plan applies this run's budget, if any
    tok, hf_config, plan = training.load_plan(cfg, run)
    try:
        if model is None:
            model = training.load_model(cfg, plan, run)
            summary = run.read_json("model_summary.json") or {}  # written by rank 0 only
            emit("model", summary=summary, lora_init=_sync_init_lora(model, spec["init_lora"]))
        else:  # the loaded model, this run's plan: recompute all, some or no layers; fused LoRA or not
            _apply_plan(model, plan)
            if (spec.get("launch") or {}).get("kind") != "fsdp":  # FSDP has wrapped (flattened) the LoRA weights
                _sync_init_lora(model, spec["init_lora"])
        ds = Dataset.from_list(synthetic_examples(hf_config.vocab_size, shape, spec["steps"]))
        trainer = training.build_trainer(cfg, plan, model, tok, ds, None, run)
        trainer._get_train_sampler = lambda *a, **k: SequentialSampler(ds)  # same order as the baseline
        timer = _step_timer()
        trainer.add_callback(timer)
        _peak_reset()
        trainer.train()
        n = plan.checkpoint_layers if plan.checkpoint_layers is not None else hf_config.num_hidden_layers
        words = (f"{plan.kernels}{' + fused LoRA' if plan.fused_lora else ''}, ckpt {n}/{hf_config.num_hidden_layers}, "
                 f"micro {plan.per_device_train_batch_size}x{plan.gradient_accumulation_steps}"
                 + (f", budget {plan.memory_budget_gib:g} GiB" if cfg.train.memory_budget_gib else ""))
        recomputed = 0 if not plan.gradient_checkpointing else n
        emit("row", row=_row({**spec, "label": label}, shape, timer, spec["steps"], spec["warmup"], hf_config,
                             cfg.lora.r, recomputed, {
            "plan": plan.to_dict(), "plan_words": words, "kernels": summary.get("kernels"),
            "fused_lora_modules": fused_lora.count(model),
            "launch": (spec.get("launch") or {}).get("kind"), "reference": (spec.get("launch") or {}).get("ref"),
            "weights_bytes": summary.get("weights_bytes"), "n_linear_16bit":
                summary.get("n_linear_expected_4bit", 0) - summary.get("n_linear_4bit", 0) if summary.get("quantization") else None,
            "n_linear": summary.get("n_linear_total"), "n_lora_modules": summary.get("n_lora_modules")}))
    except Exception as e:  # an OOM loses this shape only
        emit("row", row=_failed_row({**spec, "label": label}, shape, e))
        if not _oom(e):
            raise
    finally:
        trainer = None
        _peak_reset()
    return model, summary


def _apply_plan(model, plan) -> None:
    """Switch the runtime choices of a loaded PeftModel to `plan`: recomputation and fused LoRA."""
    from .kernels import fused_lora
    from .model import set_recomputation

    set_recomputation(model.get_base_model(), plan.recompute)
    if plan.fused_lora:
        fused_lora.enable(model)
    else:
        fused_lora.disable(model)


def _failed_row(spec, shape, e) -> dict:
    """The table row of a shape that failed: out of memory loses that shape only."""
    return {"preset": spec["preset"], "path": spec["label"], "seq_len": shape.seq_len,
            "batch_size": shape.batch_size, "status": "failed: out of memory" if _oom(e)
            else f"failed: {type(e).__name__}: {str(e)[:200]}", **_peaks()}


def _worker_baseline(spec, shapes, emit) -> int:
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, set_seed

    from . import baseline
    from .presets import cached_model

    path = str(cached_model(spec["preset"]))
    hf_config = AutoConfig.from_pretrained(path)
    cuda = torch.cuda.is_available()
    if cuda and spec["memory_budget"]:
        frac = min(1.0, spec["memory_budget"] * 2**30 / torch.cuda.get_device_properties(0).total_memory)
        torch.cuda.set_per_process_memory_fraction(frac, 0)
    # bf16 on the GPU as the recipe says; float32 on a CPU, where our path computes in float32 too.
    dtype = torch.bfloat16 if cuda else torch.float32
    model = facts = tok = lora = None
    for shape in shapes:
        tr = None
        try:
            set_seed(42)
            if model is None:
                model, tok, lora, facts = baseline.load(path, dtype, lora_r=LORA_R, lora_alpha=16, lora_dropout=0.05)
                emit("model", facts=facts)
            ds = Dataset.from_list(synthetic_examples(hf_config.vocab_size, shape, spec["steps"]))
            timer = _step_timer()
            tr = baseline.trainer(
                model, tok, lora, ds, out_dir=str(Path(spec["workdir"]) / f"run-{shape}"), seq_len=shape.seq_len,
                batch_size=shape.batch_size, steps=spec["steps"], learning_rate=2e-4, max_grad_norm=0.3,
                weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, seed=42, bf16=cuda,
                optim="paged_adamw_32bit" if cuda else "adamw_torch", callbacks=[timer])
            model = tr.model
            lora_init = _sync_init_lora(model, spec["init_lora"])
            _peak_reset()
            tr.train()
            n_lora = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))
            emit("row", row=_row(spec, shape, timer, spec["steps"], spec["warmup"], hf_config, LORA_R,
                                 hf_config.num_hidden_layers, {  # the standard recipe recomputes every layer
                "plan_words": "TRL SFT, ckpt all, fp32 norms/head", "weights_bytes": facts["weights_bytes"],
                "weights_bytes_loaded": facts["weights_bytes_loaded"], "n_linear_16bit": facts["n_linear_16bit"],
                "n_linear": facts["n_linear"], "n_lora_modules": n_lora, "lora_init": lora_init}))
        except Exception as e:
            emit("row", row=_failed_row(spec, shape, e))
            if not _oom(e):
                raise
        finally:
            tr = None
            _peak_reset()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(worker(json.loads(sys.argv[1])))

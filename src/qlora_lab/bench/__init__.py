"""Speed and memory of our training path, side by side with the standard recipe and, asked for, a peer.

    qlora-lab bench --preset llama2-7b --seq-len 512 --batch-size 8 --steps 20 --baseline
    qlora-lab bench --preset llama2-7b falcon-7b --seq-len 512 2048 --batch-size 8 2 --baseline
    qlora-lab bench --preset llama2-7b --seq-len 512 --batch-size 8 --peer unsloth --peer-python PATH
    qlora-lab bench --preset tiny-llama --seq-len 64 --batch-size 2 --steps 4 --baseline   # CPU

Each job (preset, path) runs in its own process (one crash or OOM loses only its rows), loads the model
once and trains every (seq_len, batch_size) pair on the same synthetic batches, from the same initial
LoRA weights (the first process saves them, the others load them).

    spec.py      what every path trains: shapes, LoRA rank, the bench config, the synthetic batches
    jobs.py      which worker processes an invocation starts (Job)
    worker.py    the timed child process of ours and of the standard recipe
    baseline.py  the standard recipe (TRL + peft + bitsandbytes), standalone
    peer.py      the peer's side in the parent: checks, its worker's spec, its rows' FLOPs
    unsloth_worker.py  the peer's child process, run by path in the peer's interpreter
    flops.py     model and hardware FLOPs per token, the measured matmul rate, MFU and HFU
    table.py     comparisons with the standard recipe and the peer, scaling, the Markdown table
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .flops import flops_per_token, mfu
from .jobs import Job, plan_jobs
from .spec import (LORA_ALPHA, LORA_R, LOSS_STEPS, LOSS_TOLERANCE, RUNTIME_KEYS, Shape, bench_config,
                   default_warmup, synthetic_examples)
from .table import compare, compare_peer, compare_scaling, markdown

__all__ = ["LORA_ALPHA", "LORA_R", "LOSS_STEPS", "LOSS_TOLERANCE", "RUNTIME_KEYS", "Job", "Shape",
           "accelerate_config", "bench_config", "compare", "compare_peer", "compare_scaling", "default_output",
           "default_warmup", "flops_per_token", "launch_command", "markdown", "mfu", "plan_jobs", "run",
           "synthetic_examples"]


def run(presets, shapes, steps: int = 20, baseline: bool = False, memory_budget=None, overrides=(),
        variants=(), multi_gpu=(), output=None, warmup=None, timeout=None, command: str | None = None,
        peer: str | None = None, peer_python: str | None = None, profile=None, isolate: bool = False,
        memory_profile=None) -> dict:
    """Run every worker, print the table, write JSON (and a Markdown twin) to `output`. Returns the report.

    `peer` ("unsloth") with `peer_python` (its interpreter) adds the peer's rows; checked before any
    worker starts (UserError in one line: a bad PATH, the peer missing there, no CUDA GPU). `profile` (a
    folder): every row's last steps profiled there (profiling.py), left out of its median. `isolate`: each of
    our variants in a process of its own (jobs.plan_jobs). `memory_profile` (a folder, CUDA only): every row's
    allocations recorded and its peak broken down there by allocating line (profiling.MemoryRecorder).
    """
    from ..runs import env_info
    from . import peer as peers

    peer_info = peers.check(peer, peer_python) if peer or peer_python else None
    if memory_profile:
        _needs_cuda("--memory-profile")
    warmup = default_warmup(steps) if warmup is None else warmup
    output = Path(output) if output else default_output(presets, memory_budget)
    report = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": steps,
              "warmup_steps": warmup, "memory_budget_gib": memory_budget, "env": env_info(),
              "workers": [], "rows": [], "comparisons": []}
    if peer_info:
        report["peer"] = {"name": peer, "python": str(peer_python), **peer_info}
    if memory_profile:
        report["memory_profile"] = str(memory_profile)
    jobs = plan_jobs(shapes, baseline=baseline, overrides=overrides, variants=variants, multi_gpu=multi_gpu,
                     peer=peer, peer_python=peer_python, isolate=isolate)
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as work:
        for preset in presets:
            init_lora = Path(work) / f"{preset}-lora-init.safetensors"
            for job in jobs:
                workdir = Path(work) / f"{preset}-{job.label}-{job.shapes[0]}"
                print(f"qlora-lab bench: {preset} {', '.join(lb for lb, _ in job.runs)} "
                      f"{' '.join(map(str, job.shapes))} ...", file=sys.stderr, flush=True)
                if job.peer:
                    spec = peers.worker_spec(job, preset, steps, warmup, memory_budget)
                    cmd, env = peers.command(job), peers.env()
                else:
                    spec = {"launch": job.launch, "path": job.path, "label": job.label, "preset": preset,
                            "shapes": [[s.seq_len, s.batch_size] for s in job.shapes], "steps": steps,
                            "warmup": warmup, "memory_budget": memory_budget,
                            "runs": [[lb, list(o)] for lb, o in job.runs]}
                    cmd, env = launch_command(job.launch) + ["-m", "qlora_lab.bench.worker"], _env(job.launch)
                spec.update(workdir=str(workdir), init_lora=str(init_lora),
                            profile=str(Path(profile).resolve()) if profile else None,
                            memory_profile=str(Path(memory_profile).resolve()) if memory_profile else None)
                # A peer writes its compile caches into its working folder: the job's, not the user's.
                rows, info = _run_worker(spec, cmd, env, timeout, cwd=workdir if job.peer else None)
                if job.peer:
                    rows = peers.complete_rows(rows, preset)
                report["workers"].append(info)
                report["rows"].extend(rows)
                _write(report, output)  # after every worker: a later crash or kill keeps these, MFU and table too
    print(_write(report, output))
    print(f"\nwrote {output} and {output.with_suffix('.md')}")
    return report


def default_output(presets, memory_budget) -> Path:
    """bench-<tag>-<time>.json in the current folder (an installed package has no repo folders to write into)."""
    tag = "-".join(presets) + (f"-budget{memory_budget:g}" if memory_budget else "")
    return Path(f"bench-{tag}-{time.strftime('%Y%m%d-%H%M%S')}.json")


def _env(launch) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off
    if not launch:  # one process, one GPU (the standard recipe would batch over all visible)
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    return env


def _write(report: dict, output: Path) -> str:
    """Fill in what the rows so far give (the fastest matmul rate a worker measured, MFU and HFU,
    comparisons, the table) and write the JSON and its Markdown twin; returns the table."""
    from ..fileio import atomic_write
    from ..runs import atomic_write_json

    report["matmul_tflops"] = max((w.get("matmul_tflops") or 0 for w in report["workers"]), default=0) or None
    for r in report["rows"]:
        r["mfu"] = mfu(r, report["matmul_tflops"])
        r["hfu"] = mfu(r, report["matmul_tflops"], "hw_flops_per_token")
    report["comparisons"] = compare(report["rows"])
    report["scaling"] = compare_scaling(report["rows"])
    # Rows that recorded every allocation ran slower than they train: their speeds are no comparison with the peer.
    report["peer_comparisons"] = [] if report.get("memory_profile") else compare_peer(report["rows"])
    report["table"] = markdown(report)
    atomic_write_json(output, report)
    atomic_write(output.with_suffix(".md"), report["table"] + "\n")
    return report["table"]


def _run_worker(spec: dict, cmd: list, env: dict, timeout, cwd=None) -> tuple[list, dict]:
    """One worker process (`cmd` + the spec as JSON); its results come back as JSON lines, one per event."""
    Path(spec["workdir"]).mkdir(parents=True, exist_ok=True)
    out = Path(spec["workdir"]) / "events.jsonl"
    spec = {**spec, "out": str(out)}
    t0, load0 = time.perf_counter(), _host_load()
    try:
        p = subprocess.run(cmd + [json.dumps(spec)], env=env, cwd=cwd, stdout=sys.stderr, stderr=subprocess.PIPE,
                           text=True, timeout=timeout)
        rc, tail = p.returncode, (p.stderr or "")[-3000:]
        sys.stderr.write(tail)
    except subprocess.TimeoutExpired as e:
        err = e.stderr or ""  # bytes here, even with text=True (what the pipe held when the timeout struck)
        rc, tail = "timeout", (err.decode(errors="replace") if isinstance(err, bytes) else err)[-3000:]
    events = []
    if out.is_file():
        for line in out.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    load = [load0, _host_load()]
    info = {"preset": spec["preset"], "label": spec["label"], "returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
            "host_load_1min": load}
    for e in events:
        if e.get("event") == "start":
            info.update({k: v for k, v in e.items() if k != "event"})
        elif e.get("event") == "model" and e.get("lora_init"):  # saved the initial LoRA weights, or loaded them
            info["lora_init"] = e["lora_init"]
    rows = [{**e["row"], "host_load_1min": load} for e in events if e.get("event") == "row"]
    done = {(r["path"], r["seq_len"], r["batch_size"]) for r in rows}
    for label, _ in spec["runs"]:
        for L, B in spec["shapes"]:
            if (label, L, B) not in done:  # the process died before this shape: say how
                why = _last_error(tail) if rc != 0 else "no result"
                rows.append({"preset": spec["preset"], "path": label, "seq_len": L, "batch_size": B,
                             "status": f"failed: {why}"})
    return rows, info


def _needs_cuda(flag: str) -> None:
    """UserError in one line where this machine has no CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        from ..errors import UserError

        raise UserError(f"{flag} records CUDA allocations: this machine has no CUDA GPU")


def _host_load() -> float | None:
    """The host's 1-minute load average: our path does more host-side work per step than the peer's, so
    other work on the same machine slows it more. Recorded before and after each worker, per row."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - platforms without getloadavg
        return None


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
    from ..fileio import resource

    p = resource("accelerate", name)
    if not p.is_file():
        from ..errors import UserError

        raise UserError(f"qlora_lab/resources/accelerate/{name} not found (an incomplete install?)")
    return p


def _last_error(tail: str) -> str:
    lines = [ln.strip() for ln in (tail or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "Killed" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "crashed"

"""The peer in the bench: another library's QLoRA on our checkpoint, batches and settings, in its own interpreter.

    qlora-lab bench --preset llama2-7b --seq-len 512 2048 --batch-size 8 2 --peer unsloth --peer-python PATH

PATH runs a Python that has the peer installed (assets/bench/README.md: a two-line wrapper that sets
PYTHONPATH). The peer pins other transformers and trl versions than ours, so it is never imported
here: its worker (unsloth_worker.py) runs under PATH by file path, imports nothing from qlora_lab and
gets every number from one JSON argument. Its rows join ours in the same table and JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..errors import UserError
from .flops import row_flops
from .spec import BATCH_SEED, bench_config

PEERS = ("unsloth",)
_WORKERS = {"unsloth": "unsloth_worker.py"}
# Each linear layer of a block, by architecture: what our "all-linear" adapts.
TARGET_MODULES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def worker_script(name: str) -> Path:
    """The peer's worker file, shipped inside the package (found wherever it is installed)."""
    return Path(__file__).with_name(_WORKERS[name])


def env() -> dict:
    """The peer worker's environment: offline, no telemetry, unbuffered, one GPU."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
             HF_HUB_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1")
    e["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    return e


def check(name: str, python) -> dict:
    """What the peer's interpreter has ({"unsloth": version, ...}), or a one-line UserError naming PATH.

    Checked in this order so that each failure is told on any machine: PATH given, a file, executable,
    it runs the worker's probe, the peer is installed there; then this machine has a CUDA GPU.
    """
    if not name:
        raise UserError("--peer-python is the peer's interpreter: give --peer NAME too")
    if name not in PEERS:
        raise UserError(f"--peer {name!r}: expected one of {', '.join(PEERS)}")
    if not python:
        raise UserError(f"--peer {name} needs --peer-python PATH (an interpreter where {name} is installed)")
    p = Path(python)
    if not p.is_file():
        raise UserError(f"--peer-python {python}: no such file")
    if not os.access(p, os.X_OK):
        raise UserError(f"--peer-python {python}: not executable (chmod +x it)")
    try:
        r = subprocess.run([str(p), str(worker_script(name)), "--probe"], env=env(), capture_output=True,
                           text=True, timeout=300)
    except OSError as e:  # e.g. a script without a #! line
        raise UserError(f"--peer-python {python}: cannot run it ({e.strerror or e})") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"--peer-python {python}: no answer from its Python in 300 s") from None
    info = _last_json(r.stdout)
    if r.returncode != 0 or info is None:
        last = ([ln for ln in (r.stderr or "").splitlines() if ln.strip()] or ["no output"])[-1].strip()
        raise UserError(f"--peer-python {python}: its Python failed to run the {name} probe ({last[:200]})")
    missing = [m for m in (name, "torch", "bitsandbytes") if not info.get(m)]
    if missing:
        raise UserError(f"--peer-python {python}: cannot import {', '.join(missing)} there "
                        f"(Python {info.get('python')}; is PYTHONPATH set to the peer's install folder?)")
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"--peer {name} needs a CUDA GPU (none found): the peer trains only there")
    return info


def _last_json(text: str):
    for line in reversed((text or "").splitlines()):
        try:
            out = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(out, dict):
            return out
    return None


def command(job) -> list[str]:
    """PATH (made absolute: the worker runs in its job's folder) and the worker file."""
    return [os.path.abspath(job.peer["python"]), str(worker_script(job.peer["name"]))]


def worker_spec(job, preset: str, steps: int, warmup: int, memory_budget) -> dict:
    """Everything the peer's worker needs, from our resolved config: it imports nothing of ours."""
    from ..presets import model_config

    run_overrides = list(job.runs[0][1])
    cfg = bench_config(preset, job.shapes[0], steps, memory_budget, run_overrides)
    mc = model_config(preset)
    if mc.model_type not in TARGET_MODULES:
        raise UserError(f"--peer {job.peer['name']}: no target module names for {mc.model_type} models")
    t = cfg.train
    return {"path": job.path, "label": job.label, "preset": preset, "model_path": checkpoint(preset),
            "vocab_size": mc.vocab_size, "shapes": [[s.seq_len, s.batch_size] for s in job.shapes],
            "steps": steps, "warmup": warmup, "memory_budget": memory_budget, "seed": t.seed,
            "batch_seed": BATCH_SEED, "gradient_checkpointing": job.peer["gradient_checkpointing"],
            "lora": {"r": cfg.lora.r, "alpha": cfg.lora.lora_alpha, "dropout": cfg.lora.lora_dropout,
                     "target_modules": TARGET_MODULES[mc.model_type]},
            # The Trainer's AdamW betas and epsilon (our config leaves them at its defaults).
            "optimizer": {"name": t.optim, "learning_rate": t.learning_rate, "weight_decay": t.weight_decay,
                          "betas": [0.9, 0.999], "eps": 1e-8, "max_grad_norm": t.max_grad_norm},
            "runs": [[job.label, run_overrides]]}


def checkpoint(preset: str) -> str:
    """The random-weight checkpoint folder our rows load (presets.cached_model), written if absent.

    Asked of a child process: writing a 7B checkpoint puts it on the GPU, which this parent keeps free.
    """
    code = "import sys; from qlora_lab.presets import cached_model; print(cached_model(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", code, preset], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"writing the {preset} checkpoint failed: {(r.stderr or '').strip()[-300:]}")
    return r.stdout.strip().splitlines()[-1]


def complete_rows(rows: list, preset: str) -> list:
    """Add the model-derived keys to a peer's measured rows: FLOPs per token, counted as ours are."""
    from ..presets import model_config

    mc = model_config(preset)
    for r in rows:
        if r.get("status") == "ok" and "flops_per_token" not in r:
            recomputed = mc.num_hidden_layers if r.get("gradient_checkpointing") else 0
            r.update(row_flops(mc, r["seq_len"], r["lora_r"], recomputed))
    return rows

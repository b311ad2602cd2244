"""The run folder: what a training run writes, atomically, and how it is read back and resumed.

    runs/<run_name>/
      config.yaml          resolved config
      plan.json            hardware choices and why (dtype, checkpointing, kernels, batch)
      metrics.jsonl        one JSON object per logged step: step, loss, learning_rate, tokens, epoch
                           (eval rows: step, tokens, eval_loss); each step exactly once
      model_summary.json   quantization check, parameter counts, bytes of base weights
      env.json             library versions, device, CUDA
      train_summary.json   method, status, runtime, tokens/s, peak memory, final losses
      status.json          running | completed | interrupted | failed: <why>
      adapter/             LoRA adapter (safetensors), loadable with peft.PeftModel.from_pretrained
      checkpoints/         checkpoint-N: adapter + optimizer + scheduler + RNG state, for --resume

Everything but metrics.jsonl is written to a temp file and renamed, so a crash never leaves a
half-written file; metrics.jsonl is appended line by line (flushed and fsynced) and, on resume,
cut back to the checkpoint's step so no step appears twice.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import UserError
from .fileio import atomic_write

STATE_FILE = "qlora_lab_state.json"  # written last into a checkpoint: marks it complete


def _clean(obj):
    """JSON-safe: NaN/Inf become None (metrics.jsonl stays strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def atomic_write_json(path, obj) -> None:
    atomic_write(path, json.dumps(_clean(obj), indent=2, default=str) + "\n")


class RunFolder:
    """A run's folder. In a data-parallel run every process holds one, but only rank 0 writes."""

    def __init__(self, path):
        self.path = Path(path)
        self.writer = int(os.environ.get("RANK", 0)) == 0

    # -- layout
    config_file = property(lambda self: self.path / "config.yaml")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    adapter_dir = property(lambda self: self.path / "adapter")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")

    @classmethod
    def open(cls, path) -> "RunFolder":
        """An existing run folder, or a UserError saying why the path is not one."""
        p = Path(path)
        if not p.is_dir():
            raise UserError(f"{p}: run folder not found")
        if not (p / "config.yaml").is_file():
            raise UserError(f"{p}: not a run folder (no config.yaml)")
        return cls(p)

    def config(self):
        from .config import load_config

        return load_config(self.config_file)

    def read_json(self, name: str) -> dict | None:
        p = self.path / name
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{p}: unreadable JSON ({e})") from None

    def write_json(self, name: str, obj) -> None:
        if not self.writer:
            return
        atomic_write_json(self.path / name, obj)

    def set_status(self, status: str, **extra) -> None:
        self.write_json("status.json", {"status": status, **extra})

    def status(self) -> str | None:
        s = self.read_json("status.json")
        return s and s.get("status")

    # -- metrics
    def append_metric(self, row: dict) -> None:
        if not self.writer:
            return
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict]:
        """Logged rows; a last line cut short by a crash is ignored."""
        if not self.metrics_file.is_file():
            return []
        rows = []
        for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def truncate_metrics(self, last_step: int) -> None:
        """Keep rows up to the checkpoint's step (what a resumed run will log again is dropped)."""
        if not self.writer:
            return
        kept = [r for r in self.metrics() if r.get("step", 0) <= last_step]
        atomic_write(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept))

    # -- checkpoints
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a checkpoint is complete once STATE_FILE is in it)."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for d in self.checkpoints_dir.iterdir():
            m = re.fullmatch(r"checkpoint-(\d+)", d.name)
            if m and (d / STATE_FILE).is_file() and (d / "trainer_state.json").is_file():
                found.append((int(m.group(1)), d))
        return [d for _, d in sorted(found)]

    def last_checkpoint(self) -> Path | None:
        c = self.checkpoints()
        return c[-1] if c else None

    def save_adapter(self, model, state_dict: dict | None = None) -> None:
        """Write the adapter to a temp folder, then swap it in: a failed save keeps the old one.

        state_dict: the model's full state dict when the model itself holds only shards (FSDP);
        peft keeps its adapter's entries.
        """
        if not self.writer:
            return
        tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=self.path))
        try:
            extra = {} if state_dict is None else {"state_dict": state_dict}
            model.save_pretrained(str(tmp), safe_serialization=True, **extra)
            old = self.path / ".adapter.old"
            if self.adapter_dir.exists():
                os.replace(self.adapter_dir, old)
            os.replace(tmp, self.adapter_dir)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def env_info() -> dict:
    """Library versions and device: what a reader needs to reproduce a number. No env variables."""
    import importlib.metadata as md
    import platform

    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count()}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "trl",
                "wandb", "liger-kernel", "triton", "qlora-lab"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    else:
        info["device"] = "cpu"
        info["cuda_version"] = None
    return info

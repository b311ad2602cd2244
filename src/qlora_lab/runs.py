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
      checkpoints/         checkpoint-N: adapter + optimizer + scheduler + RNG state, for --resume;
                           qlora_lab_state.json is written last (a folder without it is unfinished).
                           damaged-checkpoint-N: one that --resume passed over, kept to look at

Everything but metrics.jsonl is written to a temp file and renamed, so a crash never leaves a
half-written file; metrics.jsonl is appended line by line (flushed every line, so a crashed process loses
none; fsynced before a checkpoint is marked whole and at every status change, not every step: an fsync can
take milliseconds, and the GPU waits for the host between steps) and, on resume, cut back to the
checkpoint's step so no step appears twice.

Read back, every file may still be damaged (a disk that filled, a copy cut short, a hand edit): each
reader names the file and what is wrong in one line, and --resume takes the newest checkpoint that is
whole (`check_checkpoint`), saying which newer ones it passed over and why.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .distributed import is_main_process
from .errors import DamagedFileError, UserError
from .fileio import _umask, atomic_write, check_adapter, load_torch_file, read_json, read_text

STATE_FILE = "qlora_lab_state.json"  # written last into a checkpoint: marks it complete
# What sits in a run folder, by kind: a file of one of these names that is a folder (or the reverse)
# is refused before a run writes there.
RUN_FILES = ("config.yaml", "plan.json", "metrics.jsonl", "model_summary.json", "env.json",
             "train_summary.json", "status.json", "data_stats.json", "train.log")
RUN_FOLDERS = ("adapter", "checkpoints")


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
        self.name = self.path.resolve().name  # how tables label the run (report.read_runs tells twins apart)
        self.writer = is_main_process()

    # -- layout
    config_file = property(lambda self: self.path / "config.yaml")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    adapter_dir = property(lambda self: self.path / "adapter")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")

    @classmethod
    def open(cls, path) -> "RunFolder":
        """An existing run folder, or a UserError saying why the path is not one."""
        p = Path(path)
        if not p.exists():
            raise UserError(f"{p}: run folder not found")
        if not p.is_dir():
            raise UserError(f"{p}: is a file, not a run folder")
        config = p / "config.yaml"
        if config.is_dir():
            raise DamagedFileError(f"{config}: is a folder; expected a file")
        if not config.is_file():
            if any((p / n).exists() for n in ("metrics.jsonl", *RUN_FOLDERS)):
                raise DamagedFileError(f"{config}: missing (the rest of a run folder is here)")
            raise UserError(f"{p}: not a run folder (no config.yaml)")
        return cls(p)

    def check_layout(self) -> None:
        """Refuse a folder where the run writes a file, or a file where it writes a folder."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path}: is a file; a run folder goes here")
        for name in RUN_FILES:
            if (self.path / name).is_dir():
                raise UserError(f"{self.path / name}: is a folder; the run writes a file here")
        for name in RUN_FOLDERS:
            if (self.path / name).exists() and not (self.path / name).is_dir():
                raise UserError(f"{self.path / name}: is a file; the run writes a folder here")

    def config_dict(self) -> dict:
        """config.yaml as written (plain data, read whatever this version's schema says).

        It was written whole, every section in it: a missing section means the file was cut."""
        import yaml

        from .config import SECTIONS

        p = self.config_file
        text = read_text(p)
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise DamagedFileError(f"{p}{line}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(raw, dict):
            raise DamagedFileError(f"{p}: expected a mapping of config sections, got {type(raw).__name__}")
        missing = [s for s in SECTIONS if not isinstance(raw.get(s), dict)]
        if missing:
            raise DamagedFileError(f"{p}: no {', '.join(missing)} section (a run's config.yaml holds every "
                                   f"section: cut short?)")
        return raw

    def config(self):
        from .config import load_config

        self.config_dict()  # a damaged file is named as such, not as a config mistake
        return load_config(self.config_file)

    # -- read back once, for tables and studies (a finished run: these files no longer change)
    @functools.cached_property
    def config_data(self) -> dict:
        return self.config_dict()

    @functools.cached_property
    def train_summary(self) -> dict:
        return self.read_json("train_summary.json") or {}

    @functools.cached_property
    def model_summary(self) -> dict:
        return self.read_json("model_summary.json") or {}

    @functools.cached_property
    def env(self) -> dict:
        return self.read_json("env.json") or {}

    @property
    def method(self) -> str:
        """qlora or lora, from config.yaml (as Config.method says; train_summary.json repeats it)."""
        return "qlora" if (self.config_data.get("quant") or {}).get("bits") == 4 else "lora"

    def read_json(self, name: str) -> dict | None:
        """A JSON object the run wrote; None if the file is not there (not written yet)."""
        return read_json(self.path / name, required=False)

    def write_json(self, name: str, obj) -> None:
        if not self.writer:
            return
        atomic_write_json(self.path / name, obj)

    def set_status(self, status: str, **extra) -> None:
        self.sync_metrics()  # what the status reports on is on disk before the status is
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

    def sync_metrics(self) -> None:
        """metrics.jsonl on disk (fsync): before a checkpoint that expects its rows is marked whole."""
        if not self.writer or not self.metrics_file.is_file():
            return
        with open(self.metrics_file, "ab") as f:
            os.fsync(f.fileno())

    def metrics(self) -> list[dict]:
        """Logged rows. A last line cut short by a crash (no newline after it) is left out; any
        other bad line is a DamagedFileError naming file:line."""
        p = self.metrics_file
        if not p.exists():
            return []
        if p.is_dir():
            raise DamagedFileError(f"{p}: is a folder; expected a file")
        lines = p.read_bytes().split(b"\n")  # the last item: b"" or a line cut short
        rows = []
        for i, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                if i == len(lines):
                    break
                raise DamagedFileError(f"{p}:{i}: not a JSON row: garbled") from None
            step = row.get("step") if isinstance(row, dict) else None
            if not isinstance(step, int) or isinstance(step, bool):
                raise DamagedFileError(f"{p}:{i}: expected a JSON object with an integer step")
            rows.append(row)
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

    def resume_point(self) -> "ResumePoint":
        """The newest whole checkpoint (`check_checkpoint`), and why newer ones were passed over.

        UserError if none is whole (naming the newest and what is wrong with it), or if metrics.jsonl
        lacks rows the checkpoint logged (the resumed curve would have a hole)."""
        found = []
        if self.checkpoints_dir.is_dir():
            for d in self.checkpoints_dir.iterdir():
                m = re.fullmatch(r"checkpoint-(\d+)", d.name)
                if m and d.is_dir():
                    found.append((int(m.group(1)), d))
        if not found:
            raise UserError(f"{self.path}: --resume found no checkpoint under {self.checkpoints_dir}")
        skipped = []
        for step, d in sorted(found, reverse=True):
            try:
                state, logged = check_checkpoint(d)
            except DamagedFileError as e:
                skipped.append((d, str(e)))
                continue
            self._check_metrics_hold(logged, d)
            return ResumePoint(d, step, int(state.get("tokens", 0)), skipped)
        raise UserError(f"{self.path}: no whole checkpoint to resume from ({len(found)} damaged or unfinished); "
                        f"the newest: {skipped[0][1]}")

    def _check_metrics_hold(self, logged: set, checkpoint: Path) -> None:
        have = {(r["step"], k) for r in self.metrics() for k in ("loss", "eval_loss") if k in r}
        lost = sorted({step for step, k in logged - have})
        if lost:
            steps = ", ".join(map(str, lost[:5])) + (", ..." if len(lost) > 5 else "")
            raise DamagedFileError(
                f"{self.metrics_file}: no row for step{'s' if len(lost) > 1 else ''} {steps} logged before "
                f"{checkpoint.name} (the file was cut short or replaced); restore it, or start a new run")

    def set_aside(self, checkpoint: Path) -> Path:
        """Rename a checkpoint --resume passed over to damaged-checkpoint-N: kept to look at, and the
        resumed run saves a fresh checkpoint-N instead of writing into the damaged one."""
        dst = checkpoint.with_name(f"damaged-{checkpoint.name}")
        n = 1
        while dst.exists():
            n += 1
            dst = checkpoint.with_name(f"damaged-{checkpoint.name}.{n}")
        os.replace(checkpoint, dst)
        return dst

    def save_adapter(self, model, state_dict: dict | None = None) -> None:
        """Write the adapter to a temp folder, then swap it in: a failed save keeps the old one.

        state_dict: the model's full state dict when the model itself holds only shards (FSDP):
        its LoRA entries are written (distributed.write_adapter).
        """
        if not self.writer:
            return
        tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=self.path))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; the adapter is the user's to share
        try:
            if state_dict is None:
                model.save_pretrained(str(tmp), safe_serialization=True)
            else:
                from .distributed import write_adapter

                write_adapter(model, state_dict, tmp)
            old = self.path / ".adapter.old"
            if self.adapter_dir.exists():
                os.replace(self.adapter_dir, old)
            os.replace(tmp, self.adapter_dir)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class ResumePoint:
    checkpoint: Path
    step: int
    tokens: int                    # trained tokens at the checkpoint (all processes)
    # newer checkpoints passed over, newest first: (folder, "file: what is wrong")
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def check_checkpoint(d: Path) -> tuple[dict, set]:
    """(qlora_lab state, logged (step, key) pairs) of a whole checkpoint, else a DamagedFileError
    naming the first file that is not whole.

    Whole: every file the Trainer reads on resume is there and reads. The Trainer itself goes on
    without a missing optimizer, scheduler or RNG file (a fresh optimizer, a new random stream), and
    the resumed curve would no longer be the one the run was on. Pickle adapters are refused."""
    step = int(d.name.rsplit("-", 1)[1])
    if not (d / STATE_FILE).exists():
        raise DamagedFileError(f"{d / STATE_FILE}: missing: the save did not finish")
    state = read_json(d / STATE_FILE)
    if state.get("step") != step or not isinstance(state.get("tokens", 0), int):
        raise DamagedFileError(f"{d / STATE_FILE}: expected step {step} and a token count, "
                               f"got {json.dumps(state)[:80]}")
    trainer_state = read_json(d / "trainer_state.json")
    if trainer_state.get("global_step") != step or not isinstance(trainer_state.get("log_history", []), list):
        raise DamagedFileError(f"{d / 'trainer_state.json'}: expected global_step {step} and a log_history list")
    check_adapter(d)
    optimizer = d / "optimizer.pt"
    if not optimizer.exists() and (d / "optimizer.bin").exists():  # FSDP (accelerate) names it so
        optimizer = d / "optimizer.bin"
    opt = load_torch_file(optimizer)
    if not (isinstance(opt, dict) and "state" in opt and "param_groups" in opt):
        raise DamagedFileError(f"{optimizer}: not an optimizer state (no state / param_groups)")
    if not isinstance(load_torch_file(d / "scheduler.pt"), dict):
        raise DamagedFileError(f"{d / 'scheduler.pt'}: not a scheduler state")
    rng_files = sorted(d.glob("rng_state_*.pth")) or [d / "rng_state.pth"]  # one per process, or one
    for p in rng_files:
        rng = load_torch_file(p)
        if not (isinstance(rng, dict) and {"python", "numpy", "cpu"} <= rng.keys()):
            raise DamagedFileError(f"{p}: not an RNG state (no python / numpy / cpu)")
    if (d / "scaler.pt").exists():  # fp16 only
        load_torch_file(d / "scaler.pt")
    logged = {(e["step"], k) for e in trainer_state.get("log_history", []) if isinstance(e, dict)
              for k in ("loss", "eval_loss") if k in e and isinstance(e.get("step"), int)}
    return state, logged


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

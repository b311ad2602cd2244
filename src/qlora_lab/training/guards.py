"""What stops a run cleanly and what a failed run leaves behind.

A signal stops after a checkpoint; bad input refused before training leaves the run folder as it was;
a failure during training (out of memory, an unsafe checkpoint, a full disk) is one line and status.json.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from ..distributed import is_main_process
from ..errors import UserError, is_out_of_memory
from ..runs import RunFolder
from .callbacks import close_progress_bars

log = logging.getLogger("qlora_lab.train")  # the name train.log lines carry


class Interrupted(UserError):
    exit_code = 130


class GracefulStop:
    """SIGTERM / SIGINT: finish the current step, save a checkpoint, stop."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("signal %d: saving a checkpoint after this step, then stopping", signum)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def snapshot(path: Path) -> dict | None:
    """Bytes of the run folder's top-level files (small: configs, JSON, the log); None if no folder."""
    if not path.is_dir():
        return None
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in path.iterdir()
            if p.is_file() and p.name != "metrics.jsonl"}


def settle_failed_run(run: RunFolder, before: dict | None, started: bool, exc: BaseException) -> None:
    """A run that fails records why in status.json; but bad input refused before training starts
    (a missing data file on --resume, ...) leaves an existing run folder exactly as `before` found it."""
    if not is_main_process():
        return
    if before is None or started or not isinstance(exc, UserError):
        if run.status() == "running":  # else Recipe.train already said how it ended
            why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed: {type(exc).__name__}"
            run.set_status(why, error=str(exc).splitlines()[0] if str(exc) else None)
        return
    for p in run.path.iterdir():
        if p.is_file() and p.name != "metrics.jsonl" and p.name not in before:
            p.unlink()
    for name, (data, mtime) in before.items():
        p = run.path / name
        if not p.is_file() or p.read_bytes() != data:
            p.write_bytes(data)
            os.utime(p, ns=(mtime, mtime))


def record_failure(trainer, run: RunFolder, e: Exception) -> None:
    """status.json says why training failed; known causes (memory, checkpoint, disk) become one-line UserErrors."""
    close_progress_bars(trainer)  # else the one-line error is glued to the half-drawn bar
    if is_out_of_memory(e):
        run.set_status("failed: out of memory", step=trainer.state.global_step)
        raise UserError(
            f"out of GPU memory at step {trainer.state.global_step}: lower train.per_device_train_batch_size "
            f"(raise gradient_accumulation_steps to keep the global batch), lower data.max_length, set "
            f"train.gradient_checkpointing=true, or raise train.memory_budget_gib if the GPU has more") from None
    if type(e).__name__ == "UnpicklingError":  # torch.load(weights_only=True) met more than tensors
        run.set_status("failed: unsafe checkpoint", step=trainer.state.global_step)
        raise UserError(f"{run.last_checkpoint()}: a checkpoint file holds objects other than tensors; "
                        f"refused (not unpickled): {str(e).strip().splitlines()[0]}") from None
    if isinstance(e, OSError) and e.errno is not None:  # disk full, read-only, quota: not a bug
        try:
            run.set_status(f"failed: {e.strerror}", step=trainer.state.global_step)
        except OSError:  # the disk that just failed may refuse this too
            pass
        raise UserError(f"{e.filename or run.path}: could not write at step {trainer.state.global_step}: "
                        f"{e.strerror}; last complete checkpoint: {run.last_checkpoint()}") from None
    run.set_status(f"failed: {type(e).__name__}", step=trainer.state.global_step)


def check_saved_adapter(run: RunFolder) -> None:
    """The written adapter holds A and B of every LoRA module (a gather that lost names would save none)."""
    if not run.writer:
        return
    from safetensors import safe_open

    modules = (run.read_json("model_summary.json") or {}).get("n_lora_modules")
    with safe_open(str(run.adapter_dir / "adapter_model.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if ".lora_A." in k or ".lora_B." in k]
    if modules and len(keys) != 2 * modules:
        run.set_status("failed: adapter saved incomplete")
        raise UserError(f"{run.adapter_dir}: saved {len(keys)} LoRA tensors, expected {2 * modules} (A and B of "
                        f"{modules} modules); the checkpoints under {run.checkpoints_dir} are kept")

"""Faults a long run meets on a rented GPU, each injected into the real CLI on a tiny model (CPU).

A run may lose the steps since its last checkpoint, never the run, and never ends silently wrong:

    1. SIGKILL after a checkpoint   -> --resume gives the uninterrupted run's losses and adapter (1e-6)
    2. SIGTERM / SIGINT             -> checkpoint, status `interrupted`, exit 130; --resume continues
    3. NaN loss                     -> stop within one logging interval, naming the step; no poisoned
                                       checkpoint; status `failed: non-finite loss`
    4. out of memory at step 1      -> one line naming the knobs, no CUDA trace
    5. disk full while checkpointing-> the previous checkpoint stays complete and resumable
    6. a linear layer left 16-bit   -> refused, status recorded

Signals and SIGKILL hit the real console entry in a child process; the other faults are injected by
patching torch / the trainer around `qlora_lab.cli.main` in this process (imports and warm-up, most
of a tiny run's cost, are then paid once).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_lab.runs import STATE_FILE, RunFolder

from .conftest import CONFIGS, ROOT

TINY = CONFIGS / "tiny_llama_qlora.yaml"
# 8 steps, checkpoints at 3 and 6, eval at 4 and 8: small, but every code path of a long run.
STEPS = 8
SETS = ["--set", f"train.max_steps={STEPS}", "--set", "train.save_steps=3", "--set", "train.eval_steps=4",
        "--set", "train.save_total_limit=null", "--set", "data.max_length=96"]
TOL = 1e-6


def _main(capsys, out, *extra, config=TINY) -> tuple[int, str]:
    """The CLI's main() in this process (imports and warm-up paid once): (exit code, stderr)."""
    from qlora_lab.cli import main

    capsys.readouterr()
    rc = main(["train", str(config), "--output-dir", str(out), *SETS, *map(str, extra)])
    return rc, capsys.readouterr().err


def _start(out, *extra):
    """The real console entry in a child process, for faults that need one (signals, SIGKILL)."""
    args = ["train", TINY, "--output-dir", out, *SETS, *extra]
    return subprocess.Popen([sys.executable, "-m", "qlora_lab.cli", *map(str, args)], cwd=ROOT,
                            env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _at_step(monkeypatch, step: int, fault):
    """Run fault(trainer, loss) -> loss inside the forward pass of optimizer step `step`."""
    import qlora_lab.training.trainer as T

    orig = T.Trainer.compute_loss

    def compute_loss(self, model, inputs, *a, **k):
        loss = orig(self, model, inputs, *a, **k)
        if model.training and self.state.global_step + 1 == step:
            loss = fault(self, loss)
        return loss

    monkeypatch.setattr(T.Trainer, "compute_loss", compute_loss)


def _wait_for(proc, cond, timeout=240):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training ended (rc {proc.returncode}) before the fault could be injected:\n{err[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("timed out waiting to inject the fault")


def _train_steps(run: RunFolder) -> list[int]:
    return [r["step"] for r in run.metrics() if "loss" in r]


def _strict_rows(run: RunFolder) -> list[dict]:
    """Every line of metrics.jsonl, parsed strictly (a truncated line fails here)."""
    text = run.metrics_file.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _adapter(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "adapter_model.safetensors"))


def _assert_same_run(run: RunFolder, base: RunFolder):
    rows, base_rows = _strict_rows(run), _strict_rows(base)
    keys = lambda rs: [(r["step"], "eval_loss" in r) for r in rs]  # noqa: E731
    assert keys(rows) == keys(base_rows), "each step logged exactly once, in order"
    for r, b in zip(rows, base_rows):
        assert set(r) == set(b)
        for k in ("loss", "eval_loss", "grad_norm", "learning_rate"):
            if k in b:
                assert abs(r[k] - b[k]) <= TOL, (r["step"], k, r[k], b[k])
        assert r["tokens"] == b["tokens"]
    a, ab = _adapter(run.adapter_dir), _adapter(base.adapter_dir)
    assert a.keys() == ab.keys() and a
    for k in a:
        assert (a[k] - ab[k]).abs().max().item() <= TOL, k
    assert run.status() == "completed"


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("qlora-lab: error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> RunFolder:
    from qlora_lab.cli import main

    out = tmp_path_factory.mktemp("baseline") / "run"
    assert main(["train", str(TINY), "--output-dir", str(out), *SETS]) == 0
    run = RunFolder(out)
    assert _train_steps(run) == list(range(1, STEPS + 1))
    return run


# ----------------------------------------------------------------------------- 1. SIGKILL

def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted(baseline, tmp_path, capsys):
    out = tmp_path / "run"
    run = RunFolder(out)
    proc = _start(out)
    # Past checkpoint-3, mid-run: the steps after it are lost and must be redone identically.
    _wait_for(proc, lambda: run.last_checkpoint() is not None and max(_train_steps(run), default=0) >= 4)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert run.last_checkpoint().name == "checkpoint-3"
    assert run.status() == "running"  # what a killed run leaves; --resume must not mind
    # A kill during a write can leave half a line; resume must not keep it.
    with open(run.metrics_file, "a", encoding="utf-8") as f:
        f.write('{"step": 5, "epoch": 1.0, "lo')

    rc, err = _main(capsys, out, "--resume")
    assert rc == 0, err[-3000:]
    _assert_same_run(run, baseline)


# ----------------------------------------------------------------------------- 2. SIGTERM / Ctrl-C

def _assert_interrupted(run: RunFolder, sig, err: str, after: int) -> int:
    line = _one_error_line(err)
    assert "interrupted by signal" in line and "--resume" in line
    status = run.read_json("status.json")
    assert status["status"] == "interrupted" and status["signal"] == sig
    # The checkpoint is of the step the signal interrupted, complete, and what resume will use.
    ckpt = run.last_checkpoint()
    assert ckpt is not None and int(ckpt.name.split("-")[1]) == status["step"] > after
    assert json.loads((ckpt / STATE_FILE).read_text())["step"] == status["step"]
    assert not run.adapter_dir.exists()  # no final adapter from a stopped run
    return status["step"]


def test_sigterm_then_ctrl_c_checkpoint_status_and_resume(baseline, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    run = RunFolder(out)
    # SIGTERM from outside, as a scheduler sends it, at whatever point of step 2 it lands.
    proc = _start(out)
    _wait_for(proc, lambda: max(_train_steps(run), default=0) >= 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    step = _assert_interrupted(run, signal.SIGTERM, err, 0)

    # Ctrl-C in the middle of step 5 of the resumed run.
    def ctrl_c(trainer, loss):
        os.kill(os.getpid(), signal.SIGINT)
        return loss

    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as m:
        _at_step(m, 5, ctrl_c)
        rc, err = _main(capsys, out, "--resume")
    assert rc == 130
    assert _assert_interrupted(run, signal.SIGINT, err, step) == 5
    assert signal.getsignal(signal.SIGINT) is handler  # restored after the run

    rc, err = _main(capsys, out, "--resume")
    assert rc == 0, err[-3000:]
    _assert_same_run(run, baseline)


# ----------------------------------------------------------------------------- 3. NaN loss

def test_nan_loss_stops_names_the_step_and_keeps_no_poisoned_checkpoint(tmp_path, capsys, monkeypatch):
    # Logged every 4 steps, saved every 3: the NaN of step 5 must not reach checkpoint-6, which
    # the trainer would save before the step-8 log shows the NaN.
    out = tmp_path / "run"
    _at_step(monkeypatch, 5, lambda trainer, loss: loss * float("nan"))
    rc, err = _main(capsys, out, "--set", "train.max_steps=10", "--set", "train.logging_steps=4",
                    "--set", "train.eval_steps=null")
    assert rc == 2, err[-3000:]
    line = _one_error_line(err)
    run = RunFolder(out)
    status = run.read_json("status.json")
    assert status["status"] == "failed: non-finite loss"
    assert 5 <= status["step"] <= 8  # within one logging interval
    assert f"step {status['step']}" in line and "non-finite loss" in line
    assert [c.name for c in run.checkpoints()] == ["checkpoint-3"]
    assert not (out / "checkpoints" / "checkpoint-6").exists()
    assert "checkpoint-3" in line  # where to resume from
    for c in run.checkpoints():  # the last good checkpoint: finite
        assert all(t.isfinite().all() for t in _adapter(c).values())
    assert not run.adapter_dir.exists()
    assert run.read_json("train_summary.json") is None
    rows = _strict_rows(run)
    assert rows[-1]["step"] == status["step"] and rows[-1]["loss"] is None  # NaN logged as null


def test_inf_gradient_is_recorded_as_non_finite_adapter_weights_not_as_a_loss(tmp_path, capsys, monkeypatch):
    # The loss of step 3 is finite, its gradient is not: the optimizer step leaves NaN adapters, found
    # before checkpoint-3 is written; status says what failed, not "non-finite loss".
    import torch

    def inf_gradient(trainer, loss):
        p = next(p for p in trainer.model.parameters() if p.requires_grad)
        p.register_hook(lambda g: torch.full_like(g, float("inf")))
        return loss

    out = tmp_path / "run"
    _at_step(monkeypatch, 3, inf_gradient)
    rc, err = _main(capsys, out, "--set", "train.max_steps=6", "--set", "train.eval_steps=null")
    assert rc == 2, err[-3000:]
    line = _one_error_line(err)
    status = RunFolder(out).read_json("status.json")
    assert status["status"] == "failed: non-finite adapter weights" and status["step"] == 3
    assert "non-finite adapter weights" in line and "non-finite loss" not in line
    assert RunFolder(out).checkpoints() == []


# ----------------------------------------------------------------------------- 4. out of memory

def test_oom_at_first_step_names_the_knobs(tmp_path, capsys, monkeypatch):
    import torch

    def oom(trainer, loss):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                     "capacity of 15.77 GiB of which 1.2 GiB is free.")

    _at_step(monkeypatch, 1, oom)
    out = tmp_path / "run"
    rc, err = _main(capsys, out)
    assert rc == 2
    line = _one_error_line(err)
    assert "out of GPU memory at step 0" in line and "Tried to allocate" not in line
    for knob in ("per_device_train_batch_size", "max_length", "gradient_checkpointing", "memory_budget_gib"):
        assert knob in line
    assert RunFolder(out).status() == "failed: out of memory"


def test_oom_in_the_final_evaluation_keeps_the_trained_adapter(tmp_path, capsys, monkeypatch):
    import torch

    import qlora_lab.training.trainer as T

    orig = T.Trainer.compute_loss

    def compute_loss(self, model, inputs, *a, **k):
        if not model.training and self.state.global_step == 4:  # the evaluation after the last step
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return orig(self, model, inputs, *a, **k)

    monkeypatch.setattr(T.Trainer, "compute_loss", compute_loss)
    out = tmp_path / "run"
    rc, err = _main(capsys, out, "--set", "train.max_steps=4", "--set", "train.eval_steps=3")
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err and "out of GPU memory evaluating at step 4: evaluation skipped" in err
    run = RunFolder(out)
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()
    s = run.read_json("train_summary.json")
    assert s["steps"] == 4 and s["final_eval_loss"] is None and "out of GPU memory" in s["final_eval_error"]
    assert run.status() == "completed"
    assert [r["step"] for r in run.metrics() if "eval_loss" in r] == [3]  # the step-3 evaluation ran


# ----------------------------------------------------------------------------- 5. write failure

def test_disk_full_while_checkpointing_keeps_previous_checkpoint(baseline, tmp_path, capsys, monkeypatch):
    import torch

    out = tmp_path / "run"
    orig_save = torch.save

    def save(obj, f, *a, **k):  # the disk fills while checkpoint-6 writes its optimizer state
        if isinstance(f, (str, os.PathLike)) and "checkpoint-6" in str(f):
            Path(f).write_bytes(b"\x80\x04partial")
            raise OSError(28, "No space left on device", str(f))
        return orig_save(obj, f, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", save)
        rc, err = _main(capsys, out)
    assert rc == 2
    line = _one_error_line(err)
    assert "No space left on device" in line and "checkpoint-3" in line
    run = RunFolder(out)
    assert run.status() == "failed: No space left on device"
    assert (out / "checkpoints" / "checkpoint-6").is_dir()  # the half-written one ...
    assert [c.name for c in run.checkpoints()] == ["checkpoint-3"]  # ... is not offered for resume
    # The previous checkpoint is intact: resuming from it reproduces the uninterrupted run.
    rc, err = _main(capsys, out, "--resume")
    assert rc == 0, err[-3000:]
    _assert_same_run(run, baseline)


def test_failed_adapter_save_keeps_the_previous_adapter(tmp_path):
    run = RunFolder(tmp_path)
    run.adapter_dir.mkdir()
    (run.adapter_dir / "adapter_model.safetensors").write_bytes(b"old")

    class Full:
        def save_pretrained(self, d, safe_serialization):
            assert safe_serialization
            (Path(d) / "adapter_model.safetensors").write_bytes(b"ne")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        run.save_adapter(Full())
    assert (run.adapter_dir / "adapter_model.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folder left


def test_failed_json_write_keeps_the_previous_file(tmp_path, monkeypatch):
    run = RunFolder(tmp_path)
    run.set_status("running")

    def fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        run.set_status("completed")
    monkeypatch.undo()
    assert run.status() == "running"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


# ----------------------------------------------------------------------------- 6. quantization skipped

def test_linear_layer_left_16bit_is_refused_end_to_end(tmp_path, capsys, monkeypatch):
    import qlora_lab.quant as Q

    # FalconLinear, an nn.Linear subclass, is what transformers' 4-bit loader skips; take away
    # both the load-time alias and the in-place fallback.
    monkeypatch.setattr(Q, "_LINEAR_ALIASES", {})
    monkeypatch.setattr(Q, "quantize_in_place", lambda *a, **k: None)
    out = tmp_path / "run"
    rc, err = _main(capsys, out, config=CONFIGS / "tiny_falcon_qlora.yaml")
    assert rc == 2
    line = _one_error_line(err)
    assert "still 16-bit" in line and "QLoRA" in line
    run = RunFolder(out)
    assert run.status() == "failed: QuantizationError"
    assert not run.metrics_file.exists() and not run.checkpoints()


# ----------------------------------------------------------------------------- run folder units

def test_metrics_rows_reach_the_file_at_once_and_the_disk_at_status_changes(tmp_path, monkeypatch):
    """A row is in metrics.jsonl as soon as it is appended (a crashed process loses none), but only a status
    change or a checkpoint (RunCallback.on_save) fsyncs it: not every step, where the GPU waits on the host."""
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run = RunFolder(tmp_path)
    for step in range(1, 4):
        run.append_metric({"step": step, "loss": 1.0 / step})
    assert [r["step"] for r in run.metrics()] == [1, 2, 3] and synced == []
    run.set_status("completed", step=3)
    assert synced[0] == "metrics.jsonl" and run.status() == "completed"

def test_truncate_metrics_drops_redone_steps_and_a_cut_line(tmp_path):
    run = RunFolder(tmp_path)
    for s in (1, 2, 3):
        run.append_metric({"step": s, "loss": 1.0 / s})
    run.append_metric({"step": 3, "eval_loss": 0.5})
    run.append_metric({"step": 4, "loss": float("nan")})
    with open(run.metrics_file, "a") as f:
        f.write('{"step": 5, "lo')
    assert [r["step"] for r in run.metrics()] == [1, 2, 3, 3, 4]
    assert run.metrics()[-1]["loss"] is None  # strict JSON: NaN is written as null
    run.truncate_metrics(3)
    assert [json.loads(x)["step"] for x in run.metrics_file.read_text().splitlines()] == [1, 2, 3, 3]


def test_incomplete_checkpoints_are_not_offered(tmp_path):
    run = RunFolder(tmp_path)
    for step, complete in ((2, True), (4, True), (6, False)):
        d = run.checkpoints_dir / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text("{}")
        if complete:
            (d / STATE_FILE).write_text(json.dumps({"step": step}))
    (run.checkpoints_dir / "checkpoint-x").mkdir()
    assert [c.name for c in run.checkpoints()] == ["checkpoint-2", "checkpoint-4"]
    assert run.last_checkpoint().name == "checkpoint-4"


def test_metrics_rows_are_strict_json(tmp_path):
    run = RunFolder(tmp_path)
    run.append_metric({"step": 1, "loss": float("inf"), "grad_norm": float("-inf")})
    row = json.loads(run.metrics_file.read_text())
    assert row == {"step": 1, "loss": None, "grad_norm": None}
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in row.values() if v is not None)

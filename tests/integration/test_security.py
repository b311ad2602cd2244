"""Security: no pickle is ever unpickled from an adapter or a checkpoint, remote code is off by
default, and secrets in the environment (WANDB_API_KEY, HF_TOKEN) end up nowhere on disk."""
from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
import uuid

import pytest

from qlora_lab.config import Config, load_config
from qlora_lab.runs import RunFolder

from .conftest import CONFIGS, background

TINY = CONFIGS / "tiny_llama_qlora.yaml"
SENTINELS = {"WANDB_API_KEY": f"wandbsentinel{uuid.uuid4().hex}", "HF_TOKEN": f"hf_sentinel{uuid.uuid4().hex}",
             "HUGGING_FACE_HUB_TOKEN": f"hf_sentinel{uuid.uuid4().hex}"}


class _Evil:
    """A pickle that, if ever unpickled, creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pickle(path, marker):
    with open(path, "wb") as f:
        pickle.dump(_Evil(marker), f)


def _cli(*args, env, cwd):
    return subprocess.run([sys.executable, "-m", "qlora_lab.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@background
def secret_run(d, env):
    """Train (wandb on, offline) and generate with secrets set, two processes in the background lane
    (conftest.py); returns (tmp dir, captured output)."""
    env = dict(env, **SENTINELS, WANDB_MODE="offline")
    run = d / "run"
    r = _cli("train", TINY, "--output-dir", run, "--set", "train.max_steps=2", "--set", "train.save_steps=1",
             "--set", "train.eval_steps=null", "--set", "data.eval_size=0", "--set", "logging.report_to=wandb",
             env=env, cwd=d)
    assert r.returncode == 0, r.stderr[-3000:]
    prompts = d / "prompts.yaml"
    prompts.write_text("prompts:\n  - id: q\n    prompt: What is the capital of France?\n")
    g = _cli("generate", run, "--prompts", prompts, "-o", d / "generations.jsonl", "--no-progress",
             "--set", "generation.max_new_tokens=4", env=env, cwd=d)
    assert g.returncode == 0, g.stderr[-3000:]
    return d, r.stdout + r.stderr + g.stdout + g.stderr


def test_secrets_are_nowhere_in_run_folder_logs_or_outputs(secret_run):
    d, output = secret_run
    files = [p for p in d.rglob("*") if p.is_file()]
    assert (d / "run" / "adapter" / "adapter_model.safetensors") in files
    assert (d / "generations.jsonl") in files
    assert any("wandb" in p.parts for p in files), "the wandb (offline) path ran"
    for name, secret in SENTINELS.items():
        assert secret not in output, f"{name} printed"
        for p in files:
            assert secret.encode() not in p.read_bytes(), f"{name} written to {p}"


def test_pickle_adapter_is_refused_by_generate(secret_run, tmp_path, capsys):
    from qlora_lab.cli import main

    d, _ = secret_run
    run = tmp_path / "run"
    shutil.copytree(d / "run", run)
    (run / "adapter" / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    _evil_pickle(run / "adapter" / "adapter_model.bin", marker)
    capsys.readouterr()
    rc = main(["generate", str(run), "--prompts", str(d / "prompts.yaml"), "-o", str(tmp_path / "g.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "pickle" in err and "safetensors" in err
    assert not marker.exists() and not (tmp_path / "g.jsonl").exists()


def test_pickle_checkpoint_adapter_is_refused_on_resume(secret_run, tmp_path, capsys):
    from qlora_lab.cli import main

    d, _ = secret_run
    run = RunFolder(tmp_path / "run")
    shutil.copytree(d / "run", run.path)
    ckpt = run.last_checkpoint()
    (ckpt / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    _evil_pickle(ckpt / "adapter_model.bin", marker)
    capsys.readouterr()
    rc = main(["train", str(TINY), "--output-dir", str(run.path), "--resume", "--set", "train.max_steps=4"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "pickle" in err and str(ckpt) in err
    assert not marker.exists()
    assert run.status() == "completed"  # the folder is as it was


def test_checkpoint_state_with_code_is_not_unpickled(secret_run, tmp_path, capsys):
    """optimizer.pt is a torch pickle by nature; it is read with weights_only=True, so an object
    that runs code is refused with a message, never executed."""
    from qlora_lab.cli import main

    d, _ = secret_run
    run = RunFolder(tmp_path / "run")
    shutil.copytree(d / "run", run.path)
    marker = tmp_path / "pwned"
    _evil_pickle(run.last_checkpoint() / "optimizer.pt", marker)
    capsys.readouterr()
    rc = main(["train", str(TINY), "--output-dir", str(run.path), "--resume", "--set", "train.max_steps=4",
               "--set", "train.eval_steps=null", "--set", "data.eval_size=0", "--set", "train.save_steps=1"])
    err = capsys.readouterr().err
    assert not marker.exists()
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert "objects other than tensors" in err and "optimizer.pt" in err
    assert run.status() == "completed"  # refused before training: the folder is as it was


def test_trust_remote_code_is_never_on_by_default():
    assert Config().model.trust_remote_code is False
    for p in CONFIGS.glob("*.yaml"):
        assert load_config(p).model.trust_remote_code is False, p
    from qlora_lab.generate import resolve_target

    assert resolve_target("tiny-llama").cfg.model.trust_remote_code is False  # a bare model in generate

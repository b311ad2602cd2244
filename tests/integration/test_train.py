"""The training recipe end to end through the real CLI, on tiny random-weight Llama and Falcon: the wandb run in a
child process, as a user runs it (wandb's environment stays out of this one); the 24-step run, resume and
refusals through the CLI's main(). A run's console in a child process: test_cli_runs.py; a run killed in one
and resumed: test_reliability.py."""
from __future__ import annotations

import os

import pytest
import torch

from qlora_lab.cli import main
from qlora_lab.runs import RunFolder

from .conftest import CONFIGS, background, run_cli

RUN_FILES = ["config.yaml", "metrics.jsonl", "model_summary.json", "env.json", "train_summary.json",
             "plan.json", "status.json", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"]


def _train(tmp_path, name, *sets, steps=24):
    out = tmp_path / name
    assert main(["train", str(CONFIGS / f"{name}.yaml"), "--output-dir", str(out), "--set", f"train.max_steps={steps}",
                 "--set", "train.save_steps=8", "--set", "train.eval_steps=8", *sum((["--set", s] for s in sets), [])]) == 0
    return RunFolder(out)


@pytest.fixture(scope="module")
def llama_qlora(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("runs"), "tiny_llama_qlora", "train.save_total_limit=null")


@pytest.mark.parametrize("name", ["tiny_falcon_qlora", "tiny_llama_lora"])
def test_other_models_and_methods_train(qlora_runs, lora_run, name):
    """The shared tiny runs (conftest.py, trained in this process): the same recipe the CLI calls."""
    run = RunFolder(qlora_runs["falcon"][0] if name == "tiny_falcon_qlora" else lora_run)
    for f in RUN_FILES:
        assert (run.path / f).exists(), f
    s = run.read_json("model_summary.json")
    if name.endswith("qlora"):
        assert s["quantization"] == "nf4" and s["n_linear_4bit"] == s["n_linear_expected_4bit"] > 0
    else:
        assert s["quantization"] is None and s["n_linear_4bit"] == 0


def test_run_folder_is_complete(llama_qlora):
    run = llama_qlora
    for f in RUN_FILES:
        assert (run.path / f).exists(), f
    assert run.status() == "completed"
    umask = os.umask(0o022)
    os.umask(umask)
    assert run.adapter_dir.stat().st_mode & 0o777 == 0o777 & ~umask  # the user's to share, as its files
    s = run.read_json("model_summary.json")
    for k in ("architecture", "quantization", "double_quant", "compute_dtype", "n_linear_4bit", "n_linear_total",
              "n_lora_modules", "trainable_params", "total_params", "weights_bytes"):
        assert k in s, k
    assert s["architecture"] == "LlamaForCausalLM" and s["quantization"] == "nf4" and s["double_quant"] is True
    assert 0 < s["trainable_params"] < s["total_params"]
    env = run.read_json("env.json")
    assert env["torch"] and env["bitsandbytes"] and "device" in env
    cfg = run.config()
    assert cfg.train.max_steps == 24  # the resolved config, overrides included


def test_metrics_one_row_per_step_and_eval_rows(llama_qlora):
    rows = llama_qlora.metrics()
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 25))
    assert [r["step"] for r in evals] == [8, 16, 24]
    for r in train:
        assert {"step", "loss", "learning_rate", "tokens", "epoch"} <= set(r)
    tokens = [r["tokens"] for r in train]
    assert all(b > a for a, b in zip(tokens, tokens[1:]))


def test_loss_falls(llama_qlora):
    train = [r["loss"] for r in llama_qlora.metrics() if "loss" in r]
    assert sum(train[-4:]) / 4 < 0.9 * sum(train[:4]) / 4
    evals = [r["eval_loss"] for r in llama_qlora.metrics() if "eval_loss" in r]
    assert evals[-1] < evals[0]


def test_adapter_reloads_with_same_logits(llama_qlora):
    """A fresh process's view: base + saved adapter reproduces the trained model's logits."""
    from peft import PeftModel

    from qlora_lab.model import load_adapter, load_model

    cfg = llama_qlora.config()
    base, tok, _ = load_model(cfg)
    x = torch.tensor([tok("What is the capital of France? [EOT] ").input_ids])
    with torch.no_grad():
        before = base(input_ids=x).logits.clone()
    model = load_adapter(base, llama_qlora.adapter_dir)
    assert isinstance(model, PeftModel)
    with torch.no_grad():
        a = model(input_ids=x).logits
    assert not torch.allclose(a, before, atol=1e-4), "adapter changed nothing"
    base2, _, _ = load_model(cfg)
    model2 = PeftModel.from_pretrained(base2, str(llama_qlora.adapter_dir))
    with torch.no_grad():
        b = model2(input_ids=x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_resume_continues_the_same_curve(tmp_path, llama_qlora):
    """Drop the later checkpoints of a finished run and resume: the losses after step 8 repeat exactly."""
    import shutil

    run = RunFolder(tmp_path / "resumed")
    shutil.copytree(llama_qlora.path, run.path)
    for c in run.checkpoints()[1:]:
        shutil.rmtree(c)
    assert run.last_checkpoint().name == "checkpoint-8"
    assert main(["train", str(run.config_file), "--output-dir", str(run.path), "--resume"]) == 0
    a, b = llama_qlora.metrics(), run.metrics()
    assert [x["step"] for x in a] == [x["step"] for x in b]
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        for k in ("loss", "eval_loss"):
            if k in x:
                assert abs(x[k] - y[k]) <= 1e-6, (x, y)


def test_existing_run_is_not_overwritten(llama_qlora, capsys):
    before = llama_qlora.metrics_file.read_bytes()
    capsys.readouterr()
    rc = main(["train", str(CONFIGS / "tiny_llama_qlora.yaml"), "--output-dir", str(llama_qlora.path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--resume" in err and "Traceback" not in err
    assert llama_qlora.metrics_file.read_bytes() == before


def test_plan_is_logged_and_cpu_choices(llama_qlora):
    plan = llama_qlora.read_json("plan.json")
    assert plan["device"] == "cpu" and plan["compute_dtype"] == "float32"
    assert plan["optim"] == "adamw_torch"  # paged optimizers need CUDA
    assert plan["reasons"]


@background
def wandb_run(tmp, env):
    """(run folder, CompletedProcess): a tiny run with report_to wandb, no API key and no netrc, in a child
    process in the background lane (conftest.py)."""
    out = tmp / "w"
    return out, run_cli("train", CONFIGS / "tiny_llama_qlora.yaml", "--output-dir", out, "--set",
                        "train.max_steps=2", "--set", "logging.report_to=wandb",
                        env={"WANDB_API_KEY": "", "WANDB_MODE": "", "NETRC": str(tmp / "none")}, base_env=env)


def test_wandb_offline_without_key(wandb_run):
    """report_to: wandb with no API key runs offline, says so, and still writes metrics.jsonl."""
    out, r = wandb_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wandb runs offline" in r.stderr
    assert (out / "wandb").is_dir()
    assert len(RunFolder(out).metrics()) >= 2


def test_packing_trains_llama_and_is_refused_for_falcon(tmp_path, capsys):
    assert main(["train", str(CONFIGS / "tiny_llama_qlora.yaml"), "--output-dir", str(tmp_path / "p"), "--set",
                 "train.max_steps=2", "--set", "data.packing=true"]) == 0
    assert len([x for x in RunFolder(tmp_path / "p").metrics() if "loss" in x]) == 2
    capsys.readouterr()
    rc = main(["train", str(CONFIGS / "tiny_falcon_qlora.yaml"), "--output-dir", str(tmp_path / "f"), "--set",
               "data.packing=true"])
    err = capsys.readouterr().err
    assert rc == 2 and "data.packing" in err and "Traceback" not in err
    assert not (tmp_path / "f" / "metrics.jsonl").exists()


def test_oom_while_loading_the_model_names_the_knobs(tmp_path, capsys, monkeypatch):
    import qlora_lab.model as M

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 13.00 GiB.")

    monkeypatch.setattr(M, "load_model", oom)
    out = tmp_path / "oom"
    rc = main(["train", str(CONFIGS / "tiny_llama_lora.yaml"), "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "Tried to allocate" not in err
    assert "out of GPU memory while loading the base model" in err and "quant.bits=4" in err
    assert RunFolder(out).status() == "failed: out of memory"


def test_an_adapter_saved_without_its_lora_tensors_is_an_error_not_a_completed_run(tmp_path):
    """What a gather that lost the adapter's names would write: caught before the run says completed."""
    from safetensors.torch import save_file

    from qlora_lab.errors import UserError
    from qlora_lab.training import check_saved_adapter

    run = RunFolder(tmp_path)
    run.write_json("model_summary.json", {"n_lora_modules": 2})
    run.adapter_dir.mkdir()
    a = {"x.q_proj.lora_A.weight": torch.zeros(2, 4), "x.q_proj.lora_B.weight": torch.zeros(4, 2)}
    save_file(a, str(run.adapter_dir / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="saved 2 LoRA tensors, expected 4"):
        check_saved_adapter(run)
    assert run.status() == "failed: adapter saved incomplete"
    save_file({**a, "x.k_proj.lora_A.weight": torch.zeros(2, 4), "x.k_proj.lora_B.weight": torch.zeros(4, 2)},
              str(run.adapter_dir / "adapter_model.safetensors"))
    check_saved_adapter(run)  # whole: no error

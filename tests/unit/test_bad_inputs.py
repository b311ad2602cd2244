"""Bad input, across configs, data files, prompt sets, run folders and CLI arguments.

Each case must give exit code 2, exactly one line `qlora-lab...: error: ...` that names what is
wrong and where (file, line, key), no traceback, and must leave everything already on disk as it
was (bytes and modification times), including an existing run folder it was pointed at.

The corpus is CASES below: (id, argv, fragments the error line must contain). Files live in
tests/fixtures/bad/ (this suite's) and tests/fixtures/bad_*.jsonl (the data package's own).
Placeholders: {bad} = tests/fixtures/bad, {fx} = tests/fixtures, {samples} = the package's sample data, {cfg} = the tiny QLoRA config,
{w} = a scratch world holding an existing run folder ({w}/run), a folder that is not a run
({w}/notarun) and an existing output file ({w}/out.jsonl).
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from .conftest import CONFIGS, FIXTURES, ROOT, SAMPLES

BAD = FIXTURES / "bad"
CFG = CONFIGS / "tiny_llama_qlora.yaml"
TRAIN = ["train", "{cfg}", "--output-dir", "{w}/new"]

CASES = [
    # --- config files
    ("config-unknown-key", ["config", "{bad}/unknown_key.yaml"], ["unknown_key.yaml:5", "lora.rank", "unknown key"]),
    ("config-unknown-section", ["config", "{bad}/unknown_section.yaml"], ["unknown_section.yaml:3", "optimizer"]),
    ("config-wrong-type", ["config", "{bad}/wrong_type.yaml"], ["wrong_type.yaml:5", "train.max_steps", "integer"]),
    ("config-invalid-yaml", ["config", "{bad}/invalid_yaml.yaml"], ["invalid_yaml.yaml:5", "invalid YAML"]),
    ("config-empty", ["config", "{bad}/empty.yaml"], ["empty.yaml", "empty config"]),
    ("config-not-utf8", ["config", "{bad}/latin1.yaml"], ["latin1.yaml", "UTF-8"]),
    ("config-not-a-mapping", ["config", "{bad}/list.yaml"], ["list.yaml:1", "mapping"]),
    ("config-missing-file", ["config", "{bad}/nope.yaml"], ["nope.yaml", "not found"]),
    ("config-is-a-folder", ["config", "{w}/notarun"], ["notarun", "is a directory"]),
    ("config-two-models", ["config", "{bad}/two_models.yaml"], ["two_models.yaml:1", "exactly one"]),
    ("config-section-scalar", ["config", "{bad}/section_scalar.yaml"], ["section_scalar.yaml:3", "lora"]),
    ("config-rank-negative", ["train", "{bad}/absurd_rank.yaml", "--output-dir", "{w}/new"], ["absurd_rank.yaml:4", "lora.r", ">= 1", "-1"]),
    # --- --set overrides
    ("set-rank-negative", TRAIN + ["--set", "lora.r=-1"], ["--set", "lora.r", "-1"]),
    ("set-max-length-0", TRAIN + ["--set", "data.max_length=0"], ["--set", "data.max_length", ">= 8"]),
    ("set-lr-zero", TRAIN + ["--set", "train.learning_rate=0"], ["train.learning_rate", "> 0"]),
    ("set-lr-nan", TRAIN + ["--set", "train.learning_rate=nan"], ["train.learning_rate", "finite"]),
    ("set-eval-fraction-1.5", TRAIN + ["--set", "data.eval_size=1.5"], ["data.eval_size", "< 1"]),
    ("set-bits-8", TRAIN + ["--set", "quant.bits=8"], ["quant.bits", "4, null"]),
    ("set-batch-bool", TRAIN + ["--set", "train.per_device_train_batch_size=true"],
     ["per_device_train_batch_size", "integer"]),
    ("set-warmup-2", TRAIN + ["--set", "train.warmup_ratio=2"], ["train.warmup_ratio", "[0.0, 1.0]"]),
    ("set-top-p-negative", ["config", "{cfg}", "--set", "generation.top_p=-0.1"], ["generation.top_p"]),
    ("set-targets-empty", TRAIN + ["--set", "lora.target_modules=[]"], ["lora.target_modules", "non-empty"]),
    ("set-targets-string", TRAIN + ["--set", "lora.target_modules=q_proj"], ["lora.target_modules", "all-linear"]),
    ("set-unknown-key", TRAIN + ["--set", "train.epochs=3"], ["train.epochs", "unknown key"]),
    ("set-unknown-section", TRAIN + ["--set", "trainer.max_steps=3"], ["trainer", "unknown section"]),
    ("set-no-equals", TRAIN + ["--set", "train.max_steps"], ["train.max_steps", "section.key=value"]),
    ("set-no-section", TRAIN + ["--set", "max_steps=3"], ["max_steps", "section.key"]),
    # --- the model a config names
    ("model-folder-missing", TRAIN + ["--set", "model.random_init=null", "--set", "model.name_or_path={w}/nope"],
     ["model.name_or_path", "nope", "not a model folder"]),
    ("model-folder-not-a-model", TRAIN + ["--set", "model.random_init=null", "--set", "model.name_or_path={w}/notarun"],
     ["model.name_or_path", "notarun", "config.json"]),
    ("model-hub-id-offline", TRAIN + ["--set", "model.random_init=null", "--set", "model.name_or_path=no-such-org/no-such-model"],
     ["model.name_or_path", "no-such-org/no-such-model"]),
    ("lora-targets-unknown", TRAIN + ["--set", "lora.target_modules=[nope_proj]"], ["lora.target_modules", "nope_proj", "q_proj"]),
    ("attn-flash-missing", TRAIN + ["--set", "model.attn_implementation=flash_attention_2"],
     ["model.attn_implementation", "flash-attn"]),
    # --- CLI arguments
    ("cli-unknown-verb", ["fly"], ["fly", "invalid choice"]),
    ("cli-unknown-option", ["train", "{cfg}", "--epochs", "3"], ["--epochs"]),
    ("cli-missing-config-arg", ["train"], ["config"]),
    ("cli-unknown-preset", ["make-model", "tiny-gpt", "{w}/m"], ["tiny-gpt", "invalid choice"]),
    ("cli-stats-bins-0", ["data", "stats", "{samples}/tiny_sft.jsonl", "--config", "{cfg}", "--bins", "0"], ["--bins", "0"]),
    # --- data files (train, through the config's data.train_file)
    ("data-missing-file", TRAIN + ["--set", "data.train_file={bad}/nope.jsonl"], ["data.train_file", "nope.jsonl", "not found"]),
    ("data-empty-file", TRAIN + ["--set", "data.train_file={fx}/bad_empty.jsonl"], ["bad_empty.jsonl", "empty"]),
    ("data-malformed-json-line-3", TRAIN + ["--set", "data.train_file={bad}/malformed.jsonl"], ["malformed.jsonl:3", "invalid JSON"]),
    ("data-not-utf8-line-2", TRAIN + ["--set", "data.train_file={bad}/latin1.jsonl"], ["latin1.jsonl:2", "UTF-8"]),
    ("data-roles-not-alternating", TRAIN + ["--set", "data.train_file={fx}/bad_prepared_roles.jsonl"],
     ["bad_prepared_roles.jsonl:2", "messages[1].role"]),
    ("data-unknown-role", TRAIN + ["--set", "data.train_file={bad}/unknown_role.jsonl"], ["unknown_role.jsonl:2", "system"]),
    ("data-no-messages", TRAIN + ["--set", "data.train_file={bad}/no_messages.jsonl"], ["no_messages.jsonl:1", "messages"]),
    ("data-row-not-object", TRAIN + ["--set", "data.train_file={bad}/array_row.jsonl"], ["array_row.jsonl:2", "object"]),
    ("data-content-not-string", TRAIN + ["--set", "data.train_file={bad}/content_type.jsonl"],
     ["content_type.jsonl:2", "messages[1].content"]),
    ("data-empty-conversation", TRAIN + ["--set", "data.train_file={bad}/empty_conversation.jsonl"],
     ["empty_conversation.jsonl:2", "empty conversation"]),
    ("data-json-array-cut", TRAIN + ["--set", "data.train_file={bad}/truncated_array.json"], ["truncated_array.json:", "invalid JSON"]),
    ("data-all-truncated", TRAIN + ["--set", "data.max_length=8"], ["tiny_sft.jsonl", "max_length=8"]),
    ("data-eval-takes-all", TRAIN + ["--set", "data.eval_size=24"], ["data.eval_size", "nothing to train"]),
    ("data-stats-malformed", ["data", "stats", "{bad}/malformed.jsonl", "--config", "{cfg}"], ["malformed.jsonl:3"]),
    # --- raw datasets (the data package's fixtures): the output file already there is kept
    ("oasst1-bad-json", ["data", "oasst1", "{fx}/bad_oasst1_json.jsonl", "-o", "{w}/out.jsonl"], ["bad_oasst1_json.jsonl:"]),
    ("oasst1-cycle", ["data", "oasst1", "{fx}/bad_oasst1_cycle.jsonl", "-o", "{w}/out.jsonl"], ["bad_oasst1_cycle.jsonl"]),
    ("oasst1-not-utf8", ["data", "oasst1", "{fx}/bad_oasst1_latin1.jsonl", "-o", "{w}/out.jsonl"], ["bad_oasst1_latin1.jsonl:"]),
    ("lima-missing-field", ["data", "lima", "{fx}/bad_lima_missing.jsonl", "-o", "{w}/out.jsonl"], ["bad_lima_missing.jsonl:3"]),
    # --- run folders
    ("resume-not-a-run", TRAIN[:3] + ["{w}/notarun", "--resume"], ["notarun", "config.yaml"]),
    ("resume-no-checkpoint", TRAIN[:3] + ["{w}/nockpt", "--resume"], ["nockpt", "checkpoint"]),
    ("train-over-existing-run", TRAIN[:3] + ["{w}/run"], ["run", "already holds a run"]),
    ("resume-with-missing-data", TRAIN[:3] + ["{w}/run", "--resume", "--set", "data.train_file={bad}/nope.jsonl"],
     ["nope.jsonl", "not found"]),
    ("generate-not-a-run", ["generate", "{w}/notarun", "--prompts", "oasst1_levels", "-o", "{w}/out.jsonl"], ["notarun"]),
    ("compare-not-a-run", ["compare", "{w}/notarun", "-o", "{w}/cmp"], ["notarun"]),
    ("plot-not-a-run", ["plot", "{w}/notarun", "-o", "{w}/loss.png"], ["notarun"]),
    # --- outputs that exist as the wrong kind
    ("train-output-dir-is-a-file", TRAIN[:3] + ["{w}/out.jsonl"], ["out.jsonl", "is a file"]),
    ("compare-output-is-a-file", ["compare", "{w}/run", "-o", "{w}/out.jsonl"], ["out.jsonl", "is a file"]),
    ("plot-output-is-a-folder", ["plot", "{w}/run", "-o", "{w}/notarun"], ["notarun", "is a folder"]),
    ("generate-output-is-a-folder", ["generate", "tiny-llama", "--prompts", "oasst1_levels", "-o", "{w}/notarun"],
     ["notarun", "is a folder"]),
    ("generate-output-under-a-file",
     ["generate", "tiny-llama", "--prompts", "oasst1_levels", "-o", "{w}/out.jsonl/g.jsonl"], ["out.jsonl", "is a file"]),
    # --- prompt sets
    ("prompts-none", ["generate", "tiny-llama", "--prompts", "{bad}/no_prompts.yaml", "-o", "{w}/out.jsonl"],
     ["no_prompts.yaml", "no prompts"]),
    ("prompts-unknown-key", ["generate", "tiny-llama", "--prompts", "{bad}/prompt_unknown_key.yaml", "-o", "{w}/out.jsonl"],
     ["prompt_unknown_key.yaml", "answer"]),
    ("prompts-blank", ["generate", "tiny-llama", "--prompts", "{bad}/prompt_blank.yaml", "-o", "{w}/out.jsonl"],
     ["prompt_blank.yaml", "prompts[1]"]),
    ("prompts-duplicate-id", ["generate", "tiny-llama", "--prompts", "{bad}/prompt_duplicate_id.yaml", "-o", "{w}/out.jsonl"],
     ["prompt_duplicate_id.yaml", "prompts[2]"]),
    ("prompts-missing", ["generate", "tiny-llama", "--prompts", "{bad}/nope.yaml", "-o", "{w}/out.jsonl"], ["nope.yaml", "not found"]),
]

ERROR_LINE = re.compile(r"^qlora-lab[\w -]*: error: ")


def _whole_checkpoint(ckpt, step):
    """The files of a checkpoint --resume accepts as whole, with stand-in contents."""
    import torch
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True)
    (ckpt / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"w": torch.zeros(1)}, str(ckpt / "adapter_model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.pt")
    torch.save({}, ckpt / "scheduler.pt")
    torch.save({"python": None, "numpy": None, "cpu": torch.zeros(1)}, ckpt / "rng_state.pth")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    (ckpt / "qlora_lab_state.json").write_text(json.dumps({"step": step, "tokens": 100}))


def _world(tmp_path):
    """An existing run folder (completed, with a checkpoint), a folder that is not a run, a
    run folder without a complete checkpoint, and an output file a failed command must keep."""
    w = tmp_path / "w"
    run = w / "run"
    _whole_checkpoint(run / "checkpoints" / "checkpoint-2", 2)
    (run / "config.yaml").write_text(CFG.read_text())
    (run / "status.json").write_text(json.dumps({"status": "interrupted", "step": 2}))
    (run / "env.json").write_text("{}")
    (run / "train.log").write_text("earlier log\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n')
    (w / "notarun").mkdir()
    (w / "notarun" / "notes.txt").write_text("just a folder\n")
    (w / "nockpt").mkdir()
    (w / "nockpt" / "config.yaml").write_text(CFG.read_text())
    (w / "out.jsonl").write_text('{"keep": "me"}\n')
    return w


def _state(*roots) -> dict:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns)
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def _argv(argv, w) -> list[str]:
    sub = {"{bad}": str(BAD), "{fx}": str(FIXTURES), "{samples}": str(SAMPLES), "{cfg}": str(CFG), "{w}": str(w)}
    out = []
    for a in argv:
        for k, v in sub.items():
            a = a.replace(k, v)
        out.append(a)
    return out


def _check(rc, err, fragments, before, after, w):
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if ERROR_LINE.match(line)]
    assert len(lines) == 1, err[-3000:]
    assert not any(line.startswith("usage:") for line in err.splitlines()), err[-2000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"changed or removed on disk: {changed}"
    new = [k for k in after if k not in before and not k.startswith(str(w / "new"))]
    assert not new, f"new files outside the fresh output folder: {new}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path, capsys):
    from qlora_lab.cli import main

    name, argv, fragments = case
    if name == "attn-flash-missing" and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    w = _world(tmp_path)
    before = _state(w, FIXTURES)
    capsys.readouterr()
    try:
        rc = main(_argv(argv, w))
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    _check(rc, err, fragments, before, _state(w, FIXTURES), w)


def test_corpus_size():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name", ["config-unknown-key", "cli-unknown-verb", "set-rank-negative"])
def test_bad_input_through_the_console_entry(name, tmp_path):
    """A few cases again in a child process: the real entry prints one line, no traceback."""
    _, argv, fragments = next(c for c in CASES if c[0] == name)
    w = _world(tmp_path)
    before = _state(w, FIXTURES)
    r = subprocess.run([sys.executable, "-m", "qlora_lab.cli", *_argv(argv, w)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    _check(r.returncode, r.stderr, fragments, before, _state(w, FIXTURES), w)
    assert r.stderr.count("\n") == 1  # nothing else printed

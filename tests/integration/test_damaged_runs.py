"""Damaged run folders and checkpoints: a disk that filled, a copy cut short, a hand edit.

Each file a reader needs may be missing, empty, cut short, garbled or a folder. The reader (train
--resume, generate, compare, plot) then exits with code 2 and one line naming the file and what is
wrong, no traceback; or, where the file is optional by design (a run not finished yet), carries on.
--resume takes the newest whole checkpoint, saying which newer ones it passed over and why, and never
resumes from a partial one (the Trainer alone would start a fresh optimizer without a word).

One tiny run (3 steps, a checkpoint each) is trained per module and copied into each test before it
is damaged. The --resume matrix stops right after the checkpoint is chosen (load_plan is the next
step); one test resumes for real.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlora_lab.errors import UserError
from qlora_lab.runs import RunFolder, check_checkpoint

from .conftest import CONFIGS

TINY = CONFIGS / "tiny_llama_qlora.yaml"
SETS = ["--set", "train.max_steps=3", "--set", "train.save_steps=1", "--set", "train.save_total_limit=null",
        "--set", "train.eval_steps=null", "--set", "data.eval_size=0", "--set", "data.max_length=64"]
GARBAGE = b"\x89\xfe\x00 not what was written \xff{{\n" * 4  # binary, not UTF-8, several lines
DAMAGES = ("missing", "empty", "truncated", "garbage", "folder")


def damage(p: Path, how: str) -> None:
    if how == "missing":
        p.unlink()
    elif how == "empty":
        p.write_bytes(b"")
    elif how == "truncated":  # a copy or a write cut halfway
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        p.write_bytes(GARBAGE)
    elif how == "folder":  # a folder where the file goes
        p.unlink()
        p.mkdir()
    else:
        raise ValueError(how)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from qlora_lab.cli import main

    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", str(TINY), "--output-dir", str(out), *SETS]) == 0
    assert [c.name for c in RunFolder(out).checkpoints()] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(trained, d)
    return d


def _cli(capsys, *argv) -> tuple[int, str]:
    from qlora_lab.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _error_line(rc: int, err: str) -> str:
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("qlora-lab: error:")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


def _generations(tmp_path) -> Path:
    g = tmp_path / "generations.jsonl"
    g.write_text(json.dumps({"model": "run", "adapter": "run/adapter", "prompt_id": "p", "prompt": "Hi?",
                             "answer": "Hello.", "level": None}) + "\n")
    return g


READERS = {
    "generate": lambda run, tmp: ["generate", run, "--prompts", "lima_examples", "-o", tmp / "g.jsonl",
                                  "--no-progress"],
    "compare": lambda run, tmp: ["compare", run, "--generations", _generations(tmp), "-o", tmp / "cmp"],
    "plot": lambda run, tmp: ["plot", run, "-o", tmp / "loss.png"],
    "resume": lambda run, tmp: ["train", TINY, "--output-dir", run, "--resume", *SETS],
}

# (file in the run folder, a reader that needs it)
RUN_READS = [
    ("config.yaml", "generate"), ("config.yaml", "compare"),
    ("metrics.jsonl", "compare"), ("metrics.jsonl", "plot"), ("metrics.jsonl", "resume"),
    ("model_summary.json", "compare"), ("train_summary.json", "compare"), ("env.json", "compare"),
    ("adapter/adapter_config.json", "generate"), ("adapter/adapter_model.safetensors", "generate"),
]
# Where the reader carries on by design: a file a run writes later (or not at all yet), and a last
# metrics line a crash cut short.
CARRIES_ON = {
    ("metrics.jsonl", "compare", "missing"), ("metrics.jsonl", "compare", "empty"),
    ("metrics.jsonl", "compare", "truncated"), ("metrics.jsonl", "plot", "truncated"),
    ("model_summary.json", "compare", "missing"), ("train_summary.json", "compare", "missing"),
    ("env.json", "compare", "missing"),
}
CHECKPOINT_FILES = ["adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth", "trainer_state.json", "qlora_lab_state.json"]


def _stop_after_choosing(monkeypatch):
    """--resume up to the choice of a checkpoint (and its log lines), then a UserError: no model loads."""
    import qlora_lab.training.recipe as T

    def load_plan(*a, **k):
        raise UserError("stopped after choosing the checkpoint")

    monkeypatch.setattr(T, "load_plan", load_plan)


# ----------------------------------------------------------------------------- run folder files

@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name,reader", RUN_READS, ids=[f"{r}-{n}" for n, r in RUN_READS])
def test_damaged_run_file_is_named_in_one_line(run, tmp_path, capsys, name, reader, how):
    damage(run / name, how)
    rc, err = _cli(capsys, *READERS[reader](run, tmp_path))
    if (name, reader, how) in CARRIES_ON:
        assert rc == 0 and "Traceback" not in err, err[-3000:]
        return
    assert str(run / name) in _error_line(rc, err)


def test_compare_copies_whole_metrics_rows_only(run, tmp_path, capsys):
    damage(run / "metrics.jsonl", "truncated")
    rc, err = _cli(capsys, *READERS["compare"](run, tmp_path))
    assert rc == 0, err[-3000:]
    copied = (tmp_path / "cmp" / "metrics" / "run.jsonl").read_text().splitlines()
    assert copied and all(json.loads(line)["step"] for line in copied)


def test_garbled_metrics_line_in_the_middle_gives_file_and_line(run, tmp_path, capsys):
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(lines[0] + b'{"step": 2, "lo\xff\n' + b"".join(lines[2:]))
    for reader in ("plot", "compare", "resume"):
        line = _error_line(*_cli(capsys, *READERS[reader](run, tmp_path)))
        assert f"{run / 'metrics.jsonl'}:2:" in line, line
    # A last line cut short by a crash (no newline after it) is what a crash leaves: left out.
    (run / "metrics.jsonl").write_bytes(b"".join(lines) + b'{"step": 4, "lo')
    assert [r["step"] for r in RunFolder(run).metrics()] == [1, 2, 3]
    rc, err = _cli(capsys, *READERS["plot"](run, tmp_path))
    assert rc == 0, err[-3000:]


def test_files_no_reader_needs_may_be_damaged(run, tmp_path, capsys):
    for name in ("plan.json", "data_stats.json", "status.json", "train.log"):
        damage(run / name, "garbage")
    for reader in ("compare", "plot"):
        rc, err = _cli(capsys, *READERS[reader](run, tmp_path))
        assert rc == 0, err[-3000:]


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_resume_passes_over_a_damaged_newest_checkpoint(run, capsys, monkeypatch, name, how):
    ckpts = run / "checkpoints"
    damage(ckpts / "checkpoint-3" / name, how)
    _stop_after_choosing(monkeypatch)
    rc, err = _cli(capsys, *READERS["resume"](run, None))
    assert _error_line(rc, err).endswith("stopped after choosing the checkpoint")
    warnings = [line for line in err.splitlines() if "checkpoint passed over" in line]
    assert len(warnings) == 1 and str(ckpts / "checkpoint-3" / name) in warnings[0], err[-3000:]
    assert f"resuming from {ckpts / 'checkpoint-2'} (step 2)" in err
    assert (ckpts / "checkpoint-3").is_dir()  # stopped before training: nothing moved


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_resume_with_no_whole_checkpoint_names_the_newest(run, capsys, name, how):
    ckpts = run / "checkpoints"
    for c in ckpts.iterdir():
        damage(c / name, how)
    line = _error_line(*_cli(capsys, *READERS["resume"](run, None)))
    assert "no whole checkpoint" in line and str(ckpts / "checkpoint-3" / name) in line, line


def test_resume_without_optimizer_state_continues_from_the_older_checkpoint(trained, run, capsys):
    """The case that used to resume silently with a fresh optimizer."""
    ckpts = run / "checkpoints"
    (ckpts / "checkpoint-3" / "optimizer.pt").unlink()
    for name in ("config.yaml", "status.json", "env.json", "plan.json", "train_summary.json"):
        damage(run / name, "garbage")  # rewritten by the resumed run: they do not matter
    rc, err = _cli(capsys, *READERS["resume"](run, None))
    assert rc == 0, err[-3000:]
    warning = f"checkpoint passed over: {ckpts / 'checkpoint-3' / 'optimizer.pt'}: missing"
    assert warning in err and warning in (run / "train.log").read_text()
    assert f"resuming from {ckpts / 'checkpoint-2'} (step 2)" in err
    # Kept to look at, out of the Trainer's way; the step-3 checkpoint is saved afresh, whole.
    assert (ckpts / "damaged-checkpoint-3" / "scheduler.pt").is_file()
    check_checkpoint(ckpts / "checkpoint-3")
    # The same curve: step 3 redone from step 2's state gives the first run's numbers.
    a, b = RunFolder(trained).metrics(), RunFolder(run).metrics()
    assert [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"] and abs(x["loss"] - y["loss"]) <= 1e-6, (x, y)
    assert RunFolder(run).status() == "completed"


def test_a_folder_where_the_run_writes_a_file_is_refused(run, capsys):
    (run / "train.log").unlink()
    (run / "train.log").mkdir()
    line = _error_line(*_cli(capsys, *READERS["resume"](run, None)))
    assert f"{run / 'train.log'}: is a folder" in line


def test_config_cut_at_a_line_end_is_still_noticed(run, capsys):
    """YAML cut between two lines parses; the sections it lost give it away (a run's config.yaml
    holds every section)."""
    lines = (run / "config.yaml").read_text().splitlines(keepends=True)
    (run / "config.yaml").write_text("".join(lines[: len(lines) // 2]))
    line = _error_line(*_cli(capsys, "generate", run, "--prompts", "lima_examples", "-o", run / "g.jsonl"))
    assert f"{run / 'config.yaml'}: no generation, logging section" in line, line

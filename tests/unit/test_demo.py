"""The demo's parts: its data, prompts, configs and output folder. End to end: tests/integration/test_demo.py."""
from __future__ import annotations

import pytest

from qlora_lab import demo
from qlora_lab.errors import UserError


def test_shipped_demo_set_is_lima_format_and_big_enough():
    pairs = demo.demo_pairs()
    assert len(pairs) >= 20 and all(q.strip() and a.strip() for q, a in pairs)
    assert len({q for q, _ in pairs}) == len(pairs)


def test_demo_prompts_carry_levels_from_the_data_and_the_expected_answers():
    ps = demo.demo_prompts()
    assert [(p.prompt, p.expected) for p in ps] == demo.demo_pairs()
    assert {p.level for p in ps} == set(demo.LEVELS) and ps.levels == demo.LEVELS
    by_prompt = {p.prompt: p.level for p in ps}
    assert by_prompt["What is the capital of France?"] == "Fact"
    assert by_prompt["How many legs does a spider have?"] == "Number"
    assert by_prompt["What is reinforcement learning?"] == "Concept"


def test_demo_configs_differ_only_in_quantization(tmp_path):
    q, l = demo.demo_config("qlora", tmp_path / "x.jsonl"), demo.demo_config("lora", tmp_path / "x.jsonl")
    dq, dl = q.to_dict(), l.to_dict()
    assert q.is_qlora and not l.is_qlora
    dq["train"].pop("run_name"), dl["train"].pop("run_name")
    assert {s for s in dq if dq[s] != dl[s]} == {"quant"}
    assert q.generation.do_sample is False  # greedy: exact matches are meaningful


def test_out_dir_of_someone_else_is_never_deleted(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="not empty"):
        demo.prepare_out_dir(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_steps_flag_reaches_both_runs_and_must_be_positive(tmp_path, monkeypatch, capsys):
    """`qlora-lab demo --steps N` (what the end-to-end test ran as a second, 1-step demo before)."""
    from qlora_lab.cli import main

    assert demo.demo_config("lora", tmp_path / "x.jsonl", steps=1).train.max_steps == 1
    assert demo.demo_config("lora", tmp_path / "x.jsonl").train.max_steps == demo.DEMO_CONFIG["train"]["max_steps"]
    seen = {}

    def fake_run_demo(out_dir, steps=None, progress=True):
        seen.update(out_dir=out_dir, steps=steps, progress=progress)
        raise UserError("stop here")

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    monkeypatch.setenv("TQDM_DISABLE", "1")  # what --no-progress sets; undone after the test
    assert main(["demo", "-o", str(tmp_path / "d"), "--steps", "1", "--no-progress"]) == 2
    assert seen == {"out_dir": str(tmp_path / "d"), "steps": 1, "progress": False}
    capsys.readouterr()
    assert main(["demo", "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "qlora-lab: error: --steps 0: must be >= 1", err

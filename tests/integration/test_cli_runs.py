"""Verbs in a child process, as a user runs them, stderr a pipe (not a terminal): what the console shows of
`train`, and `generate` and `compare` on the shared tiny LoRA run (conftest.py's lora_run). The three
children are independent and started together (`children`), each test checking one."""
from __future__ import annotations

import json
import re

import pytest

from .conftest import CONFIGS, start_cli


@pytest.fixture(scope="module")
def children(lora_run, tmp_path_factory):
    """{name: (folder it writes in, its StartedCli)}, all three started at once."""
    d = {name: tmp_path_factory.mktemp(name) for name in ("generate", "compare", "train")}
    started = {
        "generate": (d["generate"], start_cli(
            "generate", lora_run, "--base", "--prompts", "lima_examples", "-o", d["generate"] / "g.jsonl",
            "--set", "generation.max_new_tokens=8", "--set", "generation.batch_size=4", "--no-progress")),
        "compare": (d["compare"], start_cli(
            "compare", lora_run, "--prompts", "oasst1_levels", "-o", d["compare"] / "cmp",
            "--set", "generation.max_new_tokens=4")),
        "train": (d["train"], start_cli(
            "train", CONFIGS / "tiny_llama_qlora.yaml", "--output-dir", d["train"] / "run", "--set",
            "train.max_steps=3", "--set", "data.eval_size=0", "--set", "lora.target_modules=[q_proj,v_proj,lm_head]")),
    }
    yield started
    for _, child in started.values():  # a child whose test did not run (-k) does not outlive the session
        child.proc.kill()
        child.result()


def _rows(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_generate_cli_base_and_run_with_study_defaults(children):
    tmp_path, child = children["generate"]
    out = tmp_path / "g.jsonl"
    r = child.result()
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # library warnings (loading, peft, bitsandbytes) went to g.log, not the console
    rows = _rows(out)
    assert [x["model"] for x in rows] == ["base"] * 6 + ["tiny_llama_lora"] * 6
    assert rows[0]["adapter"] is None and rows[6]["adapter"].endswith("adapter")
    assert rows[0]["prompt"] == "What is reinforcement learning?" and rows[0]["level"] == "Study example"
    assert all(x["new_tokens"] <= 8 and x["stopped"] in ("eos", "length") for x in rows)
    g = rows[0]["generation"]
    assert g["max_new_tokens"] == 8 and g["do_sample"] is False  # the tiny config is greedy
    assert not list(tmp_path.glob(".*tmp"))


def test_compare_cli_generates_base_and_runs(children):
    tmp_path, child = children["compare"]
    r = child.result()
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # stderr is a pipe: no progress bar fragments, no library warnings
    md = (tmp_path / "cmp" / "table.md").read_text()
    assert "| level | prompt | base | tiny_llama_lora |" in md and "| Easy | What is the capital of France? |" in md
    html = (tmp_path / "cmp" / "table.html").read_text()
    assert html.count("<tr>") >= 9
    assert json.loads((tmp_path / "cmp" / "summary.json").read_text())["runs"]["tiny_llama_lora"]["method"] == "lora"


def test_train_console_is_our_lines_only_and_library_warnings_are_in_train_log(children):
    """A real tiny run, stderr a pipe (not a terminal): no library warnings, no tqdm redraw codes, a plain
    line per tenth of the run, rounded losses; the warnings are in train.log. lm_head among the targets
    makes peft warn about save_embedding_layers; transformers warns about gradient_checkpointing."""
    tmp_path, child = children["train"]
    run = tmp_path / "run"
    r = child.result()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\r" not in r.stderr and "\x1b" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.splitlines()
    assert lines and all(line.startswith("qlora-lab: ") for line in lines), r.stderr[-3000:]
    assert [line for line in lines if re.match(r"qlora-lab: step \d/3: loss \d", line)]
    done = next(line for line in lines if line.startswith("qlora-lab: done:"))
    m = re.search(r"final loss (\S+), eval loss (\S+);", done)
    assert m and m.group(2) == "-", done
    assert len(re.sub(r"\D", "", m.group(1)).lstrip("0")) <= 4, done  # 4 significant digits, not 17
    log = (run / "train.log").read_text()
    assert "py.warnings WARNING" in log and "save_embedding_layers" in log, log[-3000:]
    assert "model: LlamaForCausalLM, nf4 base computing in float32" in log  # the plan's dtype, not '16-bit'

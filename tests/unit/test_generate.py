"""Generation on the tiny random-weight Llama: a real (short) training run, real adapters."""
from __future__ import annotations

import json

import pytest

from qlora_lab import generate
from qlora_lab.config import load_config

from .conftest import CONFIGS, run_cli


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from qlora_lab import training

    cfg = load_config(CONFIGS / "tiny_llama_lora.yaml",
                      ["train.max_steps=3", "train.eval_steps=3", "train.save_steps=3", "logging.report_to=none"])
    return training.main(cfg, output_dir=tmp_path_factory.mktemp("runs") / "tiny_llama_lora")


def _rows(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_generate_cli_base_and_run_with_study_defaults(tiny_run, tmp_path):
    out = tmp_path / "g.jsonl"
    r = run_cli("generate", tiny_run, "--base", "--prompts", "lima_examples", "-o", out,
                "--set", "generation.max_new_tokens=8", "--set", "generation.batch_size=4", "--no-progress")
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


def test_sampling_is_seeded_so_a_table_can_be_regenerated(tiny_run):
    targets = generate.targets_for([tiny_run])
    gen = generate.generation_config(targets, overrides=[
        "generation.do_sample=true", "generation.temperature=1.0", "generation.max_new_tokens=12"])
    a = [r["answer"] for r in generate.run(targets, "lima_examples", gen, progress=False)]
    b = [r["answer"] for r in generate.run(targets, "lima_examples", gen, progress=False)]
    c = [r["answer"] for r in generate.run(targets, "lima_examples", gen.__class__(**{**gen.__dict__, "seed": 7}),
                                           progress=False)]
    assert a == b and a != c


def test_study_generation_defaults():
    from qlora_lab.config import GenerationConfig

    g = GenerationConfig()
    assert (g.max_new_tokens, g.do_sample, g.temperature, g.top_p, g.num_beams, g.repetition_penalty) == \
        (500, True, 0.8, 0.9, 1, 1.0)
    cfg = load_config(CONFIGS / "llama2_7b_lima_qlora.yaml")
    from qlora_lab.presets import byte_tokenizer

    tok = byte_tokenizer()
    hf = generate._hf_generation_config(cfg.generation, tok)
    assert hf.eos_token_id == tok.eos_token_id and hf.pad_token_id == tok.pad_token_id
    assert hf.do_sample and hf.temperature == 0.8 and hf.top_p == 0.9


def test_targets_resolve(tiny_run, tmp_path):
    t = generate.resolve_target(tiny_run)
    assert t.adapter == tiny_run / "adapter" and t.cfg.data.format == "lima_eot"
    t = generate.resolve_target(CONFIGS / "tiny_falcon_qlora.yaml")
    assert t.adapter is None and t.cfg.is_qlora and t.label == "base"
    t = generate.resolve_target("tiny-llama")
    assert t.cfg.model.random_init == "tiny-llama" and not t.cfg.is_qlora
    assert generate.resolve_target("meta-llama/Llama-2-7b-hf").cfg.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    both = generate.targets_for([tiny_run, tiny_run], include_base=True)
    assert [x.label for x in both][0] == "base" and len({x.label for x in both}) == 3


@pytest.mark.parametrize("case", ["missing", "not_a_run", "no_prompts", "not_generation_key"])
def test_bad_input_is_one_line_exit_2(case, tiny_run, tmp_path):
    args = {
        "missing": [tmp_path / "nope"],
        "not_a_run": [tmp_path],
        "no_prompts": [tiny_run, "--prompts", tmp_path / "empty.yaml"],
        "not_generation_key": [tiny_run, "--set", "train.max_steps=3"],
    }[case]
    (tmp_path / "empty.yaml").write_text("prompts: []\n")
    r = run_cli("generate", *args, "-o", tmp_path / "g.jsonl")
    assert r.returncode == 2, r.stderr
    msg = r.stderr.strip()
    assert msg.startswith("qlora-lab: error: ") and "\n" not in msg and "Traceback" not in msg
    expected = {"missing": "nope: not found", "not_a_run": "neither a run folder",
                "no_prompts": "empty.yaml: no prompts", "not_generation_key": "only generation.* keys"}[case]
    assert expected in msg
    assert not (tmp_path / "g.jsonl").exists()


def test_compare_cli_generates_base_and_runs(tiny_run, tmp_path):
    r = run_cli("compare", tiny_run, "--prompts", "oasst1_levels", "-o", tmp_path / "cmp",
                "--set", "generation.max_new_tokens=4")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # stderr is a pipe: no progress bar fragments, no library warnings
    md = (tmp_path / "cmp" / "table.md").read_text()
    assert "| level | prompt | base | tiny_llama_lora |" in md and "| Easy | What is the capital of France? |" in md
    html = (tmp_path / "cmp" / "table.html").read_text()
    assert html.count("<tr>") >= 9
    assert json.loads((tmp_path / "cmp" / "summary.json").read_text())["runs"]["tiny_llama_lora"]["method"] == "lora"

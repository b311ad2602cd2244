"""Generation on the tiny random-weight Llama: a real (short) training run, real adapters. The verbs in a
child process, as a user runs them: tests/integration/test_cli_runs.py."""
from __future__ import annotations

import pytest

from qlora_lab import generate
from qlora_lab.cli import main
from qlora_lab.config import load_config

from .conftest import CONFIGS


@pytest.fixture(scope="module")
def tiny_run(lora_run):
    """The tiny Llama LoRA run, 3 steps (conftest.py's lora_run, shared)."""
    return lora_run


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
def test_bad_input_is_one_line_exit_2(case, tiny_run, tmp_path, capsys):
    args = {
        "missing": [tmp_path / "nope"],
        "not_a_run": [tmp_path],
        "no_prompts": [tiny_run, "--prompts", tmp_path / "empty.yaml"],
        "not_generation_key": [tiny_run, "--set", "train.max_steps=3"],
    }[case]
    (tmp_path / "empty.yaml").write_text("prompts: []\n")
    capsys.readouterr()
    rc = main(["generate", *map(str, args), "-o", str(tmp_path / "g.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2, err
    msg = err.strip()
    assert msg.startswith("qlora-lab: error: ") and "\n" not in msg and "Traceback" not in msg
    expected = {"missing": "nope: not found", "not_a_run": "neither a run folder",
                "no_prompts": "empty.yaml: no prompts", "not_generation_key": "only generation.* keys"}[case]
    assert expected in msg
    assert not (tmp_path / "g.jsonl").exists()

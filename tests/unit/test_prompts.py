from __future__ import annotations

import pytest

from qlora_lab.errors import UserError
from qlora_lab.prompts import load_prompts, packaged

from .conftest import CONFIGS


def test_packaged_sets_hold_the_studies_prompts():
    assert {"oasst1_levels", "lima_examples"} <= set(packaged())
    oasst = load_prompts("oasst1_levels")
    assert oasst.levels == ("Easy", "Intermediate", "Advanced")
    by_level = {}
    for p in oasst:
        by_level.setdefault(p.level, []).append(p.prompt)
    assert len(by_level["Easy"]) == 4 and len(by_level["Intermediate"]) == 3 and len(by_level["Advanced"]) == 2
    assert any("capital of France" in t for t in by_level["Easy"])
    assert any("1984" in t for t in by_level["Easy"])
    assert any("CRISPR" in t for t in by_level["Advanced"])
    assert any("omelette" in t for t in by_level["Intermediate"])
    lima = load_prompts("lima_examples")
    texts = [p.prompt for p in lima]
    assert texts[0] == "What is reinforcement learning?" and "black hole singularity" in texts[1]
    assert len(lima) > 2
    assert len({p.id for p in lima}) == len(lima)


def test_every_config_names_a_prompt_set_that_loads():
    from qlora_lab.config import load_config

    for path in CONFIGS.glob("*.yaml"):
        cfg = load_config(path)
        if cfg.generation.prompts:
            assert len(load_prompts(cfg.generation.prompts)) > 0


def test_a_path_works_and_ids_default(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("prompts:\n  - prompt: Hi there\n  - {id: x, level: Easy, prompt: '  Why?  '}\n")
    ps = load_prompts(f)
    assert ps.name == "mine"
    assert [(p.id, p.level, p.prompt) for p in ps] == [("p1", None, "Hi there"), ("x", "Easy", "Why?")]
    assert ps.levels == ("Easy",)


@pytest.mark.parametrize("text,needle", [
    ("prompts: []\n", "no prompts"),
    ("", "no prompts"),
    ("name: x\n", "no prompts"),
    ("prompts:\n  - {id: a, prompt: ''}\n", "prompts[1]: prompt"),
    ("prompts:\n  - {id: a, prompt: x}\n  - {id: a, prompt: y}\n", "used twice"),
    ("prompts:\n  - {id: a, text: x}\n", "unknown key 'text'"),
    ("prompts: [a\n", "invalid YAML"),
])
def test_bad_prompt_files_name_the_file(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        load_prompts(f)
    assert str(f) in str(e.value) and needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_name_lists_the_packaged_sets():
    with pytest.raises(UserError, match="oasst1_levels"):
        load_prompts("no_such_set")

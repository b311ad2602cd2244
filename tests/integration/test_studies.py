"""The studies' one code path (studies.py): what the notebooks and scripts/reproduce_studies.sh run."""
from __future__ import annotations

import json

from .conftest import background, run_cli


@background
def offline_study(tmp, env):
    """(study folder, work folder, CompletedProcess) of `qlora-lab study llama2_7b_lima --offline`, in the
    background lane (conftest.py)."""
    out, work = tmp / "study", tmp / "work"
    tiny = ["model.random_init=tiny-llama", "data.max_length=128", "data.eval_size=4", "generation.max_new_tokens=4",
            "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1", "train.save_steps=100"]
    r = run_cli("study", "llama2_7b_lima", "-o", out, "--work-dir", work, "--offline", "--steps", "2",
                "--memory-budget", "15", "--budget-steps", "1", "--no-progress", "--gpus", "0,1",
                *sum((["--set", s] for s in tiny), []), base_env=env)
    return out, work, r


def test_offline_study_through_the_cli_with_a_memory_budget_run(offline_study):
    """Synthetic LIMA of the real size through the real pipeline, both arms and a budget run, each
    in its own process; the study folder records what each took and holds no weights."""
    out, work, r = offline_study
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "summary.json").read_text())
    assert set(doc["measured"]) == {"llama2_7b_lima_qlora", "llama2_7b_lima_lora", "llama2_7b_lima_qlora-budget15"}
    for name, m in doc["measured"].items():
        stats = json.loads((work / "llama2_7b_lima" / name / "data_stats.json").read_text())
        # LIMA's 1,000 + 30 multi-turn rows, 4 held out; at max_length 128 some answers are cut away
        assert m["train_conversations"] == stats["n_train"] == 1026 - stats["dropped_truncated"], name
        assert m["tokens_trained"] > 0 and m["wall_time_s"] > 0 and m["status"] == "completed"
    assert doc["measured"]["llama2_7b_lima_qlora-budget15"]["steps"] == 1
    assert "synthetic corpora" in doc["offline_data"] and "gibberish" in doc["title"]
    table = (out / "table.md").read_text()
    assert "llama2_7b_lima_qlora" in table and "llama2_7b_lima_lora" in table and "budget15" not in table
    assert (out / "loss.png").is_file() and not list(out.rglob("*.safetensors"))
    assert (work / "llama2_7b_lima" / "data" / "lima.jsonl").is_file()
    # --gpus 0,1: the three runs side by side, two at a time, and the tables say how the study departed
    assert "[llama2_7b_lima_lora] " in r.stderr and "[llama2_7b_lima_qlora-budget15] " in r.stderr
    assert "2 steps instead of the config's 300" in table and "side by side" in table

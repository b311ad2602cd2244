"""The studies' settings (studies.py). A whole offline study through the CLI: tests/integration/test_studies.py."""
from __future__ import annotations

import pytest

from qlora_lab import studies
from qlora_lab.errors import UserError

from .conftest import CONFIGS
from .test_report import gen_rows, make_run


def test_offline_runs_each_config_as_a_random_weight_model_of_its_shape():
    assert studies.offline_overrides(CONFIGS / "falcon7b_oasst1_qlora.yaml")[:2] == [
        "model.name_or_path=null", "model.random_init=falcon-7b"]
    assert "model.random_init=llama2-7b" in studies.offline_overrides(CONFIGS / "llama2_7b_lima_lora.yaml")
    with pytest.raises(UserError, match="unknown study"):
        studies.spec("gpt2_wikitext")


def test_runs_share_the_gpus_one_job_per_gpu(monkeypatch, tmp_path):
    """train_all: each job gets a GPU no other running job holds; results come back in the jobs' order."""
    import threading
    import time

    held, lock, seen = set(), threading.Lock(), []

    def fake(config, sets, out_dir, gpu=None, prefix=""):
        with lock:
            assert gpu not in held, f"GPU {gpu} given twice"
            held.add(gpu)
            seen.append((out_dir.name, gpu))
        time.sleep(0.05)
        with lock:
            held.discard(gpu)
        if out_dir.name == "bad":
            raise UserError("bad failed")
        return out_dir

    monkeypatch.setattr(studies, "train_in_own_process", fake)
    jobs = [studies.Job(tmp_path / "c.yaml", (), tmp_path / f"r{i}") for i in range(5)]
    assert studies.train_all(jobs, gpus=[3, 5]) == [j.out_dir for j in jobs]
    assert {g for _, g in seen} == {3, 5} and len(seen) == 5
    seen.clear()
    assert studies.train_all(jobs[:2], gpus=[7]) == [j.out_dir for j in jobs[:2]] and {g for _, g in seen} == {7}
    seen.clear()
    with pytest.raises(UserError, match="bad failed"):  # raised once every other job has finished
        studies.train_all([studies.Job(tmp_path / "c.yaml", (), tmp_path / "bad"), *jobs[:3]], gpus=[0, 1])
    assert len(seen) == 4


@pytest.mark.parametrize("bad", ["0,x", "1,1", "-1"])
def test_bad_gpu_list_is_one_line(bad, capsys):
    from qlora_lab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["study", "llama2_7b_lima", "-o", "x", "--gpus", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--gpus" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_write_and_load_study(tmp_path):
    a, b = make_run(tmp_path / "runs", "q", "qlora"), make_run(tmp_path / "runs", "l", "lora")
    out = tmp_path / "study"
    absent = studies.load_study(out)
    assert not absent.available and "No results committed yet" in absent._repr_markdown_()
    written = studies.write_study(out, [a, b], gen_rows(models=("base", "q", "l")), prompts="oasst1_levels",
                                  title="Q vs L")
    assert {"table.md", "table.html", "summary.json", "generations.jsonl",
            "metrics/q.jsonl", "metrics/l.jsonl"} <= set(written)
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temp files
    s = studies.load_study(out)
    assert s.available and set(s.metrics) == {"q", "l"}
    assert "H100" in s.message and "tiny-llama with random weights (tiny twin" in s.message
    assert "QLoRA fine-tune" in s.message and "LoRA fine-tune" in s.message and "real shape" not in s.message
    caption = "The base model (tiny-llama) has random weights"
    assert f"*{caption}" in s.markdown and f"<caption>{caption}" in s.html
    assert s.summary["runs"]["q"]["method"] == "qlora"
    assert "| Easy | What is the capital of France? |" in s.markdown
    assert s._repr_html_().count("<tr>") >= 9

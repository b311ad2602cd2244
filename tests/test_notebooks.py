"""Every notebook executes on the CPU (papermill, real kernel): with its defaults (rendering assets/, which
may hold no results yet) and with tiny parameters that train for a few steps."""
from __future__ import annotations

import json

import pytest

from .conftest import ROOT
from .test_report import gen_rows, make_run

NOTEBOOKS = ROOT / "notebooks"
TINY = ["train.max_steps=2", "train.eval_steps=2", "train.save_steps=2", "generation.max_new_tokens=4",
        "logging.report_to=none"]


def execute(name, tmp_path, **params):
    papermill = pytest.importorskip("papermill")
    out = tmp_path / name
    papermill.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=params, cwd=str(ROOT),
                               kernel_name="python3", progress_bar=False, request_save_on_cell_execute=False)
    nb = json.loads(out.read_text())
    texts = []
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            data = o.get("data", {})
            texts.append("".join(o.get("text", "")) + "".join(data.get("text/markdown", ""))
                         + "".join(data.get("text/html", "")) + ("<PNG>" if "image/png" in data else ""))
    return nb, "\n".join(texts)


def test_notebooks_follow_the_layout():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["01_falcon7b_oasst1_qlora.ipynb", "02_llama2_lima_qlora_vs_lora.ipynb", "03_loss_curves.ipynb"]
    for n in names:
        nb = json.loads((NOTEBOOKS / n).read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert "google.colab" in "".join(code[0]["source"])  # Colab set-up first, guarded
        params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(params) == 1 and "RUN_TRAINING = False" in "".join(params[0]["source"])
        # Committed rendered (from assets/), so GitHub shows the results: no errors, no machine paths.
        outs = json.dumps([c.get("outputs", []) for c in code])
        assert '"output_type": "error"' not in outs, f"{n}: committed with an error output"
        assert "/work/" not in outs and "/tmp/" not in outs and "/home/" not in outs, f"{n}: machine path in outputs"
        assert "def " not in "".join("".join(c["source"]) for c in code), f"{n}: logic belongs in the package"


@pytest.mark.parametrize("name", ["01_falcon7b_oasst1_qlora.ipynb", "02_llama2_lima_qlora_vs_lora.ipynb"])
def test_study_notebook_renders_committed_assets_or_says_none(name, tmp_path):
    from qlora_lab.report import load_study

    nb, text = execute(name, tmp_path)
    study_dir = ROOT / "assets" / "studies" / ("falcon7b_oasst1" if name.startswith("01") else "llama2_7b_lima")
    if load_study(study_dir).available:
        assert "Produced by:" in text and "<h3>Answers</h3>" in text
    else:
        assert "No results committed yet" in text and "<h3>Answers</h3>" not in text


def test_falcon_notebook_trains_a_tiny_twin(tmp_path):
    nb, text = execute("01_falcon7b_oasst1_qlora.ipynb", tmp_path, CONFIGS=["configs/tiny_falcon_qlora.yaml"],
                       OVERRIDES=TINY, RUN_TRAINING=True, STUDY_DIR=str(tmp_path / "study"),
                       RUNS_DIR=str(tmp_path / "runs"))
    assert "tiny_falcon_qlora: QLORA fine-tune of tiny-falcon with random weights" in text
    assert "<h3>Answers</h3>" in text and "What is the capital of France?" in text and "<PNG>" in text
    assert (tmp_path / "study" / "loss.svg").is_file() and (tmp_path / "runs" / "tiny_falcon_qlora" / "adapter").is_dir()
    assert not list((tmp_path / "study").rglob("*.safetensors"))  # no weights in a study folder


def test_lima_notebook_trains_qlora_and_lora_twins(tmp_path):
    nb, text = execute("02_llama2_lima_qlora_vs_lora.ipynb", tmp_path,
                       CONFIGS=["configs/tiny_llama_qlora.yaml", "configs/tiny_llama_lora.yaml"], OVERRIDES=TINY,
                       RUN_TRAINING=True, STUDY_DIR=str(tmp_path / "study"), RUNS_DIR=str(tmp_path / "runs"))
    assert "<th>base</th><th>tiny_llama_qlora</th><th>tiny_llama_lora</th>" in text
    assert "What is reinforcement learning?" in text


def test_loss_curve_notebook(tmp_path):
    from qlora_lab.report import write_study

    a, b = make_run(tmp_path / "runs", "q", "qlora"), make_run(tmp_path / "runs", "l", "lora")
    write_study(tmp_path / "study", [a], gen_rows(models=("base", "q")))
    nb, text = execute("03_loss_curves.ipynb", tmp_path, STUDY_DIRS=[str(tmp_path / "study"), str(tmp_path / "none")],
                       RUNS=[str(b)], X_AXIS="tokens")
    assert "<PNG>" in text and "No results committed yet" in text and "Produced by" in text
    nb, text = execute("03_loss_curves.ipynb", tmp_path, STUDY_DIRS=[str(tmp_path / "none")])
    assert "Nothing to plot yet" in text and "<PNG>" not in text

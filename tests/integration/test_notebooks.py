"""Every notebook executes on the CPU (papermill, real kernel): with its defaults (rendering assets/, which
may hold no results yet) and with tiny parameters that train for a few steps."""
from __future__ import annotations

import json
import os

import pytest

from .conftest import ROOT
from ..unit.test_report import gen_rows, make_run

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
    from qlora_lab.studies import load_study

    nb, text = execute(name, tmp_path)
    study_dir = ROOT / "assets" / "studies" / ("falcon7b_oasst1" if name.startswith("01") else "llama2_7b_lima")
    if load_study(study_dir).available:
        assert "Produced by:" in text
        # The answers table is shown exactly when the study recorded answers.
        assert ("<h3>Answers</h3>" in text) == (study_dir / "generations.jsonl").is_file()
    else:
        assert "No results committed yet" in text and "<h3>Answers</h3>" not in text


def test_falcon_notebook_trains_a_tiny_twin(tmp_path):
    nb, text = execute("01_falcon7b_oasst1_qlora.ipynb", tmp_path, CONFIGS=["configs/tiny_falcon_qlora.yaml"],
                       OVERRIDES=TINY, RUN_TRAINING=True, STUDY_DIR=str(tmp_path / "study"),
                       WORK_DIR=str(tmp_path / "runs"))
    assert "tiny_falcon_qlora: QLoRA fine-tune of tiny-falcon with random weights (tiny twin" in text
    assert "<h3>Answers</h3>" in text and "What is the capital of France?" in text and "<PNG>" in text
    assert (tmp_path / "study" / "loss.svg").is_file() and (tmp_path / "runs" / "falcon7b_oasst1" / "tiny_falcon_qlora" / "adapter").is_dir()
    assert not list((tmp_path / "study").rglob("*.safetensors"))  # no weights in a study folder


def test_lima_notebook_trains_qlora_and_lora_twins(tmp_path):
    nb, text = execute("02_llama2_lima_qlora_vs_lora.ipynb", tmp_path,
                       CONFIGS=["configs/tiny_llama_qlora.yaml", "configs/tiny_llama_lora.yaml"], OVERRIDES=TINY,
                       RUN_TRAINING=True, STUDY_DIR=str(tmp_path / "study"), WORK_DIR=str(tmp_path / "runs"))
    assert "<th>base</th><th>tiny_llama_qlora</th><th>tiny_llama_lora</th>" in text
    assert "What is reinforcement learning?" in text
    # The measurements a study records for every arm (train conversations, tokens, time, memory).
    measured = json.loads((tmp_path / "study" / "summary.json").read_text())["measured"]
    assert set(measured) == {"tiny_llama_qlora", "tiny_llama_lora"}
    for m in measured.values():
        assert m["train_conversations"] > 0 and m["tokens_trained"] > 0 and m["wall_time_s"] > 0
        assert m["status"] == "completed" and m["gpu"]


def test_loss_curve_notebook(tmp_path):
    from qlora_lab.studies import write_study

    a, b = make_run(tmp_path / "runs", "q", "qlora"), make_run(tmp_path / "runs", "l", "lora")
    write_study(tmp_path / "study", [a], gen_rows(models=("base", "q")))
    nb, text = execute("03_loss_curves.ipynb", tmp_path, STUDY_DIRS=[str(tmp_path / "study"), str(tmp_path / "none")],
                       RUNS=[str(b)], X_AXIS="tokens")
    assert "<PNG>" in text and "No results committed yet" in text and "Produced by" in text
    nb, text = execute("03_loss_curves.ipynb", tmp_path, STUDY_DIRS=[str(tmp_path / "none")])
    assert "Nothing to plot yet" in text and "<PNG>" not in text


def _colab_cell() -> str:
    cells = [[c for c in json.loads((NOTEBOOKS / n).read_text())["cells"] if c["cell_type"] == "code"][0]
             for n in sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))]
    sources = {"".join(c["source"]) for c in cells}
    assert len(sources) == 1, "every notebook starts with the same Colab cell"
    return sources.pop()


# Stands in for `python -m pip install`: records its arguments and the constraints file it was given.
_PIP = """import json, sys
args = sys.argv[1:]
c = args[args.index("-c") + 1] if "-c" in args else None
with open(sys.argv[0] + ".calls", "a") as f:
    f.write(json.dumps({"args": args, "constraints": open(c).read() if c else None}) + "\\n")
"""


def test_colab_cell_imports_the_package_in_the_same_kernel_and_runs_twice(tmp_path, monkeypatch):
    """The first cell, run twice in one fresh kernel that looks like Colab (a stand-in google.colab module),
    cloning this repo's committed HEAD instead of GitHub, with pip replaced by a recorder (offline). Then
    `import qlora_lab` in the same kernel must find the clone's code, with no restart."""
    import shlex
    import subprocess
    import sys

    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: nothing to clone")
    fake = tmp_path / "fake"
    (fake / "google" / "colab").mkdir(parents=True)  # a namespace `google`, as the real one beside protobuf
    (fake / "google" / "colab" / "__init__.py").write_text("")
    pip = tmp_path / "pip.py"
    pip.write_text(_PIP)
    content = tmp_path / "content"
    content.mkdir()
    clone = content / "qlora-lab"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("QLORA_LAB_REPO", str(ROOT))
    monkeypatch.setenv("QLORA_LAB_DIR", str(clone))
    monkeypatch.setenv("QLORA_LAB_PIP", shlex.join([sys.executable, str(pip)]))
    cell = _colab_cell()
    check = "import os, qlora_lab\nprint(qlora_lab.__file__)\nprint(os.getcwd())"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell), nbformat.v4.new_code_cell(cell),
                                         nbformat.v4.new_code_cell(check)])
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(content)}}).execute()
    out = "".join(o.get("text", "") for o in nb.cells[2].outputs).split()
    assert out[0].startswith(str(clone / "src" / "qlora_lab")), out  # the clone's code, in the same kernel
    assert out[1] == str(clone)                                       # paths relative to the repo root work
    calls = [json.loads(line) for line in (tmp_path / "pip.py.calls").read_text().splitlines()]
    assert len(calls) == 4  # two runs: requirements, then the package, each time
    for reqs, package in (calls[:2], calls[2:]):
        assert reqs["args"][:2] == ["-r", str(clone / "requirements-colab.txt")]
        assert "torch==" in reqs["constraints"] and "ipykernel==" in reqs["constraints"]
        assert package["args"] == ["--no-deps", str(clone)]  # not editable: no new interpreter needed


def test_colab_requirements_add_only_what_colab_lacks():
    """requirements-colab.txt: the package's own ranges, never a package Colab's runtime is built on."""
    import re
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = {re.match(r"[\w-]+", d).group(): d for d in deps["dependencies"] + deps["optional-dependencies"]["gpu"]}
    lines = [l for l in (ROOT / "requirements-colab.txt").read_text().splitlines() if l and not l.startswith("#")]
    names = [re.match(r"[\w-]+", l).group() for l in lines]
    assert not set(names) & {"torch", "numpy", "pandas", "matplotlib", "pyyaml", "ipykernel"}
    assert {"peft", "bitsandbytes", "trl", "transformers"} <= set(names)
    assert all(l == ranges[n] for l, n in zip(lines, names)), "a range differs from pyproject.toml"

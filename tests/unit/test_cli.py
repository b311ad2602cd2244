"""What a new user meets first: --version, help texts, and mistakes caught before anything is written."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import qlora_lab
from qlora_lab import cli
from qlora_lab.cli import build_parser, main

from .conftest import CONFIGS, FIXTURES, ROOT, run_cli

TRAIN = ["train", str(CONFIGS / "tiny_llama_qlora.yaml")]


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"qlora-lab {qlora_lab.__version__}"


VERBS = ["train", "make-model", "config", "data", "study", "generate", "compare", "plot", "bench", "demo", "merge",
         "export-gguf"]


def test_every_verb_and_data_command_has_help(capsys):
    top = _help(capsys)
    assert top.startswith("usage: qlora-lab [-h] [--version] VERB ...") and all(v in top for v in VERBS)
    for verb in VERBS:
        assert _help(capsys, verb).startswith(f"usage: qlora-lab {verb} "), verb
    for sub in ("oasst1", "lima", "stats", "synth"):
        assert _help(capsys, "data", sub).startswith(f"usage: qlora-lab data {sub} "), sub


def test_one_registry_lists_every_verb_module_in_help_order():
    """A verb module left out of cli.VERBS (or renamed) fails here, not by vanishing from the CLI."""
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    assert list(sub.choices) == VERBS
    modules = {p.stem for p in Path(cli.__file__).parent.glob("*.py")} - {"__init__", "__main__", "args"}
    assert {m.__name__.rsplit(".", 1)[1] for m in cli.VERBS} == modules


def test_set_is_declared_once_with_each_verb_s_help(capsys):
    for verb, metavar in (("train", "SECTION.KEY=VALUE"), ("generate", "generation.KEY=VALUE"),
                          ("study", "SECTION.KEY=VALUE"), ("bench", "SECTION.KEY=VALUE")):
        assert f"--set {metavar}" in _help(capsys, verb), verb
    args = build_parser().parse_args(["study", "llama2_7b_lima", "-o", "x", "--set", "a.b=1", "--set", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"]
    assert "--set data.format=lima_eot" in _help(capsys, "data", "stats")


def test_console_script_is_cli_main():
    """pyproject's `qlora-lab` entry point resolves to the function tests call in process."""
    import importlib
    import tomllib

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["qlora-lab"]
    module, _, name = target.partition(":")
    assert getattr(importlib.import_module(module), name) is main


def test_python_m_entry_runs_a_verb():
    """The real entry in a child process (`python -m qlora_lab.cli`, as studies.py and launchers start it)."""
    r = run_cli("config", CONFIGS / "tiny_llama_qlora.yaml", "--set", "train.max_steps=3")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert yaml.safe_load(r.stdout)["train"]["max_steps"] == 3


def test_every_argument_of_make_model_and_plot_title_has_help(capsys):
    text = _help(capsys, "make-model")
    assert "out_dir folder to write" in text and "seed of the random weights" in text
    assert "real architecture and shape" not in text  # the tiny presets are not a real shape
    assert "figure title" in _help(capsys, "plot")


def test_train_on_a_folder_says_it_is_a_directory(capsys):
    assert main(["train", str(CONFIGS)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a directory" in err and "tiny_llama_qlora.yaml" in err


@pytest.mark.parametrize("key, value, needle", [
    ("data.train_file", "{tmp}/nope.jsonl", "not found"),
    ("data.train_file", str(FIXTURES / "bad_empty.jsonl"), "empty file"),
    ("data.eval_file", "{tmp}/nope.jsonl", "data.eval_file"),
])
def test_bad_data_file_is_one_line_before_any_run_folder(tmp_path, capsys, key, value, needle):
    run = tmp_path / "runs" / "new"
    rc = main([*TRAIN, "--output-dir", str(run), "--set", f"{key}={value.format(tmp=tmp_path)}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert "plan:" not in err  # found before the plan, the model or the data are looked at
    assert not run.exists() and not (tmp_path / "runs").exists()  # nothing half-made left behind

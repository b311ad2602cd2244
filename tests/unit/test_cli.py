"""What a new user meets first: --version, help texts, and mistakes caught before anything is written."""
from __future__ import annotations

import pytest

import qlora_lab
from qlora_lab.cli import build_parser, main

from .conftest import CONFIGS, FIXTURES

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

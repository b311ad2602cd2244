"""Files the package writes get the mode a plain `open` gives (0o666 less the umask), not mkstemp's 0o600."""
from __future__ import annotations

import json
import os
import stat

import pytest

from qlora_lab import fileio

from .test_report import gen_rows, make_run


@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)
    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_write_respects_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert _mode(fileio.atomic_write(tmp_path / "a.txt", "text")) == 0o666 & ~mask
    assert _mode(fileio.atomic_write(tmp_path / "b.bin", b"\x00")) == 0o666 & ~mask
    (tmp_path / "c.txt").write_text("old")
    os.chmod(tmp_path / "c.txt", 0o600)
    assert _mode(fileio.atomic_write(tmp_path / "c.txt", "new")) == 0o666 & ~mask  # as a rewrite with open()


def test_tables_plots_and_summaries_are_readable_by_others(tmp_path, umask):
    from qlora_lab.cli import main

    umask(0o022)
    a = make_run(tmp_path / "runs", "q", "qlora")
    g = tmp_path / "g.jsonl"
    g.write_text("".join(json.dumps(r) + "\n" for r in gen_rows(models=("base", "q"))))
    assert main(["compare", str(a), "--generations", str(g), "--prompts", "oasst1_levels",
                 "-o", str(tmp_path / "cmp")]) == 0
    assert main(["plot", str(a), "-o", str(tmp_path / "cmp" / "loss.png")]) == 0
    for name in ("table.html", "table.md", "summary.json", "generations.jsonl", "loss.png", "loss.svg"):
        assert _mode(tmp_path / "cmp" / name) == 0o644, name

"""Data: OASST1 message trees -> best conversation paths, LIMA, prompt formats, labels, packing.

    oasst1.py        message trees -> one best-ranked conversation per tree
    lima.py          LIMA rows -> conversations (prompt-only test rows kept, marked)
    conversation.py  the prepared format both write and training reads
    formats.py       prompt formats, tokenization, response-only labels
    dataset.py       prepared file -> tokenized train / eval datasets (`load_datasets`)
    packing.py       batch collation: right-padding or padding-free packing
    stats.py         counts and token-length histogram (`qlora-lab data stats`)
    synthetic.py     pseudo-word OASST1 trees / LIMA rows of the real size and lengths (`data synth`)
    jsonl.py         strict line-numbered reading, atomic writing
"""
from __future__ import annotations


def load_datasets(cfg, tokenizer):
    """(train Dataset, eval Dataset or None, stats dict); see dataset.load_datasets."""
    from .dataset import load_datasets as _load

    return _load(cfg, tokenizer)


def check_data_files(cfg) -> None:
    """Raise DataError unless data.train_file (and data.eval_file, if set) exist and hold a record."""
    from .dataset import check_data_files as _check

    _check(cfg)


def prepare_oasst1(source, output, langs=None, split: str = "train", keep_unanswered_prompt: bool = False):
    """Notebook entry: write OASST1 best paths to `output`; returns the counts (see oasst1.py)."""
    from .oasst1 import prepare_oasst1 as _prepare

    return _prepare(source, output, langs=langs, split=split, keep_unanswered_prompt=keep_unanswered_prompt)


def prepare_lima(source, output, split: str = "train"):
    """Notebook entry: write LIMA conversations to `output`; returns the counts (see lima.py)."""
    from .lima import prepare_lima as _prepare

    return _prepare(source, output, split=split)


__all__ = ["check_data_files", "load_datasets", "prepare_oasst1", "prepare_lima"]

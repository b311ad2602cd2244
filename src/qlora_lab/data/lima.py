"""LIMA (GAIR/lima) -> the prepared format.

Each row is ``{"conversations": [user, assistant, user, ...], "source": ...}``; turns alternate by
position, starting with the user. LIMA's test split has prompts only (one user turn): such rows are
kept, marked ``prompt_only`` so that generation can use them and training skips and counts them.
The `text` field joins the turns with `` [EOT] `` as in the LIMA / Llama-2 study.
"""
from __future__ import annotations

from dataclasses import dataclass
from ..errors import DataError, where
from .conversation import ROLES, eot_text, record
from .jsonl import field, input_rows, write_jsonl_atomic

HUB_ID = "GAIR/lima"


@dataclass
class Counts:
    rows_read: int = 0
    written: int = 0
    multi_turn: int = 0
    prompt_only: int = 0

    def summary(self) -> str:
        return (f"lima: {self.rows_read} rows read, {self.written} conversations written "
                f"({self.multi_turn} multi-turn, {self.prompt_only} prompt-only, which training skips)")


def conversations(source, split: str = "train") -> tuple[list[dict], Counts]:
    label, rows = input_rows(source, split)
    out, counts = [], Counts()
    for line, obj in rows:
        counts.rows_read += 1
        turns = field(obj, "conversations", list, label, line)
        if not turns:
            raise DataError(f"{where(label, line, 'conversations')}: empty conversation")
        for i, t in enumerate(turns):
            if not isinstance(t, str):
                raise DataError(f"{where(label, line, f'conversations[{i}]')}: must be a string "
                                f"(turns alternate user, assistant by position)")
        field(obj, "source", str, label, line, required=False)
        msgs = [{"role": ROLES[i % 2], "content": t} for i, t in enumerate(turns)]
        row = record(f"lima-{counts.rows_read - 1}", msgs, eot_text(msgs))
        counts.multi_turn += len(turns) > 2
        counts.prompt_only += bool(row.get("prompt_only"))
        out.append(row)
    counts.written = len(out)
    if not out:  # only a hub split can be empty: read_jsonl rejects an empty file
        raise DataError(f"{label}: no rows")
    return out, counts


def prepare_lima(source, output, split: str = "train") -> Counts:
    """Convert LIMA JSONL (or the hub dataset) to the prepared format at `output`, atomically."""
    rows, counts = conversations(source, split=split)
    write_jsonl_atomic(output, rows)
    return counts

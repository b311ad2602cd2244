"""Prompt sets: the questions a model is asked in `generate` and `compare`.

A prompt set is a YAML file::

    name: oasst1_levels                    # optional; default: the file name
    description: ...                       # optional
    levels: [Easy, Intermediate, Advanced] # optional display order of the levels
    prompts:
      - id: capital-of-france              # unique; default: p1, p2, ...
        level: Easy                        # optional
        prompt: What is the capital of France?
        expected: Paris.                   # optional: shown beside the answers in tables

The study sets ship with the package (``resources/prompts/``) and are named by their bare name
(``oasst1_levels``, ``lima_examples``); any other value is read as a path to a YAML file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from .errors import UserError, where
from .fileio import resource

_TOP_KEYS = {"name", "description", "levels", "prompts"}
_PROMPT_KEYS = {"id", "level", "prompt", "expected"}


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    level: Optional[str] = None
    expected: Optional[str] = None  # the answer a table shows beside the models' (the demo's memorized one)


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[Prompt, ...]
    source: str
    description: str = ""
    levels: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    def by_id(self) -> dict[str, Prompt]:
        return {p.id: p for p in self.prompts}


def packaged() -> list[str]:
    """Names of the prompt sets shipped with the package."""
    d = resource("prompts")
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml"))


def resolve(name_or_path) -> Path:
    """Path of a prompt set: a packaged name (``oasst1_levels``) or a path to a YAML file."""
    s = str(name_or_path)
    if s in packaged():
        return resource("prompts", f"{s}.yaml")
    p = Path(s)
    if p.is_file():
        return p
    raise UserError(f"{s}: prompt set not found; give a YAML file or one of: {', '.join(packaged())}")


def load_prompts(name_or_path) -> PromptSet:
    """Read and validate a prompt set. Raises UserError naming the file (and line) on bad input."""
    if isinstance(name_or_path, PromptSet):
        return name_or_path
    path = resolve(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{where(path, mark.line + 1 if mark else None)}: invalid YAML: "
                        f"{getattr(e, 'problem', None) or e}") from None
    if raw is None or (isinstance(raw, dict) and not raw.get("prompts")):
        raise UserError(f"{path}: no prompts; expected `prompts: [{{id, level, prompt}}, ...]`")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a prompt set is a mapping with a `prompts:` list")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise UserError(f"{path}: unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    items = raw["prompts"]
    if not isinstance(items, list):
        raise UserError(f"{path}: prompts: must be a list of {{id, level, prompt}}")
    prompts, seen = [], set()
    for i, item in enumerate(items, 1):
        at = f"{path}: prompts[{i}]"
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict):
            raise UserError(f"{at}: must be a mapping with id, level, prompt")
        bad = set(item) - _PROMPT_KEYS
        if bad:
            raise UserError(f"{at}: unknown key {sorted(bad)[0]!r}; allowed: id, level, prompt, expected")
        text = item.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{at}: prompt: must be a non-empty string")
        pid = str(item.get("id") or f"p{i}")
        if pid in seen:
            raise UserError(f"{at}: id {pid!r} is used twice")
        seen.add(pid)
        level, expected = item.get("level"), item.get("expected")
        if expected is not None and not isinstance(expected, str):
            raise UserError(f"{at}: expected: must be a string (the answer shown beside the models')")
        prompts.append(Prompt(id=pid, prompt=text.strip(), level=None if level is None else str(level),
                              expected=expected))
    levels = raw.get("levels") or []
    if not isinstance(levels, list):
        raise UserError(f"{path}: levels: must be a list of level names")
    levels = [str(x) for x in levels]
    for p in prompts:
        if p.level is not None and p.level not in levels:
            levels.append(p.level)
    return PromptSet(name=str(raw.get("name") or path.stem), prompts=tuple(prompts), source=str(path),
                     description=str(raw.get("description") or ""), levels=tuple(levels))

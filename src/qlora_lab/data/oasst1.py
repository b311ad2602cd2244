"""OASST1 message trees -> one conversation per tree: the best-ranked path from the root prompt.

The rule, exactly (one conversation per ready tree; the published Guanaco subset,
timdettmers/openassistant-guanaco, has 9,846 training conversations, and the counts this command
prints on the oasst1 train split show how ours compare):

* a deleted message is dropped with its whole subtree; where `tree_state` is present, only trees in
  state ``ready_for_export`` are used;
* from the root prompt, repeatedly follow the child with the lowest `rank` (0 = best); unranked
  children come after all ranked ones; ties go to the earliest `created_date`, then the smallest
  `message_id`. `created_date` is optional (some export versions have none): among siblings that do
  not all carry one, the export's order (line order in the flat table, `replies` order in the nested
  export, which OpenAssistant writes sorted by rank, unranked last) replaces the date. Stop at a
  message without live children;
* a path ending on a prompter message loses that message (nothing answers it, so it trains nothing
  under answer-only loss); `keep_unanswered_prompt` keeps it, as the published Guanaco subset does
  (its text then ends with ``### Human: ...``); a tree without any live assistant reply yields nothing
  either way;
* `langs` keeps only trees whose root prompt is in one of those languages.

Fields OpenAssistant's export schema allows to be null are accepted as null: `deleted` (= not
deleted), `rank` (= unranked), `lang` (matches no `langs`), `tree_state` (= no state given, tree
used), `created_date`, `review_count`, `replies`; `review_result` is not read. The fields the rule
needs (`message_id`, `role`, `text`; in the flat table also `parent_id` and `message_tree_id`, and the
`rank`, `deleted` and `lang` columns, null allowed) must be there, or the error names file:line: field.

Two input forms, gzipped or not (detected by content): the flat message table (one message per
line, as in the hub dataset ``OpenAssistant/oasst1``) and the nested export (``*.trees.jsonl``: one
tree per line, ``prompt`` with nested ``replies``). A hub id loads the flat table with `datasets`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field as dc_field
from datetime import datetime, timezone
from typing import Iterable, Optional, Sequence

from ..errors import DataError, where
from .conversation import guanaco_text, record
from .jsonl import field, input_rows, write_jsonl_atomic

HUB_ID = "OpenAssistant/oasst1"
READY = "ready_for_export"
_ROLE = {"prompter": "user", "assistant": "assistant"}
_UNRANKED = float("inf")  # sorts unranked children after every ranked one


@dataclass
class Message:
    id: str
    parent: Optional[str]
    tree: str
    role: str  # prompter | assistant
    text: str
    lang: Optional[str]
    rank: Optional[float]
    deleted: bool
    created: Optional[datetime]
    order: int  # position in the input (line order; nested replies in their listed order)
    line: int
    field_prefix: str = ""  # where the message sits inside a nested tree line, for error messages
    children: list = dc_field(default_factory=list)


@dataclass
class Counts:
    """What happened to each tree; printed at the end of `qlora-lab data oasst1`."""

    trees_read: int = 0
    written: int = 0
    dropped: Counter = dc_field(default_factory=Counter)
    ended_on_prompter: int = 0
    kept_unanswered_prompt: bool = False

    def summary(self) -> str:
        s = f"oasst1: {self.trees_read} trees read, {self.written} conversations written"
        total = sum(self.dropped.values())
        if total:
            parts = ", ".join(f"{why} {n}" for why, n in self.dropped.items() if n)
            s += f"; dropped {total} trees ({parts})"
        else:
            s += "; dropped 0 trees"
        what = "kept" if self.kept_unanswered_prompt else "dropped"
        s += f"; {self.ended_on_prompter} paths ended on a prompter message (that message {what})"
        return s


# ----------------------------------------------------------------------------- reading

def _parse_date(value: str, path, line, label) -> datetime:
    try:
        d = datetime.fromisoformat(value)
    except ValueError:
        raise DataError(f"{where(path, line, label)}: not an ISO 8601 date (got {value!r})") from None
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


def _message(obj: dict, path, line, *, prefix: str, parent, tree, flat: bool, order: int) -> Message:
    def f(name, types, **kw):
        return field(obj, name, types, path, line, label=prefix + name, **kw)

    role = f("role", str)
    if role not in _ROLE:
        raise DataError(f"{where(path, line, prefix + 'role')}: must be prompter or assistant (got {role!r})")
    # The flat table has every column (null where unknown); the nested export may leave fields out.
    rank = f("rank", (int, float), nullable=True, required=flat)
    date = f("created_date", str, nullable=True, required=False)
    created = None if date is None else _parse_date(date, path, line, prefix + "created_date")
    f("review_count", int, nullable=True, required=False)
    return Message(
        id=f("message_id", str), parent=parent, tree=tree, role=role, text=f("text", str),
        lang=f("lang", str, nullable=True, required=flat), rank=rank,
        deleted=f("deleted", bool, nullable=True, required=flat) is True, created=created,
        order=order, line=line, field_prefix=prefix)


def _from_flat(path, first: tuple[int, dict], rows) -> tuple[list[Message], dict]:
    messages, states = [], {}
    for line, obj in _chain(first, rows):
        if "prompt" in obj and "message_id" not in obj:
            raise DataError(f"{where(path, line, 'prompt')}: a nested tree in a flat message table "
                            f"(line 1 was a message)")
        tree = field(obj, "message_tree_id", str, path, line)
        parent = field(obj, "parent_id", str, path, line, nullable=True)
        state = field(obj, "tree_state", str, path, line, nullable=True, required=False)
        if state is not None:
            states.setdefault(tree, state)
        messages.append(_message(obj, path, line, prefix="", parent=parent, tree=tree, flat=True,
                                 order=len(messages)))
    return messages, states


def _from_trees(path, first: tuple[int, dict], rows) -> tuple[list[Message], dict]:
    messages, states = [], {}
    for line, obj in _chain(first, rows):
        tree = field(obj, "message_tree_id", str, path, line)
        state = field(obj, "tree_state", str, path, line, nullable=True, required=False)
        if state is not None:
            states.setdefault(tree, state)
        prompt = field(obj, "prompt", dict, path, line)
        stack = [(prompt, "prompt.", None)]
        while stack:
            node, prefix, parent = stack.pop()
            # depth first, replies in their listed order: `order` keeps the export's sibling order
            m = _message(node, path, line, prefix=prefix, parent=parent, tree=tree, flat=False,
                         order=len(messages))
            messages.append(m)
            replies = field(node, "replies", list, path, line, label=prefix + "replies", nullable=True,
                            required=False) or []
            for i, child in reversed(list(enumerate(replies))):
                cp = f"{prefix}replies[{i}]"
                if not isinstance(child, dict):
                    raise DataError(f"{where(path, line, cp)}: must be a message object")
                stack.append((child, cp + ".", m.id))
    return messages, states


def _chain(first, rows):
    yield first
    yield from rows


def read_messages(source, split: str = "train") -> tuple[str, list[Message], dict]:
    """(label for messages, messages in input order, tree_state per tree where given)."""
    label, rows = input_rows(source, split)
    rows = iter(rows)
    try:
        first = next(rows)
    except StopIteration:  # read_jsonl raises on an empty file; a hub split can still be empty
        raise DataError(f"{label}: no records") from None
    line, obj = first
    for key, verb in (("conversations", "lima"), ("messages", "stats")):
        if key in obj and "message_id" not in obj and "prompt" not in obj:
            raise DataError(f"{where(label, line, key)}: this is not OASST1 data (no message_id or prompt); "
                            f"for this file use `qlora-lab data {verb}`")
    nested = "prompt" in obj and "message_id" not in obj
    reader = _from_trees if nested else _from_flat
    messages, states = reader(label, first, rows)
    return label, messages, states


# ----------------------------------------------------------------------------- trees

def build_trees(messages: Sequence[Message], label) -> dict[str, Message]:
    """Link children to parents and check the structure; returns {tree id: root}, in input order."""
    by_id: dict[str, Message] = {}
    for m in messages:
        if m.id in by_id:
            raise DataError(f"{where(label, m.line, m.field_prefix + 'message_id')}: duplicate id {m.id!r} "
                            f"(first at line {by_id[m.id].line})")
        by_id[m.id] = m
    roots: dict[str, Message] = {}
    order = list(dict.fromkeys(m.tree for m in messages))
    for m in messages:
        at = lambda name: where(label, m.line, m.field_prefix + name)  # noqa: E731
        if m.parent is None:
            if m.tree in roots:
                raise DataError(f"{at('parent_id')}: tree {m.tree!r} already has a root prompt "
                                f"(line {roots[m.tree].line}); only the root has no parent")
            if m.role != "prompter":
                raise DataError(f"{at('role')}: a tree's root message must be a prompter (got {m.role})")
            roots[m.tree] = m
            continue
        parent = by_id.get(m.parent)
        if parent is None:
            raise DataError(f"{at('parent_id')}: no message with id {m.parent!r} in the input")
        if parent.tree != m.tree:
            raise DataError(f"{at('message_tree_id')}: {m.tree!r} differs from its parent's "
                            f"{parent.tree!r} (line {parent.line})")
        if parent.role == m.role:
            raise DataError(f"{at('role')}: roles must alternate, but this {m.role} message replies to "
                            f"another {parent.role} message (line {parent.line})")
        parent.children.append(m)
    # A tree without a root has all its messages on or below a cycle: reported here.
    _check_reachable(messages, roots, by_id, label)
    return {t: roots[t] for t in order}


def _check_reachable(messages, roots, by_id, label) -> None:
    """Every message must hang below a root; one that does not sits on or below a parent cycle."""
    seen = set()
    stack = list(roots.values())
    while stack:
        m = stack.pop()
        seen.add(m.id)
        stack.extend(m.children)
    stray = [m for m in messages if m.id not in seen]
    if not stray:
        return
    # Walk up from the first stray message until an id repeats: that loop is the cycle.
    m, path = stray[0], []
    while m.id not in path:
        path.append(m.id)
        m = by_id[m.parent]
    loop = path[path.index(m.id):]
    first = min((by_id[i] for i in loop), key=lambda x: x.line)
    ids = " -> ".join(loop + [loop[0]])
    raise DataError(f"{where(label, first.line, first.field_prefix + 'parent_id')}: parent cycle ({ids})")


def best_child(children: Sequence[Message]) -> Message:
    """Lowest rank, unranked last; ties by created_date if every sibling has one, else by input
    order; then message_id."""
    dated = all(c.created is not None for c in children)
    return min(children, key=lambda c: (_UNRANKED if c.rank is None else c.rank,
                                        c.created if dated else c.order, c.id))


def best_path(root: Message) -> list[Message]:
    """The rule above, without the trailing-prompter trim. Deleted children are never followed."""
    path = [root]
    node = root
    while True:
        alive = [c for c in node.children if not c.deleted]
        if not alive:
            return path
        node = best_child(alive)
        path.append(node)


# ----------------------------------------------------------------------------- the command

def conversations(source, langs: Optional[Iterable[str]] = None, split: str = "train",
                  keep_unanswered_prompt: bool = False) -> tuple[list[dict], Counts]:
    """Prepared rows (one per kept tree, in input order) and the counts. Raises DataError.

    `keep_unanswered_prompt`: keep a path's final prompter message (the published Guanaco form)
    instead of dropping it.
    """
    label, messages, states = read_messages(source, split)
    roots = build_trees(messages, label)
    langs = set(langs) if langs else None
    counts = Counts(trees_read=len(roots), kept_unanswered_prompt=keep_unanswered_prompt)
    counts.dropped.update({"root deleted": 0, f"tree_state not {READY}": 0, "language": 0,
                           "no assistant reply": 0})
    rows = []
    for tree, root in roots.items():
        if tree in states and states[tree] != READY:
            counts.dropped[f"tree_state not {READY}"] += 1
            continue
        if root.deleted:
            counts.dropped["root deleted"] += 1
            continue
        if langs is not None and root.lang not in langs:
            counts.dropped["language"] += 1
            continue
        path = best_path(root)
        if len(path) == 1:  # a root prompt without any (live) reply
            counts.dropped["no assistant reply"] += 1
            continue
        if path[-1].role == "prompter":
            counts.ended_on_prompter += 1
            if not keep_unanswered_prompt:
                path = path[:-1]
        msgs = [{"role": _ROLE[m.role], "content": m.text} for m in path]
        rows.append(record(tree, msgs, guanaco_text(msgs)))
    counts.written = len(rows)
    return rows, counts


def prepare_oasst1(source, output, langs: Optional[Iterable[str]] = None, split: str = "train",
                   keep_unanswered_prompt: bool = False) -> Counts:
    """Write the best path of every kept tree of `source` to `output` (JSONL, atomically)."""
    rows, counts = conversations(source, langs=langs, split=split,
                                 keep_unanswered_prompt=keep_unanswered_prompt)
    write_jsonl_atomic(output, rows)
    return counts

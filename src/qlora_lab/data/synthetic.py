"""Synthetic OASST1 and LIMA files of the real size and length profile, for timing studies offline.

The files are in the raw formats (OASST1 message trees, LIMA rows), so `qlora-lab data oasst1|lima`
runs its real selection on them. Text is pseudo-words from a seeded RNG: no real data.

Lengths are those of the real corpora in Llama-2 tokens of the whole formatted conversation (BOS,
template, EOS), written as that many *bytes*: the random-init models read one token per byte, so a
conversation Llama would see as N tokens is N tokens here too (real text runs ~3.9 bytes per Llama
token; copying its byte length would make sequences 3.9x too long).

Recipe: the log-length is piecewise linear in a standard normal draw z through the published points
(median at z=0, the over-threshold share, p90, and the max at the 1 - 1/n quantile, longer draws clipped
to it); below the median the first slope continues. One log-normal fitted to median and p90 alone
would put 23% of LIMA over 1,024 (real 19%) and 31% of OASST1 over 512 (real 28%). The n draws are
stratified (one per 1/n of probability), so quantiles sit on target at any n. Each conversation's length
is split over its exchanges (gamma(2) weights, at least 16 bytes each), and within an exchange into a
short prompt (log-normal) and the answer.
"""
from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from statistics import NormalDist

from ..errors import DataError
from .jsonl import write_jsonl_atomic


@dataclass(frozen=True)
class Profile:
    sizes: dict           # split -> rows (trees for OASST1)
    median: int           # whole formatted conversation, tokens = bytes here
    threshold: int        # the config's max_length ...
    over: float           # ... and the share of conversations longer than it
    p90: int
    max: int
    template: int         # bytes per exchange besides the text (prompt markup, EOS)
    multi: float          # share of conversations with more than one exchange
    exchanges: dict       # exchanges -> weight, among the multi-turn ones
    prompt_median: int    # bytes of a prompt


OASST1 = Profile({"train": 9846, "validation": 518}, 353, 512, 0.28, 932, 2760,
                 template=27,  # "### Human: " + "### Assistant:" + " " + EOS
                 multi=0.30, exchanges={2: 18, 3: 8, 4: 3, 5: 1}, prompt_median=30)
LIMA = Profile({"train": 1030, "test": 300}, 487, 1024, 0.19, 1729, 3920,
               template=8,  # " [EOT] " + EOS
               multi=30 / 1030, exchanges={2: 1, 3: 1, 4: 1, 5: 1}, prompt_median=50)
PROFILES = {"oasst1": OASST1, "lima": LIMA}
_MIN_EXCHANGE = 16  # text bytes: a prompt and an answer of at least 8 each
_LANGS = {"en": 50, "es": 25, "ru": 8, "de": 6, "zh": 4, "fr": 4, "pt-BR": 3}  # labels only
_LIMA_SOURCES = {"stackexchange": 400, "wikihow": 200, "writingprompts": 150, "nat_inst": 50,
                 "authors": 200}  # after the LIMA paper's composition; the pipeline ignores them


def lengths(rng: random.Random, p: Profile, n: int) -> list[int]:
    """n conversation lengths (bytes = tokens, BOS and EOS included), in random order."""
    nd = NormalDist()
    pts = sorted([(0.0, p.median), (nd.inv_cdf(1 - p.over), p.threshold), (nd.inv_cdf(0.9), p.p90),
                  (nd.inv_cdf(1 - 1 / max(n, 20)), p.max)])
    out = []
    for i in range(n):
        z = nd.inv_cdf(max(1e-12, (i + rng.random()) / n))
        j = next((k for k in range(1, len(pts)) if z < pts[k][0]), len(pts) - 1)
        (z0, a), (z1, b) = pts[j - 1], pts[j]
        out.append(min(p.max, round(a * math.exp((z - z0) * math.log(b / a) / (z1 - z0)))))
    rng.shuffle(out)
    return out


def exchange_counts(rng: random.Random, p: Profile, n: int) -> list[int]:
    m = round(p.multi * n)
    ks = rng.choices(list(p.exchanges), list(p.exchanges.values()), k=m) + [1] * (n - m)
    rng.shuffle(ks)
    return ks


class _Text:
    """Pseudo-word sentences, cut to an exact byte count."""

    def __init__(self, rng: random.Random):
        syl = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"] + ["th", "ch", "qu", "ar", "en", "ol"]
        words = ["".join(rng.choices(syl, k=rng.choice((1, 1, 2, 2, 2, 3, 3, 4)))) for _ in range(3000)]
        self.rng, self.pool = rng, []
        for _ in range(4000):
            w = rng.choices(words, k=rng.randint(3, 18))
            w[0] = w[0].capitalize()
            if len(w) > 6 and rng.random() < 0.4:
                w[len(w) // 2] += ","
            self.pool.append(" ".join(w) + "." + ("\n\n" if rng.random() < 0.2 else " "))

    def __call__(self, n: int, end: str = ".") -> str:
        parts, size = [], 0
        while size < n:
            parts.append(self.rng.choice(self.pool))
            size += len(parts[-1])
        body = "".join(parts)[: n - 1]
        kept = body.rstrip(" \n.,")  # the cut may fall on a sentence's end: lengthen the last word
        return kept + "e" * (len(body) - len(kept)) + end

    def prompt(self, median: int, cap: int) -> str:
        n = round(self.rng.lognormvariate(math.log(median), 0.9))
        return self(max(8, min(n, cap)), "?")


def conversations(p: Profile, n: int, rng: random.Random, text: _Text) -> list[list[str]]:
    """n conversations as alternating [prompt, answer, ...] texts, lengths per the profile."""
    out = []
    for total, k in zip(lengths(rng, p, n), exchange_counts(rng, p, n)):
        free = max(0, total - 1 - k * (p.template + _MIN_EXCHANGE))  # 1: BOS
        w = [rng.gammavariate(2, 1) for _ in range(k)]
        sizes = [_MIN_EXCHANGE + int(free * x / sum(w)) for x in w]
        sizes[-1] += free - sum(sizes) + k * _MIN_EXCHANGE
        turns = []
        for e in sizes:
            q = text.prompt(p.prompt_median, min(e * 2 // 3, e - 8))
            turns += [q, text(e - len(q))]
        out.append(turns)
    return out


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def oasst1_tree(rng: random.Random, text: _Text, turns: list[str], lang: str, end_on_prompter: bool) -> dict:
    """One nested export tree whose best path carries `turns`; ranked siblings hang off the path."""
    t = datetime(2023, 2, 5, tzinfo=timezone.utc) + timedelta(seconds=rng.uniform(0, 60 * 86400))

    def msg(role, body, when, **extra):
        return {"message_id": _uuid(rng), "text": body, "role": role, "lang": lang, "review_count": 3,
                "review_result": True, "deleted": False, "synthetic": False,
                "created_date": when.isoformat(), **extra}

    root = node = msg("prompter", turns[0], t)
    tail = [text.prompt(OASST1.prompt_median, 400)] if end_on_prompter else []
    for i, body in enumerate(turns[1:] + tail, 1):
        role = "assistant" if i % 2 else "prompter"
        r = rng.choices((1, 2, 3, 4), (15, 30, 40, 15) if role == "assistant" else (50, 35, 15, 0))[0]
        ranks = [None] if r == 1 else rng.sample(range(r), r)
        best_at = ranks.index(None if r == 1 else 0)
        kids = []
        for j, rank in enumerate(ranks):
            when = t + timedelta(minutes=rng.uniform(1, 600))
            if j == best_at:
                kids.append(best := msg(role, body, when, parent_id=node["message_id"], rank=rank))
                continue
            alt = text(max(8, round(len(body) * rng.uniform(0.4, 1.6))), "?" if role == "prompter" else ".")
            gone = rng.random() < 0.03  # a deleted reply: unranked, never followed
            kids.append(msg(role, alt, when, parent_id=node["message_id"], rank=None if gone else rank,
                            deleted=gone))
        node["replies"] = kids
        node, t = best, datetime.fromisoformat(best["created_date"])
    return {"message_tree_id": root["message_id"], "tree_state": "ready_for_export", "prompt": root}


def flat_rows(tree: dict):
    """The flat message table's rows (as in the hub dataset) of one nested tree."""
    stack = [(tree["prompt"], None)]
    while stack:
        m, parent = stack.pop()
        yield {**{k: v for k, v in m.items() if k != "replies"}, "parent_id": parent, "rank": m.get("rank"),
               "message_tree_id": tree["message_tree_id"], "tree_state": tree["tree_state"]}
        stack.extend((c, m["message_id"]) for c in reversed(m.get("replies", [])))


def generate(corpus: str, split: str = "train", seed: int = 0, n: int | None = None,
             flat: bool = False) -> list[dict]:
    """Rows of a synthetic raw file; the same (corpus, split, seed, n) gives the same rows."""
    p = PROFILES[corpus]
    if split not in p.sizes:
        raise DataError(f"--split: {corpus} has splits {', '.join(p.sizes)} (got {split!r})")
    if flat and corpus != "oasst1":
        raise DataError("--flat: only OASST1 has a flat message table")
    n = p.sizes[split] if n is None else n
    rng = random.Random(f"{corpus}:{split}:{seed}")  # a str seed hashes the same in every process
    text = _Text(rng)
    if corpus == "lima" and split == "test":  # prompts only, as LIMA's test file
        return [{"conversations": [text.prompt(p.prompt_median, 2000)], "source": "authors"} for _ in range(n)]
    convs = conversations(p, n, rng, text)
    if corpus == "lima":
        src = rng.choices(list(_LIMA_SOURCES), list(_LIMA_SOURCES.values()), k=n)
        return [{"conversations": c, "source": "multi_turn" if len(c) > 2 else s} for c, s in zip(convs, src)]
    langs = rng.choices(list(_LANGS), list(_LANGS.values()), k=n)
    trees = [oasst1_tree(rng, text, c, lang, rng.random() < 0.05) for c, lang in zip(convs, langs)]
    return [row for t in trees for row in flat_rows(t)] if flat else trees


def write(corpus: str, output, split: str = "train", seed: int = 0, n: int | None = None,
          flat: bool = False) -> int:
    """Write the synthetic raw file atomically; returns the number of lines."""
    return write_jsonl_atomic(output, generate(corpus, split, seed, n, flat))

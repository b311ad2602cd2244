"""Which worker processes one bench invocation starts, and what each one trains."""
from __future__ import annotations

from dataclasses import dataclass

from .spec import RUNTIME_KEYS


@dataclass(frozen=True)
class Job:
    """One worker process for one preset: a path, the runs it trains in order, on which shapes, how launched.

    A run is (row label, our config overrides); the "ours" process trains several runs on the model it
    loaded (variants of runtime keys only). `launch` is None (one process) or {"kind": "dp"|"fsdp",
    "nproc": N, "ref": the one-GPU row it is compared with}; `peer` is None or {"name": ..., "python":
    the peer's interpreter, "gradient_checkpointing": its setting}.
    """

    label: str
    path: str                       # "ours", "baseline" or a peer's name
    runs: tuple                     # ((label, overrides), ...)
    shapes: tuple                   # the Shapes this process trains
    launch: dict | None = None
    peer: dict | None = None


# A peer's settings, each a row of its own: (label suffix, its gradient-checkpointing argument).
PEER_SETTINGS = {"unsloth": (("gc=unsloth", "unsloth"), ("gc=off", False))}


def plan_jobs(shapes, baseline: bool = False, overrides=(), variants=(), multi_gpu=(), peer: str | None = None,
              peer_python: str | None = None, isolate: bool = False) -> list[Job]:
    """The jobs of one preset, in the order they run: ours first (it saves the initial LoRA weights the
    others load), its variants, the standard recipe, several-GPU runs, then the peer's settings.

    A variant of runtime keys only trains in the ours process, on the model it loaded, unless `isolate`: then
    every variant gets a process of its own, as each of the peer's settings does, so that no row's peak
    memory holds what an earlier row left allocated (one model load more per variant)."""
    shapes = tuple(shapes)
    runs = [("ours", tuple(overrides))]
    separate = []  # variants that change more than runtime keys: a process of their own
    by_name = {}   # row label -> our path's overrides plus the variant's
    for name, sets in variants:
        label = f"ours[{name}]"
        by_name[label] = tuple(overrides) + tuple(sets)
        if not isolate and all(s.split("=", 1)[0].strip() in RUNTIME_KEYS for s in sets):
            runs.append((label, by_name[label]))
        else:
            separate.append(Job(label, "ours", ((label, by_name[label]),), shapes))
    jobs = [Job("ours", "ours", tuple(runs), shapes), *separate]
    if baseline:
        jobs.append(Job("baseline", "baseline", (("baseline", ()),), shapes))
    # Several GPUs: that variant's overrides, launched by torchrun (data-parallel) or accelerate with
    # fsdp_qlora.yaml (sharded). The Trainer wraps a model in FSDP once: a sharded job gets one shape.
    for kind, nproc, name in multi_gpu:
        ref = f"ours[{name}]" if name else "ours"
        label = f"{ref[:-1]},{kind}{nproc}]" if name else f"ours[{kind}{nproc}]"
        run = ((label, by_name.get(ref, tuple(overrides))),)
        launch = {"kind": kind, "nproc": nproc, "ref": ref}
        jobs += [Job(label, "ours", run, (s,), launch) for s in shapes] if kind == "fsdp" else \
            [Job(label, "ours", run, shapes, launch)]
    if peer:
        for suffix, gc in PEER_SETTINGS[peer]:
            label = f"{peer}[{suffix}]"
            jobs.append(Job(label, peer, ((label, tuple(overrides)),), shapes,
                            peer={"name": peer, "python": peer_python, "gradient_checkpointing": gc}))
    return jobs

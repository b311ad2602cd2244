"""Shared fixtures: repo paths, tiny random-weight models cached per session, CLI runner."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SAMPLES = ROOT / "src" / "qlora_lab" / "resources" / "samples"  # data shipped with the package
CONFIGS = ROOT / "configs"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread in every test process (set before torch loads; the processes the tests start inherit
# it). The tests run processes side by side (the background lane below, a test's independent children), on
# a machine that may be busy: a process with two OpenMP threads on 2 shared cores waits for a descheduled
# one at every op, and the tiny models' runs slowed down up to 30x (measured: test_train with
# test_distributed and their background runs, 53 s with one thread, 136 s with two). Alone, one thread
# trains the tiny Llama ~1.4x slower than two, to the same losses.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Every test process, this one and those it starts, runs bitsandbytes as on a CPU with AVX512-BF16
# (tests/support/sitecustomize.py says why): the 4-bit CPU path is the same on every machine.
SUPPORT = ROOT / "tests" / "support"
os.environ["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), *filter(None, [os.environ.get("PYTHONPATH")])])
_spec = importlib.util.spec_from_file_location("_qlora_lab_test_support", SUPPORT / "sitecustomize.py")
_support = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_support)  # installs the claim in this process


class _CurrentStderr:
    """A stream that is whatever sys.stderr is now.

    Library loggers (transformers, datasets) bind sys.stderr once; tests that call the CLI in-process
    under capsys would leave them writing to a stream pytest has since closed.
    """

    def write(self, s):
        return sys.stderr.write(s)

    def flush(self):
        return sys.stderr.flush()


def pytest_configure(config):
    import importlib

    for name in ("transformers.utils.logging", "datasets.utils.logging"):
        try:
            lib = importlib.import_module(name)
        except ImportError:
            continue
        lib.get_logger()  # creates the library's handler
        handler = getattr(lib, "_default_handler", None)
        if handler is not None:
            handler.setStream(_CurrentStderr())


def pytest_collection_modifyitems(config, items):
    import torch

    # The tests of background runs (below) last: their runs go on while every other test runs.
    late = [item for item in items if _BACKGROUND.keys() & set(getattr(item, "fixturenames", ()))]
    if late:
        items[:] = [item for item in items if item not in late] + late
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Random-init checkpoints go to a per-session cache, never to the user's home."""
    d = tmp_path_factory.mktemp("qlora_lab_cache")
    old = os.environ.get("QLORA_LAB_CACHE")
    os.environ["QLORA_LAB_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("QLORA_LAB_CACHE", None)
    else:
        os.environ["QLORA_LAB_CACHE"] = old


@pytest.fixture
def cli(capsys):
    """`qlora-lab ARGS` through the CLI's main() in this process, for tests of what a verb does rather than of
    the process around it: returns a CompletedProcess (returncode, stdout, stderr) as run_cli does."""

    def run(*args):
        from qlora_lab.cli import main

        argv = [str(a) for a in args]
        capsys.readouterr()
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: --help, bad arguments
            rc = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, rc, out, err)

    return run


def run_cli(*args, cwd=ROOT, env=None, timeout=600, base_env=None):
    """Run the real `qlora-lab` console entry in a subprocess; returns CompletedProcess. Its environment:
    base_env (default: this process's) updated with env."""
    e = dict(os.environ if base_env is None else base_env)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "qlora_lab.cli", *map(str, args)], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=timeout)


class StartedCli:
    """`qlora-lab ARGS` started in a child process by start_cli; result() waits for it."""

    def __init__(self, args, cwd=ROOT, env=None, timeout=600):
        import threading

        e = dict(os.environ)
        e.update(env or {})
        self.argv, self.timeout, self._out = [sys.executable, "-m", "qlora_lab.cli", *map(str, args)], timeout, None
        self.proc = subprocess.Popen(self.argv, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)  # keeps the pipes drained
        self._reader.start()

    def _read(self):
        self._out = self.proc.communicate()

    def result(self) -> subprocess.CompletedProcess:
        self._reader.join(self.timeout)
        if self._reader.is_alive():
            self.proc.kill()
            self._reader.join()
            raise subprocess.TimeoutExpired(self.argv, self.timeout)
        return subprocess.CompletedProcess(self.argv, self.proc.returncode, *self._out)


def start_cli(*args, cwd=ROOT, env=None, timeout=600) -> StartedCli:
    """run_cli without waiting: independent children started together overlap (on 2 cores, most of a child's
    time is its single-threaded imports)."""
    return StartedCli(args, cwd=cwd, env=env, timeout=timeout)


# ----------------------------------------------------------------------------- runs in the background
# The longest end-to-end runs are child processes whose tests only read what they leave (bench's two, the
# demo, the offline study, the torchrun run, the secrets run, the wandb run). Each is defined next to its
# test with @background, as a session fixture. When a test that uses one is selected, its run starts with
# the session in a background lane, one run at a time, beside the other tests; the tests that use these
# fixtures run last (pytest_collection_modifyitems). Much of such a run is its processes' single-threaded
# start (importing torch, transformers, peft: ~7 s a process), which then overlaps the in-process tests
# (whole suite on 2 cores: 6:12 before the lane and the other changes of that branch, 3:45 after). A run's
# processes get the environment of the session's start (`env`), never a test's monkeypatched one.

_BACKGROUND: dict = {}  # fixture name -> fn(tmp: Path, env: dict) -> what the fixture returns


def background(fn):
    """Decorator: fn(tmp, env) becomes a session fixture of the same name whose run goes in the background
    lane; the fixture waits for it and returns (or raises) what fn did."""
    _BACKGROUND[fn.__name__] = fn

    @pytest.fixture(scope="session", name=fn.__name__)
    def fixture(_background_lane):
        return _background_lane.result(fn.__name__)

    fixture.__doc__ = fn.__doc__
    return fixture


class _Lane:
    """The background runs, in one thread, one after another."""

    def __init__(self, names, tmp_path_factory, env):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="background-run")
        self._tmp, self._env, self._futures = tmp_path_factory, env, {}
        for name in names:
            self._submit(name)

    def _submit(self, name):
        tmp = self._tmp.mktemp(name)  # here, not in the lane: tmp_path_factory is not thread-safe
        self._futures[name] = self._pool.submit(_BACKGROUND[name], tmp, dict(self._env))

    def result(self, name):
        if name not in self._futures:  # asked for without a test that uses it (getfixturevalue): start now
            self._submit(name)
        return self._futures[name].result()

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session", autouse=True)
def _background_lane(request, tmp_path_factory, _model_cache):
    items = request.session.items
    names = [n for n in _BACKGROUND if any(n in getattr(item, "fixturenames", ()) for item in items)]
    lane = _Lane(names, tmp_path_factory, dict(os.environ))
    yield lane
    lane.close()


# ----------------------------------------------------------------------------- shared tiny runs
# Trained once per session, in this process, and shared by the tests that only read them (merge, GGUF
# export, generate, fused LoRA, the run-folder checks of other models). Read-only: a test that changes
# a run copies it first.

# 3 steps at a high learning rate, so the adapter moves the logits (the merge checks mean something).
QLORA_TRAIN = ["train.max_steps=3", "train.eval_steps=3", "train.save_steps=3", "train.learning_rate=1e-2",
               "logging.report_to=none"]
LORA_TRAIN = ["train.max_steps=3", "train.eval_steps=3", "train.save_steps=3", "logging.report_to=none"]


def train_tiny(config: str, overrides, out: Path) -> Path:
    """Train configs/<config> in this process (imports and warm-up paid once); returns the run folder."""
    from qlora_lab import training
    from qlora_lab.config import load_config

    return Path(training.main(load_config(CONFIGS / config, list(overrides)), output_dir=out))


@pytest.fixture(scope="session")
def qlora_runs(tmp_path_factory):
    """{arch: (run folder, merged folder, merge record)}: the tiny Llama and Falcon QLoRA runs, each merged
    into its 16-bit base (bf16, the default) once."""
    from qlora_lab.merge import merge

    out = {}
    for arch in ("llama", "falcon"):
        config = f"tiny_{arch}_qlora.yaml"
        run = train_tiny(config, QLORA_TRAIN, tmp_path_factory.mktemp("runs") / Path(config).stem)
        merged = tmp_path_factory.mktemp("merged") / arch
        out[arch] = (run, merged, merge(run, merged))
    return out


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory) -> Path:
    """The tiny Llama with plain LoRA (16-bit base), 3 steps."""
    return train_tiny("tiny_llama_lora.yaml", LORA_TRAIN, tmp_path_factory.mktemp("runs") / "tiny_llama_lora")

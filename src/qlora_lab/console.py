"""What a command shows on the console: our lines, and progress bars where they redraw in place.

The libraries under a run (transformers, peft, bitsandbytes, datasets, accelerate, trl) log warnings
and raise Python warnings on every run: deprecations, CPU kernel fallbacks, "Setting
save_embedding_layers...". While `library_output()` is active their log records and Python warnings
stay off the console; `log_file(path)` sends them to a file (a run's train.log), and what came before
a file was given (warnings raised while the libraries were imported) goes to the first file given.

    with library_output():                 # the CLI, around a verb that loads models
        ...                                # imports: records are held
        with log_file(run_dir / "train.log"):
            ...                            # records (held ones first) go to train.log

Progress bars that redraw in place need a terminal (or a notebook's widgets); elsewhere (a pipe, a
log file, CI) tqdm's cursor codes come out as fragments, so `progress_bars()` says whether to draw them.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import warnings

# Loggers of the libraries a run uses; "py.warnings" carries Python warnings (see _show_warning).
LIBRARIES = ("transformers", "peft", "bitsandbytes", "datasets", "accelerate", "trl", "huggingface_hub",
             "py.warnings")
FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_HELD_MAX = 1000  # records kept while no file is open (a bound, should a library log in a loop)


def progress_bars(stream=None) -> bool:
    """Whether dynamic progress bars render: on a terminal, or in a Jupyter kernel with ipywidgets."""
    stream = stream or sys.stderr
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # a closed or replaced stream
        pass
    return "ipykernel" in sys.modules and importlib.util.find_spec("ipywidgets") is not None


class _Router(logging.Handler):
    """Sends each record to the innermost open log file, or holds it until one is opened."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.files: list[logging.Handler] = []

    def emit(self, record):
        if self.files:
            self.files[-1].handle(record)
        elif len(self.held) < _HELD_MAX:
            self.held.append(record)

    def open(self, handler: logging.Handler) -> None:
        self.files.append(handler)
        held, self.held = self.held, []
        for r in held:
            handler.handle(r)

    def close_file(self, handler: logging.Handler) -> None:
        if handler in self.files:
            self.files.remove(handler)


_router: _Router | None = None
_depth = 0


def _show_warning(message, category, filename, lineno, file=None, line=None):
    logging.getLogger("py.warnings").warning(
        "%s", warnings.formatwarning(message, category, filename, lineno, line).rstrip())


@contextlib.contextmanager
def library_output():
    """Keep library log records and Python warnings off the console (re-entrant).

    Library progress bars go too where they would not redraw in place (datasets' always: its
    "Generating train split" bars say nothing our own data line does not). Everything is restored on
    exit. Records no file took are dropped when the command fails on bad input (its one-line error
    says what is wrong) and written to stderr after any other failure, so a crash keeps its context.
    """
    global _router, _depth
    if _router is not None:
        _depth += 1
        try:
            yield _router
        finally:
            _depth -= 1
        return
    _configure_library_loggers()
    router = _Router()
    saved = []
    for name in LIBRARIES:
        lg = logging.getLogger(name)
        saved.append((lg, lg.handlers[:], lg.propagate))
        lg.handlers = [router]
        lg.propagate = False
    old_show = warnings.showwarning
    warnings.showwarning = _show_warning
    restore_bars = _quiet_library_bars()
    _router, _depth = router, 1
    failed = None
    try:
        yield router
    except BaseException as e:
        failed = e
        raise
    finally:
        _router, _depth = None, 0
        warnings.showwarning = old_show
        for lg, handlers, propagate in saved:
            lg.handlers = handlers
            lg.propagate = propagate
        restore_bars()
        from .errors import UserError

        if router.held and failed is not None and not isinstance(failed, (UserError, KeyboardInterrupt)):
            fmt = logging.Formatter(FORMAT)
            for r in router.held:
                print(fmt.format(r), file=sys.stderr)


def _configure_library_loggers() -> None:
    """Let the libraries that attach their own console handler do it now, so that swapping it out holds."""
    for name in ("transformers.utils.logging", "datasets.utils.logging", "huggingface_hub.utils.logging"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name).get_logger()


def _quiet_library_bars():
    """Turn off datasets' bars, and transformers' and the hub's off a terminal; returns the undo."""
    undo = []
    with contextlib.suppress(ImportError):
        from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        if not are_progress_bars_disabled():
            disable_progress_bars()
            undo.append(enable_progress_bars)
    if not progress_bars():
        with contextlib.suppress(ImportError):
            import transformers.utils.logging as tl

            if tl.is_progress_bar_enabled():
                tl.disable_progress_bar()
                undo.append(tl.enable_progress_bar)
        with contextlib.suppress(ImportError):
            import huggingface_hub.utils as hu

            if not hu.are_progress_bars_disabled():
                hu.disable_progress_bars()
                undo.append(hu.enable_progress_bars)

    def restore():
        for f in undo:
            f()
    return restore


class _LazyFile(logging.FileHandler):
    """A log file made (folder included) when the first record comes."""

    def _open(self):
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()


@contextlib.contextmanager
def log_file(target):
    """Library records (and Python warnings) go to `target`, a path or a logging.Handler, inside.

    A path is opened on the first record only (no empty log files); None keeps them off the console
    and writes them nowhere (the other processes of a data-parallel run: rank 0 logs the same ones).
    """
    with library_output() as router:
        if target is None:
            handler = logging.NullHandler()
        elif isinstance(target, logging.Handler):
            handler = target
        else:
            handler = _LazyFile(target, encoding="utf-8", delay=True)
            handler.setFormatter(logging.Formatter(FORMAT))
        router.open(handler)
        try:
            yield handler
        finally:
            router.close_file(handler)
            if handler is not target:
                handler.close()

"""Job logs and progress, a leaf that imports nothing of the package: each job's records go to its
own log file (and, unless it is one of many small jobs, to the terminal); an exception is written
there with its traceback and leaves the job as :class:`JobError` with one line; :class:`Progress`
logs a long loop's progress and stops it at Ctrl-C (:data:`INTERRUPTED`, set by
:func:`headperturb.workflow.lifecycle.stop_threads_on_interrupt`)."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import traceback
from collections.abc import Iterator

LOGGER = "headperturb"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JobError(RuntimeError):
    """A job failed; the message is the cause in one line, the log file has the traceback."""


class Interrupted(RuntimeError):
    """The run was interrupted (Ctrl-C) while this job ran in a thread of the Snakemake process."""


INTERRUPTED = threading.Event()
"""Set by Ctrl-C in a process that called
:func:`headperturb.workflow.lifecycle.stop_threads_on_interrupt`: the long loops of jobs running
in its threads stop at their next progress update (:class:`Progress`)."""


def _quiet_others() -> None:
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def setup(log_file: str | None = None, level: int = logging.INFO) -> logging.Logger:
    """For a job that is its own process: the package's records go to ``log_file`` and stderr."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(level=level, format=FORMAT, handlers=handlers, force=True)
    _quiet_others()
    logger = logging.getLogger(LOGGER)
    logger.propagate = True  # to the handlers above, also after a job() in this process
    return logger


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def cause(exc: BaseException) -> str:
    """``Type: the whole message``."""
    return f"{type(exc).__name__}: {str(exc).strip()}".rstrip(": ")


FAILED = " failed: "
"""What the record a failed job writes to its log says between the job's name and the cause."""


def failed(name: str) -> str:
    """The start of the record a failed job writes to its log: its name, then :data:`FAILED`."""
    return f"{name}{FAILED}"


def failure(log_file) -> str | None:
    """``name failed: Type: first line of the cause``, from the record a failed job wrote to
    ``log_file`` (the first such record), or None where the log has none (no log, or a job that
    failed outside its step)."""
    marker = f" ERROR {LOGGER}: "
    try:
        with open(log_file, errors="replace") as handle:
            for line in handle:
                if marker in line and FAILED in line:
                    return line.split(marker, 1)[1].rstrip("\n")
    except OSError:
        return None
    return None


@contextlib.contextmanager
def job(log_file: str | None, name: str = "job", echo: bool = False) -> Iterator[logging.Logger]:
    """Log one job that runs in a thread of a long-lived process: records from this thread go to
    ``log_file``, and with ``echo`` also to stderr (the terminal). An exception is logged with its
    traceback and re-raised as :class:`JobError` carrying its first line."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    _quiet_others()
    ident = threading.get_ident()
    handler = logging.FileHandler(log_file, mode="w") if log_file else logging.NullHandler()
    handlers = [handler, logging.StreamHandler(sys.stderr)] if echo else [handler]
    for h in handlers:
        h.setFormatter(logging.Formatter(FORMAT))
        h.addFilter(lambda record: record.thread == ident)
    _swap_handlers(logger, add=handlers)
    try:
        yield logger
    except Exception as exc:
        _swap_handlers(logger, remove=handlers[1:])  # the traceback goes to the log file only
        logger.error("%s%s\n%s", failed(name), cause(exc), traceback.format_exc().rstrip())
        raise JobError(f"{name}: {one_line(exc)} (log: {log_file})") from None
    finally:
        _swap_handlers(logger, remove=handlers)
        handler.close()


_handlers_lock = threading.Lock()


def _swap_handlers(logger: logging.Logger, add=(), remove=()) -> None:
    """Give ``logger`` a new list of handlers instead of changing its list in place: another
    thread may be walking the old list to emit a record, and an in-place removal could make it
    skip a handler (a record missing from another job's log)."""
    with _handlers_lock:
        logger.handlers = [h for h in logger.handlers if h not in remove] + list(add)


class Progress:
    """Logs ``done/total``, rate and time left about every ``every`` seconds and at the end."""

    def __init__(
        self, total: int, what: str, logger: logging.Logger | None = None, every: float = 10.0
    ):
        self.total, self.what, self.every = total, what, every
        self.log = logger or logging.getLogger(LOGGER)
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int = 1) -> None:
        if INTERRUPTED.is_set():
            raise Interrupted(f"{self.what}: interrupted at {self.done}/{self.total}")
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            elapsed = now - self.start
            rate = self.done / elapsed if elapsed > 0 else float("inf")
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            self.log.info(
                "%s: %d/%d (%.0f%%), %.2f/s, %.0f s elapsed, ~%.0f s left",
                self.what,
                self.done,
                self.total,
                100 * self.done / max(self.total, 1),
                rate,
                elapsed,
                left,
            )


_current = threading.local()


@contextlib.contextmanager
def progress(total: int, what: str, logger: logging.Logger | None = None) -> Iterator[Progress]:
    """While active, :func:`advance` in this thread moves a :class:`Progress` of ``total`` items
    (a job's long loop reports its progress without carrying it through every call)."""
    previous = getattr(_current, "progress", None)
    _current.progress = Progress(total, what, logger)
    try:
        yield _current.progress
    finally:
        _current.progress = previous


def advance(n: int = 1) -> None:
    """``n`` more items done in this thread's :func:`progress`, if any (and a stop at Ctrl-C)."""
    current = getattr(_current, "progress", None)
    if current is not None:
        current.update(n)

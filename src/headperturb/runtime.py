"""Everything a process keeps or changes for all its jobs, in one place: the state that jobs
running in threads of one process share.

A job runs either as its own process (a ``script:`` rule, or any job on a cluster) or in a thread
of the Snakemake process (the ``run:`` rules on a workstation, ``profiles/default``). What such a
process holds for all its jobs lives here, and only here:

- **torch's threads** (:func:`set_threads`): per process, set from a rule's ``threads``;
- **the job logs** (:func:`job`, :func:`script_main`, :class:`Progress`): each job's records go
  to its own log file (and, unless it is one of many small jobs, to the terminal); an exception is
  written there with its traceback and leaves the job as :class:`JobError` with one line;
- **Ctrl-C and SIGTERM** (:func:`stop_threads_on_interrupt`, :func:`end_of_error`): Ctrl-C stops
  the loops of jobs in threads; a run stopped by SIGTERM says so;
- **the run's owner** (:func:`mark_owner`, :func:`follow_owner`): a step that is a process of its
  own ends with the Snakemake process that started it;
- **the run's start and end** (:func:`start_of_run`, :func:`check_cluster`, :func:`end_of_run`);
- **what is loaded once per process** (:func:`cached_model`, :func:`cached_tensors`,
  :func:`cached_program`): the prepared model (a copy of its module tree per thread, the weights
  shared), recordings and the exported last layer, keyed by file path, time and size;
- **parameters that keep no gradient** (:func:`frozen_parameters`), for the screen's backward pass.

torch is imported where it is used, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path


def set_threads(threads: int) -> None:
    """Set torch's intra-op threads from a rule's ``threads`` (torch's setting is per process)."""
    import torch

    torch.set_num_threads(max(1, int(threads)))


@contextlib.contextmanager
def frozen_parameters(model) -> Iterator[None]:
    """While active, no parameter of ``model`` asks for a gradient (a backward pass then reaches
    the activations only); restored afterwards, also on an exception. The parameters are shared by
    every thread's copy of the model, so only a step that is a process of its own (the screen)
    uses this."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


# -- job logs ----------------------------------------------------------------------------------

LOGGER = "headperturb"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JobError(RuntimeError):
    """A job failed; the message is the cause in one line, the log file has the traceback."""


class Interrupted(RuntimeError):
    """The run was interrupted (Ctrl-C) while this job ran in a thread of the Snakemake process."""


INTERRUPTED = threading.Event()
"""Set by Ctrl-C in a process that called :func:`stop_threads_on_interrupt`: the long loops of
jobs running in its threads stop at their next progress update (:class:`Progress`)."""


def stop_threads_on_interrupt() -> None:
    """Let Ctrl-C stop the jobs in this process's threads too: Python raises KeyboardInterrupt
    in the main thread only, and Snakemake waits for running threads before it exits. Call it
    from the main thread; the previous handler still runs."""
    import signal

    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        return
    if getattr(previous, "stops_threads", False):
        return

    def interrupt(signum, frame):
        INTERRUPTED.set()
        previous(signum, frame)

    interrupt.stops_threads = True
    signal.signal(signal.SIGINT, interrupt)


OWNER = "HEADPERTURB_OWNER"
"""The environment variable that names the Snakemake process a step that is a process of its own
belongs to (set by :func:`mark_owner`, read by :func:`follow_owner`)."""


def mark_owner() -> None:
    """In the Snakemake process: name it as the owner of the steps it starts as processes (its
    pid and its start time, so that a later process given the same pid is not taken for it)."""
    os.environ[OWNER] = f"{os.getpid()}:{_started(os.getpid()) or ''}"


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or None without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _started(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields and len(fields) > 19 else None  # field 22: the start time


def alive(pid: int, started: str | None = None) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, does not) and is the
    process that started at ``started`` (its start time, when known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat(pid)
    if fields is None:
        return True  # no /proc: os.kill's answer
    if fields[0] in ("Z", "X"):
        return False
    return not started or len(fields) <= 19 or fields[19] == started


def follow_owner(interval: float = 0.5) -> int | None:
    """In a step that is a process of its own: end this process as soon as the Snakemake process
    that started it is gone (killed with SIGKILL, its children are orphaned and would write their
    outputs seconds later, unasked). A watcher thread removes the files being written and exits;
    a file finished in between is not put in place (:func:`headperturb.core.files.only_while`). Returns
    the owner's pid, or None outside a Snakemake run."""
    from headperturb.core import files

    owner, _, started = (os.environ.get(OWNER) or "").partition(":")
    pid = int(owner or 0)
    if not pid or pid == os.getpid():
        return None
    files.only_while(lambda: alive(pid, started))

    def watch() -> None:
        while alive(pid, started):
            time.sleep(interval)
        files.abandon()
        logging.getLogger(LOGGER).error("the Snakemake process %d has ended: stopping", pid)
        logging.shutdown()
        os._exit(3)

    threading.Thread(target=watch, name="headperturb-owner", daemon=True).start()
    return pid


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
    return logging.getLogger(LOGGER)


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


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
        logger.error("%s failed: %s\n%s", name, exc, traceback.format_exc().rstrip())
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


def script_main(log_file: str | None, func, *args, **kwargs) -> None:
    """Run ``func`` as a job that is its own process: log to ``log_file`` (and stderr); on an
    exception write it with its traceback to the log, print one line to stderr and exit 1."""
    logger = setup(log_file)
    follow_owner()
    try:
        func(*args, **kwargs)
    except Exception as exc:
        root = logging.getLogger()
        for handler in list(root.handlers):  # the traceback goes to the log file only
            if not isinstance(handler, logging.FileHandler):
                root.removeHandler(handler)
        logger.error("failed: %s", exc, exc_info=True)
        print(f"headperturb error: {one_line(exc)}", file=sys.stderr)
        sys.exit(1)


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
                self.what, self.done, self.total, 100 * self.done / max(self.total, 1),
                rate, elapsed, left,
            )  # fmt: skip


# -- the run's start and end -----------------------------------------------------------------


def release_gpu_cache() -> None:
    """After a step in a thread of the Snakemake process: hand the blocks torch's CUDA allocator
    keeps cached back to the GPU, for the processes of the steps that follow."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def start_of_run() -> None:
    """What the Snakefile does first in the Snakemake process: let Ctrl-C stop the jobs running in
    its threads at their next progress update (:func:`stop_threads_on_interrupt`),
    as it stops the jobs that are processes; and name this process as the owner of the steps that
    are processes, which end when it does (:func:`follow_owner`)."""
    stop_threads_on_interrupt()
    mark_owner()
    one_reevaluation_timer()


REEVALUATION = "headperturb-reevaluation"
"""The name of the one timer thread that wakes Snakemake's job scheduler (:func:`one_reevaluation_timer`)."""


def one_reevaluation_timer(scheduler_class=None) -> bool:
    """Keep at most one pending re-evaluation timer in Snakemake's job scheduler.

    Snakemake 9's scheduler ends every round by starting a timer that wakes it again one rate
    limiter timespan (1 s) later, and every finished job wakes it once more, so the timers never
    stop and multiply with the jobs: after 600 jobs its main thread re-planned the queue about
    600 times a second whenever a long step blocked the rest (94 % of a core during the default
    run's screen, holding the GIL the head jobs' threads need; the screen ran at 0.25 instead of
    0.6 prompts/s). One pending timer wakes it as often as the rate limiter needs, and as soon
    after an error. Returns whether the scheduler was patched (False where its internals differ:
    it then runs as Snakemake ships it)."""
    if scheduler_class is None:
        try:
            from snakemake.scheduling.job_scheduler import JobScheduler as scheduler_class
        except ImportError:
            return False
    if not hasattr(scheduler_class, "_schedule_reevalutation"):
        return False
    if getattr(scheduler_class, "_one_timer", False):
        return True

    def schedule(self, delay) -> None:
        pending = getattr(self, "_reevaluation", None)
        if pending is not None and pending.is_alive():
            return
        timer = threading.Timer(delay, lambda: self._open_jobs.release())
        timer.name, timer.daemon = REEVALUATION, True
        self._reevaluation = timer
        timer.start()

    scheduler_class._schedule_reevalutation = schedule
    scheduler_class._one_timer = True
    return True


class ClusterError(RuntimeError):
    """The cluster a profile submits to does not answer here."""


def check_cluster(workflow) -> None:
    """Before any job is submitted with the SLURM executor (``--profile profiles/slurm``; the
    Snakefile's ``onstart``, when the executor is known): SLURM must answer here, or the run
    stops with one line that says so, instead of failing on the first job inside the plugin. Only
    in the process that submits, never in a dry run."""
    import shutil
    import subprocess

    plugin = workflow.executor_plugin
    if plugin is None or plugin.name != "slurm" or workflow.dryrun:
        return
    if workflow.remote_exec or workflow.subprocess_exec:  # a job already on a node
        return
    missing = [c for c in ("sbatch", "squeue", "sinfo") if shutil.which(c) is None]
    reason = f"{', '.join(missing)} not found" if missing else None
    if reason is None:
        try:
            result = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True,
                                    text=True, timeout=30)  # fmt: skip
            if result.returncode != 0:
                reason = f"sinfo: {(result.stderr or result.stdout).strip().splitlines()[0]}"
        except subprocess.TimeoutExpired:
            reason = "sinfo did not answer within 30 s"
    if reason:
        raise ClusterError(
            f"the SLURM executor (--profile profiles/slurm) needs a SLURM that answers here, and "
            f"this one does not ({reason}); run where SLURM is, or without the profile"
        )


def end_of_run() -> int:
    """What a run's end (``onsuccess``/``onerror``) does to let the Snakemake process exit at once:
    cancel the timers Snakemake's job scheduler leaves behind (its rate limiter re-checks the
    queue one second after each round, in a thread the interpreter waits for), and exempt every
    object alive now from the interpreter's final garbage collection (``gc.freeze``), which would
    walk all of torch's and transformers' objects once more before the process exits. Together
    about two seconds of every run on a 2-core machine. Returns how many timers were cancelled."""
    import gc

    timers = [t for t in threading.enumerate() if isinstance(t, threading.Timer) and (
              t.name == REEVALUATION
              or getattr(t.function, "__module__", "").startswith("snakemake.scheduling"))]  # fmt: skip
    for timer in timers:
        timer.cancel()
    gc.freeze()
    return len(timers)


def stopped(workflow) -> bool:
    """Whether the run ended because it was asked to stop (SIGTERM: Snakemake lets the running
    jobs finish and starts no more), not because a job failed."""
    scheduler = getattr(workflow, "scheduler", None)
    return getattr(scheduler, "_user_kill", None) == "graceful" and not getattr(
        scheduler, "_errors", False
    )


def end_of_error(workflow) -> None:
    """What a run's end by ``onerror`` does besides :func:`end_of_run`: a run stopped by SIGTERM
    after its running jobs finished says so in one line and exits with 143 (128 + SIGTERM),
    instead of Snakemake's "At least one job did not complete successfully", which no job did."""
    end_of_run()
    if stopped(workflow):
        import sys

        print("headperturb: the run was stopped (SIGTERM) after its running jobs finished; no "
              "job failed. The same command does what is left.", file=sys.stderr)  # fmt: skip
        raise SystemExit(143)


# -- what a long-lived process keeps between jobs -----------------------------------------------

_lock = threading.Lock()
_loading = threading.RLock()  # one load at a time: torch.export.load is not thread-safe
_store: dict[tuple, object] = {}


def _stamp(path: str | os.PathLike) -> tuple:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


def cached(kind: str, stamp_file: str | os.PathLike, load: Callable[[], object], *extra) -> object:
    """``load()`` once per (kind, file stamp, extra); a changed file replaces its old entry."""
    key = (kind, _stamp(stamp_file), *extra)
    with _loading:
        with _lock:
            if key in _store:
                return _store[key]
        value = load()
    with _lock:
        for old in [k for k in _store if k[0] == kind and k[1][0] == key[1][0] and k[1] != key[1]]:
            del _store[old]  # the same file, older contents
        return _store.setdefault(key, value)


def cached_model(model_dir, device: str, dtype: str):
    """(model, info) for this thread: the prepared model loaded once per process, and a copy of
    its module tree per thread."""
    from headperturb.model import loading
    from headperturb.model.surgery import thread_copy

    stamp = Path(model_dir) / loading.INFO_FILE
    shared = cached("model", stamp, lambda: loading.load_prepared(
        model_dir, device=device, dtype=dtype, tokenizer=False), device, dtype)  # fmt: skip
    base, _, info = shared
    mine = cached("model-thread", stamp, lambda: thread_copy(base), device, dtype,
                  threading.get_ident())  # fmt: skip
    return mine, info


def cached_tensors(path, keys: tuple[str, ...] | None = None, expect: dict | None = None) -> dict:
    """The tensors of a recording (only ``keys`` when given), loaded once per process and checked
    against the provenance ``expect`` (:func:`headperturb.model.recordings.load`)."""
    from headperturb.model import recordings

    frozen = tuple(sorted((expect or {}).items()))
    load = lambda: recordings.load(path, list(keys) if keys else None, expect=expect)  # noqa: E731
    return cached("tensors", path, load, keys, frozen)


def cached_program(folder, device: str, weights_sha256: str | None = None):
    """(program, meta) of an exported last layer (:func:`headperturb.model.tail.load`), loaded once."""
    from headperturb.model import tail

    load = lambda: tail.load(folder, device, weights_sha256)  # noqa: E731
    return cached("program", Path(folder) / tail.META, load, device, weights_sha256)


def clear_cache() -> None:
    with _lock:
        _store.clear()

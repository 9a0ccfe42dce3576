"""The Snakemake run's lifecycle, as the Snakefile and the steps that are processes of their own
see it: the run's start (:func:`start_of_run`: Ctrl-C stops the jobs in threads too, the
Snakemake process owns the steps it starts, one re-evaluation timer in Snakemake's scheduler), a
SLURM profile's check (:func:`check_cluster`), a step that is a process of its own
(:func:`script_main`, which ends with its owner: :func:`follow_owner`), and the run's end
(:func:`end_of_run`, :func:`end_of_error`). What the terminal shows of failed jobs and of
narrowed rerun triggers: :mod:`headperturb.workflow.terminal`."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from headperturb.joblog import INTERRUPTED, LOGGER, cause, failed, one_line, setup
from headperturb.workflow.terminal import check_when_planned, failure_lines, failures_at_the_end


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
    a file finished in between is not put in place (:func:`headperturb.core.files.only_while`).
    Returns the owner's pid, or None outside a Snakemake run."""
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


def script_main(log_file: str | None, func, *args, name: str = "step", **kwargs) -> None:
    """Run ``func`` as the job ``name`` that is its own process: log to ``log_file`` (and
    stderr); on an exception write it with its traceback to the log and exit 1, printing one line
    to stderr where no Snakemake run of this workflow started it (in one, :func:`end_of_error`
    prints it)."""
    logger = setup(log_file)
    owner = follow_owner()
    try:
        func(*args, **kwargs)
    except Exception as exc:
        root = logging.getLogger()
        for handler in list(root.handlers):  # the traceback goes to the log file only
            if not isinstance(handler, logging.FileHandler):
                root.removeHandler(handler)
        logger.error("%s%s", failed(name), cause(exc), exc_info=True)
        if owner is None:  # in a run, the run's end prints the line (end_of_error)
            print(f"headperturb error: {one_line(exc)}", file=sys.stderr)
        sys.exit(1)


# -- the run's start and end -----------------------------------------------------------------


def release_gpu_cache() -> None:
    """After a step in a thread of the Snakemake process: hand the blocks torch's CUDA allocator
    keeps cached back to the GPU, for the processes of the steps that follow."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def start_of_run(workflow=None) -> None:
    """What the Snakefile does first in the Snakemake process: let Ctrl-C stop the jobs running in
    its threads at their next progress update (:func:`stop_threads_on_interrupt`),
    as it stops the jobs that are processes; and name this process as the owner of the steps that
    are processes, which end when it does (:func:`follow_owner`)."""
    stop_threads_on_interrupt()
    mark_owner()
    one_reevaluation_timer()
    failures_at_the_end()
    if workflow is not None:
        check_when_planned(workflow)


REEVALUATION = "headperturb-reevaluation"
"""The name of the one timer thread that wakes Snakemake's job scheduler
(:func:`one_reevaluation_timer`)."""


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
            result = subprocess.run(
                ["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=30
            )
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

    timers = [t for t in threading.enumerate() if _scheduler_timer(t)]
    for timer in timers:
        timer.cancel()
    gc.freeze()
    return len(timers)


def _scheduler_timer(thread) -> bool:
    """Whether ``thread`` is a timer of Snakemake's job scheduler (or the one that replaces
    them, :data:`REEVALUATION`)."""
    if not isinstance(thread, threading.Timer):
        return False
    module = getattr(thread.function, "__module__", "")
    return thread.name == REEVALUATION or module.startswith("snakemake.scheduling")


def stopped(workflow) -> bool:
    """Whether the run ended because it was asked to stop (SIGTERM: Snakemake lets the running
    jobs finish and starts no more), not because a job failed."""
    scheduler = getattr(workflow, "scheduler", None)
    return getattr(scheduler, "_user_kill", None) == "graceful" and not getattr(
        scheduler, "_errors", False
    )


def end_of_error(workflow) -> None:
    """What a run's end by ``onerror`` does besides :func:`end_of_run`: a run stopped by SIGTERM
    after its running jobs finished says so in one line and exits with 143 (128 + SIGTERM); one
    interrupted by Ctrl-C (SIGINT) says so and exits with 130 (128 + SIGINT); both instead of
    Snakemake's "At least one job did not complete successfully", which no job did. A run
    ended by failed jobs ends with one line for each cause (:func:`failure_lines`) and exit code
    1."""
    end_of_run()
    if stopped(workflow):
        print(
            "headperturb: the run was stopped (SIGTERM) after its running jobs finished; no "
            "job failed. The same command does what is left.",
            file=sys.stderr,
        )
        raise SystemExit(143)
    if INTERRUPTED.is_set():
        print(
            "headperturb: the run was interrupted (Ctrl-C); the jobs it stopped left no output. "
            "The same command does what is left.",
            file=sys.stderr,
        )
        raise SystemExit(130)
    failed_jobs = getattr(getattr(workflow, "scheduler", None), "failed", None)
    if failed_jobs:
        for line in failure_lines(failed_jobs):
            print(line, file=sys.stderr)
        raise SystemExit(1)

"""The Snakemake run's lifecycle, as the Snakefile and the steps that are processes of their own
see it: the run's start (:func:`start_of_run`: Ctrl-C stops the jobs in threads too, the
Snakemake process owns the steps it starts, one re-evaluation timer in Snakemake's scheduler), a
SLURM profile's check (:func:`check_cluster`), a step that is a process of its own
(:func:`script_main`, which ends with its owner: :func:`follow_owner`), and the run's end
(:func:`end_of_run`, :func:`end_of_error`)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from headperturb.joblog import (
    FAILED,
    INTERRUPTED,
    LOGGER,
    cause,
    failed,
    failure,
    one_line,
    setup,
)


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


# -- one line for a failed job ----------------------------------------------------------------

SNAKEMAKE_LOGGER = "snakemake.logging"
ENDING = "Exiting because a job execution failed"
"""The start of Snakemake's last line before a failed run's ``onerror``."""


class FailureLines(logging.Filter):
    """On Snakemake's terminal handlers: leave out what a job that failed in its step
    (:func:`headperturb.joblog.failure`) makes Snakemake print (the ``RuleException`` with its
    frames, the ``Error in rule`` block; for a step that is a process of its own, the
    ``CalledProcessError`` naming a temporary script), and Snakemake's "Exiting because a job
    execution failed. Look above": :func:`end_of_error` ends the run with one line per failure
    instead. Snakemake's log file keeps all of it."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.msg if isinstance(record.msg, str) else ""
        if text.startswith("RuleException:"):
            ours = "\nJobError in file " in text or (
                "\nCalledProcessError in file " in text
                and "/.snakemake/scripts/" in text
                and "returned non-zero exit status 1." in text
            )
            return not ours
        if text.startswith(ENDING):
            return False
        logs = getattr(record, "log", None)
        if text.startswith("Error in rule") and logs:
            return not any(failure(log.split(" ")[0]) for log in logs)
        return True


def failures_at_the_end() -> int:
    """Put :class:`FailureLines` on Snakemake's terminal handlers (not its log file's). Returns
    how many handlers it was put on."""
    put = 0
    for handler in logging.getLogger(SNAKEMAKE_LOGGER).handlers:
        if isinstance(handler, logging.FileHandler):
            continue
        if not any(isinstance(f, FailureLines) for f in handler.filters):
            handler.addFilter(FailureLines())
            put += 1
    return put


def failure_lines(jobs) -> list[str]:
    """One line per failed job in ``jobs`` (Snakemake's): ``headperturb: <rule> <wildcards>
    failed: <Type>: <cause> (log: <its log>)`` from the record the job wrote to its log; jobs that
    failed with the same cause share one line (their count and the first job's name and log);
    a job whose log holds no such record is named with its log, Snakemake's message being
    above."""
    causes: dict[str, list[tuple[str, str]]] = {}
    lines = []
    for job in sorted(jobs, key=str):
        logs = [str(f) for f in getattr(job, "log", [])]
        found = next((line for line in map(failure, logs) if line), None)
        where = f" (log: {logs[0]})" if logs else ""
        if found is None:
            lines.append(f"headperturb: {job} failed{where}; Snakemake says why above")
            continue
        name, _, why = found.partition(FAILED)
        causes.setdefault(why, []).append((name, where))
    first = []
    for why, named in causes.items():
        (name, where), more = named[0], len(named) - 1
        also = f" (and {more} more job(s) with this cause)" if more else ""
        first.append(f"headperturb: {name} failed{also}: {why}{where}")
    return first + lines


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


class WhenPlanned(logging.Filter):
    """On Snakemake's logger: when the run is planned (the DAG's job counts, or "Nothing to be
    done", in a dry run too), :func:`check_rerun_triggers`. Snakemake has no hook there (its
    ``onstart`` runs only when there are jobs, and not in a dry run): a finding stops the run
    before any job, with one line and exit code 1."""

    def __init__(self, workflow):
        super().__init__()
        self.workflow = workflow

    def filter(self, record: logging.LogRecord) -> bool:
        from snakemake.common import NOTHING_TO_BE_DONE_MSG
        from snakemake_interface_logger_plugins.common import LogEvent

        if getattr(record, "event", None) == LogEvent.RUN_INFO or record.msg == (
            NOTHING_TO_BE_DONE_MSG
        ):
            try:
                check_rerun_triggers(self.workflow)
            except NarrowedTriggersError as error:
                print(f"headperturb: {error}", file=sys.stderr)
                raise SystemExit(1) from None
        return True


def check_when_planned(workflow) -> None:
    """Put :class:`WhenPlanned` on Snakemake's logger (once)."""
    logger = logging.getLogger(SNAKEMAKE_LOGGER)
    if not any(isinstance(f, WhenPlanned) for f in logger.filters):
        logger.addFilter(WhenPlanned(workflow))


class NarrowedTriggersError(RuntimeError):
    """The config changed the settings of finished jobs that ``--rerun-triggers`` keeps."""


def check_rerun_triggers(workflow) -> None:
    """Before any job (the Snakefile's ``onstart``): where ``--rerun-triggers`` leaves out
    ``params`` (``--rerun-triggers mtime``), a finished job whose settings the config has changed
    since it ran would not run again, and the tables and the summary would keep its old
    settings without a word. The run stops with one line naming those steps and how to rerun
    them. Never in a dry run."""
    from snakemake.settings.types import RerunTrigger

    from headperturb.core import hints

    if RerunTrigger.PARAMS in workflow.rerun_triggers or getattr(workflow, "dag", None) is None:
        return
    if workflow.remote_exec or workflow.subprocess_exec:  # a job already on a node
        return
    dag, persistence = workflow.dag, workflow.persistence
    changed: dict[str, int] = {}
    for job in dag.jobs:
        if dag.needrun(job) or not persistence.has_metadata(job):
            continue
        if not persistence.has_outdated_metadata(job) and persistence.params_changed(job):
            changed[job.rule.name] = changed.get(job.rule.name, 0) + 1
    if changed:
        named = ", ".join(f"{rule} ({n} job(s))" for rule, n in sorted(changed.items()))
        raise NarrowedTriggersError(
            f"the config changes the settings of finished steps ({named}), but "
            f"--rerun-triggers leaves out params, so they would not run again and the results "
            f"would keep their old settings: run without --rerun-triggers, or "
            f"`{hints.command('--forcerun', *sorted(changed))}`"
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

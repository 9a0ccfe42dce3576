"""What the terminal shows of a run besides Snakemake's job lines: one line per failed job at
the run's end (:class:`FailureLines` keeps Snakemake's blocks for those jobs to its log file;
:func:`failure_lines` reads each job's cause from its log), and one line before any job where
``--rerun-triggers`` would keep results of changed settings (:class:`WhenPlanned`,
:func:`check_rerun_triggers`). Used by :mod:`headperturb.workflow.lifecycle`."""

from __future__ import annotations

import logging
import sys

from headperturb.joblog import FAILED, failure

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

"""A rule's step: the job around the function a rule runs (:func:`step`), the body of the scripts
of the rules that are processes of their own (:func:`script`), and what the steps build from the
rule's ``input`` and ``params``: the model (:func:`model_spec`), the prompts (:func:`prompt_files`)
and a job's recordings (:func:`job_inputs`). Imports no torch."""

from __future__ import annotations

import functools

from headperturb import joblog
from headperturb.workflow import lifecycle

RECORDED = ("state", "program", "activations", "cache", "rms", "pairs", "unperturbed")
"""The inputs a perturbation job may read besides the prompts
(:class:`headperturb.model.context.JobInputs`)."""


def step(func=None, *, quiet: bool = False):
    """Make ``func(input, output, params, wildcards, threads)`` a rule's step: called with the
    rule's ``log`` too, it runs as one job in the calling thread, its records in the log (and on
    the terminal unless ``quiet``: one of many small jobs). ``.step`` is ``func`` itself."""

    def wrap(func):
        @functools.wraps(func)
        def in_thread(input, output, params, wildcards, threads, log=None):
            name = f"{func.__name__} {described(wildcards)}".strip()
            try:
                with joblog.job(log[0] if log else None, name, echo=not quiet):
                    _run(func, quiet, (input, output, params, wildcards, threads))
            except joblog.JobError as error:
                # its traceback is in the log: the terminal gets the line
                raise error.with_traceback(None) from None

        in_thread.step = func
        return in_thread

    return wrap(func) if func is not None else wrap


def _run(func, quiet: bool, args: tuple) -> None:
    if joblog.INTERRUPTED.is_set():  # Snakemake still starts jobs it had queued
        raise joblog.Interrupted("the run was interrupted (Ctrl-C) before this job started")
    try:
        func(*args)
    finally:
        if not quiet:
            lifecycle.release_gpu_cache()


def script(snakemake, rule_step) -> None:
    """The body of ``workflow/scripts/<rule>.py``: this rule's step as a process of its own."""
    s = snakemake
    lifecycle.script_main(
        s.log[0] if s.log else None,
        rule_step.step,
        name=f"{s.rule} {described(s.wildcards)}".strip(),
        input=s.input,
        output=s.output,
        params=s.params,
        wildcards=s.wildcards,
        threads=s.threads,
    )


def described(wildcards) -> str:
    """A job's wildcards as ``key=value, ...``, for its name in the log."""
    items = wildcards.items() if hasattr(wildcards, "items") else vars(wildcards).items()
    return ", ".join(f"{k}={v}" for k, v in items)


def model_spec(input, params, threads):
    """The prepared model a step runs (:class:`headperturb.model.context.ModelSpec`)."""
    from headperturb.model.context import ModelSpec

    return ModelSpec(
        path=input.model,
        device=params.device,
        dtype=params.dtype,
        threads=int(threads),
        site=params.site,
    )


def prompt_files(input):
    """The run's prompts (:class:`headperturb.model.context.PromptFiles`)."""
    from headperturb.model.context import PromptFiles

    return PromptFiles(prompts=input.prompts, info=input.info)


def job_inputs(input):
    """What a perturbation job reads (:class:`headperturb.model.context.JobInputs`): the prompts
    and each of :data:`RECORDED` the rule gave it."""
    from headperturb.model.context import JobInputs

    recorded = {key: getattr(input, key, None) or None for key in RECORDED}
    return JobInputs(prompt_files(input), **recorded)

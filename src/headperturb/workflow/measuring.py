"""The heads one at a time: each head job, and the screen that estimates every head from one
forward and one backward pass per prompt, with its agreement with the exact measurements."""

from __future__ import annotations

import logging

from headperturb import joblog
from headperturb.core import files
from headperturb.model.rows import partners_of, read_pairs
from headperturb.workflow.rulestep import job_inputs, model_spec, prompt_files, step

log = logging.getLogger("headperturb")


@step(quiet=True)
def perturb_head(input, output, params, wildcards, threads):
    """One perturbed head (:func:`headperturb.model.headjob.perturb`)."""
    from headperturb.core.spec import Job
    from headperturb.core.targets import head_job
    from headperturb.model import headjob

    target = head_job(wildcards)
    job = Job(
        target=target,
        perturbation=target.perturbation(params.noise_mode),
        method=params.method,
        seed=params.seed,
        repeats=params.repeats,
        device=params.device,
        dtype=params.dtype,
    )
    headjob.perturb(job, job_inputs(input), model_spec(input, params, threads), output.result)


@step
def screen(input, output, params, wildcards, threads):
    """Estimate every head of every layer from one forward and one backward pass per prompt
    (:mod:`headperturb.model.gradients`, :mod:`headperturb.analysis.screen`)."""
    import pandas as pd

    from headperturb.analysis import screen as sc
    from headperturb.model import gradients, recordings
    from headperturb.model.context import gpu_memory_hint, load_engine, prefix_of, prompt_ids

    prompts, settings, model = (
        prompt_files(input),
        params.settings,
        model_spec(input, params, threads),
    )
    engine, sites, model_info, info = load_engine(prompts, model)
    ids, pids, labels = prompt_ids(prompts.prompts)
    positions = settings["positions"]
    base = files.read_parquet(input.per_prompt, ["prompt_id", "calibrated_margin"])
    if base["prompt_id"].tolist() != list(pids):
        raise ValueError(f"{input.per_prompt} does not hold the run's prompts in order")
    means = gpu_memory_hint(gradients.head_means, engine, ids, sites)
    partners = None
    if "patch" in settings["kinds"]:
        partners = partners_of(read_pairs(input.pairs), pids)
    progress = joblog.Progress(len(ids), "screen: forward and backward passes", log)
    sums = gpu_memory_hint(
        gradients.gradient_sums,
        engine,
        ids,
        sites,
        means,
        progress=progress,
        partners=partners,
        positions=positions,
        prefix=prefix_of(info, ids[0], model.path, positions),
    )
    est = sc.estimates(
        sums,
        prompt_ids=pids,
        labels=labels,
        calibrated_margins=base["calibrated_margin"].to_numpy(),
        layers=[s.layer for s in sites],
        settings=_screen_settings(settings, input),
    )
    prompts_sha256 = recordings.file_digest(prompts.info)
    step_settings = {"step": "screen", **settings, "prompts_sha256": prompts_sha256}
    meta = recordings.provenance(model_info, str(engine.device), step_settings)
    files.write_parquet(output.estimates, est, meta)
    files.write_parquet(output.heads, sc.per_head(pd.DataFrame(est)), meta)
    n_heads = sites[0].n_heads * len(sites)
    log.info("screened %d heads of %d layers on %d prompts", n_heads, len(sites), len(ids))


def _screen_settings(settings: dict, input) -> list[tuple]:
    """What the screen estimates: (kind, position, scale text, sigma) per kind, position and
    scale; sigma = scale, or scale x each head's RMS output (a layer x head grid) for relative
    noise."""
    from headperturb.core.kinds import format_scale
    from headperturb.core.spec import takes_scale

    rms = 1.0
    if settings["noise_mode"] == "relative":
        table = files.read_parquet(input.rms)
        table = table[table["site"] == "o_proj_input"]
        rms = table.pivot(index="layer", columns="head", values="rms").to_numpy()
    plan = []
    for kind in settings["kinds"]:
        for position in settings["positions"]:
            if not takes_scale(kind):
                plan.append((kind, position, "", None))
                continue
            for scale in settings["scales"]:
                plan.append((kind, position, format_scale(scale), float(scale) * rms))
    return plan


@step
def screen_agreement(input, output, params, wildcards, threads):
    """How well the screen agreed with the exact measurements, head by head."""
    from headperturb.analysis import screen as sc

    table, heads = files.read_parquet(input.table), files.read_parquet(input.heads)
    summary, disagree = sc.agreement(table, heads, params.threshold)
    files.write_csv(output.agreement, summary)
    files.write_csv(output.disagreements, disagree)

"""The run's results: the table of every head, the figures and the one-page summary."""

from __future__ import annotations

import logging
from pathlib import Path

from headperturb.core import files, hints
from headperturb.workflow.rulestep import step

log = logging.getLogger("headperturb")


@step
def aggregate(input, output, params, wildcards, threads):
    """The run's table (:func:`headperturb.analysis.aggregation.aggregate`), after checking every
    per-head file's settings against the run's."""
    from headperturb.analysis import aggregation
    from headperturb.model import recordings

    info, prompts_sha256 = files.read_json(input.info), recordings.file_digest(input.info)
    baseline = files.read_parquet_metadata(input.baseline_per_prompt)
    if baseline.get("settings", {}).get("prompts_sha256") != prompts_sha256:
        raise aggregation.StaleResultsError(
            f"{input.baseline_per_prompt} was computed for other prompts than {input.info} holds "
            f"now: redo it with `{hints.command('--forcerun', input.baseline_per_prompt)}`"
        )
    check = {
        "jobs": params.jobs,
        "run": params.run,
        "prompts_sha256": prompts_sha256,
        "offset": float(info.get("calibration", {}).get("offset", 0.0)),
        "weights_sha256": baseline.get("model_weights_sha256"),
        "stale_list": params.stale_list,
    }
    paths = {
        "baseline": input.baseline,
        "baseline_per_prompt": input.baseline_per_prompt,
        "perturbed": list(input.perturbed),
        "parquet": output.parquet,
        "csv": output.csv,
    }
    aggregation.aggregate(
        paths, params.high, params.medium, statistics=params.statistics, check=check
    )


@step
def plot(input, output, params, wildcards, threads):
    """One figure (:data:`headperturb.analysis.figures.PLOTS`)."""
    from headperturb.analysis import figures

    figures.plot(wildcards.plot, input.table, output.figure)


@step
def summarize(input, output, params, wildcards, threads):
    """The run's findings on one page (:func:`headperturb.analysis.summary.summary_markdown`)."""
    from headperturb.analysis import aggregation, summary
    from headperturb.model.loading import INFO_FILE

    table, meta = aggregation.read_table(input.table)
    screened = _screened(input)
    pairs = files.read_parquet(input.pairs) if getattr(input, "pairs", None) else None
    curves = _curves(input)
    repair = files.read_parquet(input.direct) if getattr(input, "direct", None) else None
    extras = summary.Extras(
        screened=screened, pairs=pairs, curves=curves, repair=repair, anatomy=_anatomy(input)
    )
    text = summary.summary_markdown(
        table,
        meta,
        prompt_info=files.read_json(input.info),
        model_info=files.read_json(Path(input.model) / INFO_FILE),
        settings=params.settings,
        extras=extras,
    )
    files.write_text(output.summary, text)


def _screened(input) -> dict | None:
    """The screen's agreement, disagreements and per-head estimates, when the screen ran."""
    if not getattr(input, "agreement", None):
        return None
    screened = {k: files.read_csv(getattr(input, k)) for k in ("agreement", "disagreements")}
    screened["heads"] = files.read_parquet(input.screen)
    return screened


def _anatomy(input) -> dict | None:
    """The anatomy tables (:data:`headperturb.core.targets.ANATOMY_FILES`), where the run has
    them."""
    if not getattr(input, "anatomy_heads", None):
        return None
    found = {}
    for name in ("heads", "shares", "types", "writes", "correlations"):
        path = getattr(input, f"anatomy_{name}")
        found[name] = files.read_csv(path) if path.endswith(".csv") else files.read_parquet(path)
    return found


def _curves(input) -> dict | None:
    """The curves' points, their control band and the model's heads, when curves ran."""
    if not getattr(input, "curve_points", None):
        return None
    return {
        "points": files.read_parquet(input.curve_points),
        "band": files.read_csv(input.curve_summary),
        "n_total": files.read_parquet_metadata(input.curve_points)["n_heads_total"],
    }

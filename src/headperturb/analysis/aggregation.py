"""The run's table: one row per head job, with contribution scores, intervals, tests, impact
categories and how certain each category is.

:func:`check_results` first makes sure every per-head file is what this run's config asked for
(Snakemake's rerun triggers catch most changes; the check catches the rest: jobs orphaned by a
killed Snakemake, copied folders, files without metadata). :func:`job_row` reduces one file to its
row; :func:`build_table` puts the rows together with the baseline.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from headperturb.analysis import effects, stats
from headperturb.analysis.scoring import METRICS, interval_columns, metrics
from headperturb.core import files, hints
from headperturb.core.kinds import PERTURBATIONS
from headperturb.core.spec import HeadJob, Job

log = logging.getLogger("headperturb")

COMPARED = (
    *("site", "position", "kind", "scale", "layer", "head"),
    *("noise_mode", "seed", "repeats", "method", "dtype", "prompts_sha256", "calibration_offset"),
)
"""The settings of a per-head file that must equal what the run asks for."""


class StaleResultsError(RuntimeError):
    """Per-head files that were computed for other settings than this run's."""


def expected_settings(job: dict, run: dict, prompts_sha256: str, offset: float) -> dict:
    """What the file of ``job`` (a :class:`headperturb.core.spec.HeadJob` as a dict) must hold,
    given the run's settings (``noise_mode``, ``seed``, ``repeats``, ``method``, ``dtype``)."""
    target = HeadJob(**job)
    settings = Job(
        target,
        target.perturbation(run["noise_mode"]),
        method=run["method"],
        seed=int(run["seed"]),
        repeats=int(run["repeats"]),
        dtype=run["dtype"],
    ).settings()
    return {**settings, "prompts_sha256": prompts_sha256, "calibration_offset": float(offset)}


def check_results(
    paths: list[str],
    jobs: list[dict],
    run: dict,
    prompts_sha256: str,
    offset: float,
    weights_sha256: str | None,
    stale_list: str | Path,
) -> None:
    """Raise :class:`StaleResultsError` unless every file in ``paths`` holds the settings its job
    asks for (:func:`expected_settings`) and the baseline's model weights. The stale files are
    written to ``stale_list``, one per line, for ``--forcerun``."""
    stale = []
    for path, job in zip(paths, jobs):
        meta = files.read_parquet_metadata(path)
        found = dict(meta.get("settings", {}))
        want = expected_settings(job, run, prompts_sha256, offset)
        diffs = [
            f"{k} {found.get(k)!r}, config {want[k]!r}"
            for k in COMPARED
            if not _same(found.get(k), want[k])
        ]
        if weights_sha256 and meta.get("model_weights_sha256") != weights_sha256:
            diffs.append("model weights differ from the baseline's")
        if diffs:
            stale.append(f"{path}: {'; '.join(diffs[:3])}")
    if stale:
        files.write_text(stale_list, "".join(line.split(":", 1)[0] + "\n" for line in stale))
        raise StaleResultsError(
            f"{len(stale)} per-head result file(s) were computed with other settings than this "
            f"run's config, so the table would mix settings; they are listed in {stale_list}; "
            f"redo them with: {hints.command('--forcerun', f'$(cat {stale_list})')}\n  "
            + "\n  ".join(stale)
        )


def _same(a, b) -> bool:
    if isinstance(b, float) and isinstance(a, (int, float)):
        return bool(np.isclose(a, b, rtol=0, atol=1e-12) or (np.isnan(a) and np.isnan(b)))
    return a == b


FLIPPED = (*METRICS, "logit_diff", "probability", "auc", "accuracy_bias", "accuracy_discrimination")
"""The changes whose sign a ``restore`` row turns around: there the reference is the partner's
run, and restored - partner (not partner - restored) is the head's contribution."""


def _flip(out: dict) -> None:
    for name in FLIPPED:
        low, high = out[f"ci_low_{name}"], out[f"ci_high_{name}"]
        out[f"change_{name}"] = 0.0 - out[f"change_{name}"]  # 0.0 - x: never -0.0
        out[f"ci_low_{name}"], out[f"ci_high_{name}"] = 0.0 - high, 0.0 - low


def job_row(frame: pd.DataFrame, baseline: pd.DataFrame | None = None, **stat_kwargs) -> dict:
    """One per-head file's row: metrics (mean and sd over its draws) and, given the baseline's
    per-prompt frame, the unperturbed model's metrics on the same prompts and the changes with
    intervals and p-values (:func:`stats.paired_summary`).

    The reference a change is measured from is the unperturbed run of the same prompts; for
    ``restore`` it is the run of each prompt's partner (scored against the prompt's label), and the
    changes are counted restored - partner, so a positive contribution still means the head
    carries the task."""
    groups = [g for _, g in frame.groupby("draw")]
    per_draw = [metrics(g["label"], g["prediction"]) for g in groups]
    first = frame.iloc[0]
    row = {key: first[key] for key in stats.KEYS}
    row["layer"], row["head"], row["scale"] = int(row["layer"]), int(row["head"]), str(row["scale"])
    row["draws"] = len(per_draw)
    row["noise_mode"], row["sigma"] = str(first["noise_mode"]), float(first["sigma"])
    for metric in METRICS:
        values = np.array([m[metric] for m in per_draw])
        row[metric] = float(values.mean())
        row[f"{metric}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    row["mean_margin"] = float(frame["margin"].mean())
    if baseline is None:
        return row
    wide = frame.pivot(
        index="prompt_id", columns="draw", values=["prediction", "calibrated_margin"]
    )
    labels = frame.groupby("prompt_id")["label"].first().loc[wide.index].to_numpy()
    base = baseline.set_index("prompt_id")
    clean = base.loc[wide.index]
    kind = PERTURBATIONS[str(first["kind"])]
    reference, patching = clean, None
    if kind.paired:
        partner = base.loc[frame.groupby("prompt_id")["partner_id"].first().loc[wide.index]]
        patching = (
            clean["calibrated_margin"].to_numpy(),
            partner["calibrated_margin"].to_numpy(),
            kind.runs_partner,
        )
        reference = partner if kind.runs_partner else clean
    row["n_prompts"] = len(wide)
    for metric, value in metrics(labels, clean["prediction"]).items():
        if metric in METRICS:
            row[f"baseline_{metric}"] = value
    row["baseline_auc"] = effects.roc_auc(labels, clean["calibrated_margin"])
    row["reference_accuracy"] = metrics(labels, reference["prediction"])["accuracy"]
    out = stats.paired_summary(
        labels,
        (reference["prediction"].to_numpy(), reference["calibrated_margin"].to_numpy()),
        (wide["prediction"].to_numpy(), wide["calibrated_margin"].to_numpy()),
        patching=patching,
        **stat_kwargs,
    )
    if kind.runs_partner:
        _flip(out)
    row.update(out)
    half = row["draws"] // 2
    if half:
        accs = np.array([m["accuracy"] for m in per_draw])
        row["_halves"] = (accs[:half].mean(), accs[half : 2 * half].mean())
    return row


FIRST_COLUMNS = [
    *stats.KEYS,
    *("draws", "n_prompts"),
    *("baseline_accuracy", "accuracy", "contribution_accuracy", "ci_low", "ci_high"),
    *("relative_change_accuracy", "p_value", "q_value", "significant", "direction", "impact"),
    *("conclusive", "categories_spanned", "category_stable", "effect"),
    *("baseline_auc", "auc", "change_auc", "ci_low_auc", "ci_high_auc", "p_value_auc"),
    *("q_value_auc", "bias_shift", "ci_low_bias_shift", "ci_high_bias_shift"),
    *("contribution_accuracy_bias", "ci_low_accuracy_bias", "ci_high_accuracy_bias"),
    *("p_value_bias", "q_value_bias"),
    *("contribution_accuracy_discrimination", "ci_low_accuracy_discrimination"),
    *("ci_high_accuracy_discrimination", "impact_discrimination"),
    *("patch_effect", "ci_low_patch_effect", "ci_high_patch_effect"),
    *("reference_accuracy", "reference_auc"),
    *("baseline_f1", "f1", "contribution_f1", "ci_low_f1", "ci_high_f1", "relative_change_f1"),
]


SETTING_KEYS = ["site", "position", "kind", "scale"]
"""A setting: the rows a ``statistics.correction: setting`` corrects together."""


def qvalues(table: pd.DataFrame, column: str, correction: str = "setting") -> np.ndarray:
    """Benjamini-Hochberg q-values of ``column`` over every row (``run``) or within each setting
    (``setting``: :data:`SETTING_KEYS`)."""
    if correction == "run":
        return stats.bh_qvalues(table[column])
    if correction != "setting":
        raise ValueError(f"correction {correction!r} is not allowed; allowed: run, setting")
    out = np.full(len(table), np.nan)
    for _, index in table.groupby(SETTING_KEYS, sort=False, dropna=False).indices.items():
        out[index] = stats.bh_qvalues(table[column].to_numpy()[index])
    return out


def build_table(
    rows: list[dict], high: float, medium: float, alpha: float, correction: str = "setting"
) -> pd.DataFrame:
    """The table from the per-job rows: contributions, q-values (Benjamini-Hochberg over the run
    or within each setting: ``correction``), categories with their certainty and stability
    between halves of the draws, and each row's effect
    (:func:`headperturb.analysis.effects.effect`)."""
    halves = [row.pop("_halves", (np.nan, np.nan)) for row in rows]
    table = pd.DataFrame(rows)
    for metric in METRICS:
        table[f"contribution_{metric}"] = table.pop(f"change_{metric}")
    table = table.rename(
        columns={
            "change_accuracy_bias": "contribution_accuracy_bias",
            "change_accuracy_discrimination": "contribution_accuracy_discrimination",
        }
    )
    if "patch_effect" not in table.columns:
        table = table.assign(
            patch_effect=np.nan, ci_low_patch_effect=np.nan, ci_high_patch_effect=np.nan
        )
    order = {
        tuple(r[k] for k in stats.KEYS): (h, r["baseline_accuracy"]) for r, h in zip(rows, halves)
    }
    table = stats.aggregate(table, high=high, medium=medium)
    short = dict(zip(("ci_low_accuracy", "ci_high_accuracy"), interval_columns("accuracy")))
    table = table.rename(columns=short)
    for name in ("", "_logit_diff", "_auc", "_bias"):
        table[f"q_value{name}"] = qvalues(table, f"p_value{name}", correction)
    table["significant"] = table["q_value"] < alpha
    spans = [  # the categories the 95% interval of the relative change reaches
        stats.category_span(100 * lo / base, 100 * hi / base, high, medium) if base else []
        for lo, hi, base in zip(table["ci_low"], table["ci_high"], table["baseline_accuracy"])
    ]
    table["categories_spanned"] = ["-".join(s) for s in spans]
    table["conclusive"] = [len(s) == 1 for s in spans]
    with np.errstate(invalid="ignore", divide="ignore"):
        rest = 100 * table["contribution_accuracy_discrimination"] / table["baseline_accuracy"]
    table["impact_discrimination"] = [stats.impact_category(r, high, medium) for r in rest]
    table["effect"] = [
        effects.effect(a_lo, a_hi, q, b_lo, b_hi, b_q, alpha)
        for a_lo, a_hi, q, b_lo, b_hi, b_q in zip(
            table["ci_low_auc"],
            table["ci_high_auc"],
            table["q_value_auc"],
            table["ci_low_accuracy_bias"],
            table["ci_high_accuracy_bias"],
            table["q_value_bias"],
        )
    ]
    rel_halves = []
    for key in zip(*(table[k] for k in stats.KEYS)):
        (first, second), base = order[key]
        rel_halves.append(tuple(float(stats.relative_change(base, x)) for x in (first, second)))
    table["category_stable"] = stats.category_stability(rel_halves, high, medium)
    return table[FIRST_COLUMNS + [c for c in table.columns if c not in FIRST_COLUMNS]]


def aggregate(
    paths: dict,
    high: float,
    medium: float,
    statistics: dict | None = None,
    check: dict | None = None,
):
    """Check the per-head files (``check``: the arguments of :func:`check_results` but the
    paths), build the table and write it as Parquet (with its metadata) and CSV. ``paths``
    holds ``baseline`` (metrics.json), ``baseline_per_prompt``, ``perturbed`` (the per-head
    files), ``parquet`` and ``csv`` (the table's)."""
    statistics = dict(statistics or {})
    alpha = float(statistics.pop("alpha", 0.05))
    correction = str(statistics.pop("correction", "setting"))
    stat_kwargs = {
        "n_boot": int(statistics.get("bootstrap", 2000)),
        "n_perm": int(statistics.get("permutations", 10_000)),
        "seed": int(statistics.get("seed", 0)),
    }
    if check is not None:
        check_results(list(paths["perturbed"]), **check)
    baseline = files.read_json(paths["baseline"])
    base_frame = files.read_parquet(paths["baseline_per_prompt"])
    rows = [job_row(files.read_parquet(p), base_frame, **stat_kwargs) for p in paths["perturbed"]]
    table = build_table(rows, high, medium, alpha, correction)
    judged = table["category_stable"].dropna()
    share = float(judged.astype(bool).mean()) if len(judged) else None
    detectable = float(np.nanmedian(table["detectable_change"])) if len(table) else None
    meta = {
        "baseline": baseline,
        "high": high,
        "medium": medium,
        "alpha": alpha,
        "correction": correction,
        "statistics": stat_kwargs,
        "stability_share": share,
        "detectable_change": detectable,
    }
    files.write_parquet(paths["parquet"], table, meta)
    files.write_csv(paths["csv"], table)
    _log_table(table, baseline, alpha)
    if share is not None:
        log.info(
            "category stability: %.0f%% of %d heads keep their category between two halves "
            "of the draws",
            100 * share,
            len(judged),
        )
    return table


def _log_table(table: pd.DataFrame, baseline: dict, alpha: float) -> None:
    """One line on the run's table: its size, the baseline, the categories and effects."""
    counts = stats.category_counts(table)
    effect = table["effect"].value_counts()
    log.info(
        "%d perturbations; baseline accuracy %.4f, F1 %.4f; impact %s; %d significant (q < %g); "
        "%d inconclusive; effect: %s",
        len(table),
        baseline["accuracy"],
        baseline["f1"],
        ", ".join(f"{k} {v}" for k, v in counts.items()),
        int(table["significant"].sum()),
        alpha,
        int((~table["conclusive"]).sum()),
        ", ".join(f"{k} {int(effect.get(k, 0))}" for k in effects.EFFECTS),
    )


def read_table(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """The contribution table and its metadata (baseline metrics, thresholds)."""
    return files.read_parquet(path), files.read_parquet_metadata(path)

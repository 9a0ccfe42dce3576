"""The workflow's steps as plain functions: read the inputs, run the engine, write the outputs.

The Snakemake scripts only pass paths and settings to these functions, so every step can be run
and tested without Snakemake.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__, io, scoring, stats
from .logs import Progress

log = logging.getLogger("headperturb")


def provenance(model_info: dict, device: str) -> dict:
    """What produced a result file: versions, model source and weights hash, device."""
    import torch
    import transformers

    return {
        "headperturb_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "model_source": model_info.get("source"),
        "model_weights_sha256": model_info.get("weights_sha256"),
        "model_architecture": model_info.get("architecture"),
        "device": device,
    }


def _load(model_dir, prompts_path, info_path, device, dtype, threads):
    from . import models
    from .engine import Engine

    models.set_threads(threads)
    model, _tokenizer, model_info = models.load_prepared(model_dir, device=device, dtype=dtype)
    prompts = pd.read_parquet(prompts_path)
    info = io.read_json(info_path)
    engine = Engine(model, info["prefix_len"], info["verbalizer_token_ids"])
    ids = [np.asarray(x, dtype=np.int64) for x in prompts["input_ids"]]
    return model, model_info, prompts, engine, ids


def run_baseline(
    *, prompts_path, info_path, model_dir, per_prompt_path, metrics_path, device, dtype, threads
) -> dict:
    model, model_info, prompts, engine, ids = _load(
        model_dir, prompts_path, info_path, device, dtype, threads
    )
    logits = engine.baseline(ids, Progress(len(ids), "baseline prompts", log))
    frame = scoring.per_prompt(prompts["prompt_id"], prompts["label"], logits)
    result = scoring.metrics(frame["label"], frame["prediction"])
    result["mean_margin"] = float(frame["margin"].mean())
    meta = provenance(model_info, str(engine.device))
    io.write_parquet(per_prompt_path, frame, meta)
    io.write_json(metrics_path, result)
    log.info(
        "baseline: accuracy %.4f, macro-F1 %.4f on %d prompts",
        result["accuracy"], result["f1"], result["n_prompts"],
    )  # fmt: skip
    return result


def run_perturbation(
    *,
    prompts_path,
    info_path,
    model_dir,
    out_path,
    site: str,
    layer: int,
    head: int,
    scale: str,
    repeats: int,
    seed: int,
    device,
    dtype,
    threads,
    site_override=None,
) -> pd.DataFrame:
    from .sites import locate_sites

    model, model_info, prompts, engine, ids = _load(
        model_dir, prompts_path, info_path, device, dtype, threads
    )
    head_site = locate_sites(model, site_override)[layer]
    logits = engine.perturbed_naive(
        ids,
        prompts["prompt_id"].tolist(),
        site=head_site,
        head=head,
        where=site,
        scale=float(scale),
        draws=repeats,
        seed=seed,
        progress=Progress(len(ids), f"{site} layer {layer} head {head} scale {scale}", log),
    )
    frames = []
    for draw in range(repeats):
        frame = scoring.per_prompt(prompts["prompt_id"], prompts["label"], logits[:, draw, :])
        frame.insert(0, "draw", draw)
        frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    out.insert(0, "seed", seed)
    out.insert(0, "scale", scale)
    out.insert(0, "head", head)
    out.insert(0, "layer", layer)
    out.insert(0, "site", site)
    meta = provenance(model_info, str(engine.device))
    io.write_parquet(out_path, out, meta)
    acc = out.groupby("draw")["correct"].mean()
    log.info("accuracy per draw: %s", ", ".join(f"{a:.4f}" for a in acc))
    return out


def job_metrics(frame: pd.DataFrame) -> dict:
    """Accuracy and F1 of one perturbation file: mean (and sd) over its draws."""
    per_draw = [scoring.metrics(g["label"], g["prediction"]) for _, g in frame.groupby("draw")]
    first = frame.iloc[0]
    row = {key: first[key] for key in stats.KEYS}
    row["layer"], row["head"], row["scale"] = int(row["layer"]), int(row["head"]), str(row["scale"])
    row["draws"] = len(per_draw)
    for metric in ("accuracy", "f1"):
        values = np.array([m[metric] for m in per_draw])
        row[metric] = float(values.mean())
        row[f"{metric}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    row["mean_margin"] = float(frame["margin"].mean())
    return row


def run_aggregation(*, baseline_path, perturbed_paths, parquet_path, csv_path, high, medium):
    baseline = io.read_json(baseline_path)
    rows = [job_metrics(pd.read_parquet(p)) for p in perturbed_paths]
    table = stats.aggregate(baseline, pd.DataFrame(rows), high=high, medium=medium)
    io.write_parquet(parquet_path, table, {"baseline": baseline, "high": high, "medium": medium})
    with io.atomic_path(csv_path, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    counts = stats.category_counts(table)
    log.info(
        "%d perturbations; baseline accuracy %.4f, F1 %.4f; impact %s",
        len(table), baseline["accuracy"], baseline["f1"],
        ", ".join(f"{k} {v}" for k, v in counts.items()),
    )  # fmt: skip
    return table


def read_table(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """The contribution table and its metadata (baseline metrics, thresholds)."""
    return pd.read_parquet(path), io.read_parquet_metadata(path)

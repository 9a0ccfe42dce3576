"""The workflow's steps as plain functions: read the inputs, run the engine, write the outputs.

The Snakemake scripts only pass paths and settings to these functions, so every step can be run
and tested without Snakemake.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import __version__, io, scoring
from .logs import Progress

if TYPE_CHECKING:
    import pandas as pd

# pandas, stats, torch and transformers are imported where they are used: a last-layer
# perturbation job (perturb_with_program) needs only torch and pyarrow, not the model code.

log = logging.getLogger("headperturb")


def provenance(model_info: dict, device: str, settings: dict | None = None) -> dict:
    """What produced a result file: versions, model source and weights hash, device, and the
    step's effective settings with their sha256 (no timestamps or host names: reruns stay
    byte-identical; those belong in the logs)."""
    import hashlib
    import json
    from importlib.metadata import version

    import torch

    settings = dict(settings or {})
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "settings": settings,
        "config_sha256": digest,
        "headperturb_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": version("transformers"),
        "model_source": model_info.get("source"),
        "model_weights_sha256": model_info.get("weights_sha256"),
        "model_architecture": model_info.get("architecture"),
        "device": device,
    }


@contextlib.contextmanager
def gpu_memory_hint():
    """Turn CUDA's out-of-memory error into one message that says what lowers memory."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        from .models import ModelError

        raise ModelError(
            "out of GPU memory: lower prompts.n_test or prompts.max_review_tokens, set "
            "model.dtype: bfloat16, lower perturbation.repeats (draws run in one batch), or run "
            f"on model.device: cpu ({str(exc).splitlines()[0]})"
        ) from None


def _prompt_digest(info_path) -> str:
    import hashlib

    return hashlib.sha256(Path(info_path).read_bytes()).hexdigest()


def _load(model_dir, prompts_path, info_path, device, dtype, threads):
    import pandas as pd

    from . import models
    from .engine import Engine

    models.set_threads(threads)
    model, _, model_info = models.load_prepared(
        model_dir, device=device, dtype=dtype, tokenizer=False
    )
    prompts = pd.read_parquet(prompts_path)
    info = io.read_json(info_path)
    engine = Engine(model, info["prefix_len"], info["verbalizer_token_ids"])
    ids = [np.asarray(x, dtype=np.int64) for x in prompts["input_ids"]]
    return model, model_info, prompts, engine, ids


def run_baseline(
    *,
    prompts_path,
    info_path,
    model_dir,
    per_prompt_path,
    metrics_path,
    state_path,
    device,
    dtype,
    threads,
    rms_path=None,
    program_dir=None,
    site_override=None,
) -> dict:
    """Score the unperturbed model; also save the last layer's final-position state and, in
    ``program_dir``, the last layer as a program for the perturbation jobs (:mod:`.tail`)."""
    import pandas as pd

    from .sites import locate_sites

    model, model_info, prompts, engine, ids = _load(
        model_dir, prompts_path, info_path, device, dtype, threads
    )
    sites = locate_sites(model, site_override)
    last = sites[-1]
    with gpu_memory_hint():
        logits, state = engine.baseline(
            ids,
            Progress(len(ids), "baseline prompts", log),
            record=last,
            rms_sites=sites if rms_path else None,
        )
    _save_tensors(state_path, state, {"layer": str(last.layer)})
    if program_dir:
        export_last_layer(engine, last, state, program_dir, dtype)
    if rms_path:
        io.write_parquet(rms_path, pd.DataFrame(engine.head_rms()))
    frame = scoring.per_prompt(prompts["prompt_id"], prompts["label"], logits)
    result = scoring.metrics(frame["label"], frame["prediction"])
    result["mean_margin"] = float(frame["margin"].mean())
    settings = {"step": "baseline", "dtype": dtype, "prompts_sha256": _prompt_digest(info_path)}
    meta = provenance(model_info, str(engine.device), settings)
    io.write_parquet(per_prompt_path, frame, meta)
    io.write_json(metrics_path, result)
    log.info(
        "baseline: accuracy %.4f, macro-F1 %.4f on %d prompts",
        result["accuracy"], result["f1"], result["n_prompts"],
    )  # fmt: skip
    return result


def export_last_layer(engine, site, state, program_dir, dtype) -> bool:
    """Export the last layer as a program (:func:`.tail.export`) into ``program_dir``. A model the
    export cannot trace gets a ``program.json`` that says why; its jobs then load the model."""
    from . import tail

    meta = tail.describe(engine.model, site, engine.token_ids, str(engine.device), dtype)
    try:
        exported = tail.export(engine.model, site, engine.token_ids, state)
    except Exception as exc:  # any tracing failure: the jobs fall back to the model
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.warning("could not export the last layer (%s); its jobs will load the model", reason)
        tail.save(program_dir, None, {**meta, "reason": reason})
        return False
    tail.save(program_dir, exported, meta)
    log.info("exported the last layer (layer %d) to %s", site.layer, program_dir)
    return True


def _save_tensors(path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    with io.atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _load_tensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def run_capture(
    *,
    prompts_path,
    info_path,
    model_dir,
    out_path,
    layer,
    device,
    dtype,
    threads,
    site_override=None,
) -> None:
    """Save the residual stream entering ``layer`` at every position of every prompt."""
    from .sites import locate_sites

    model, _info, _prompts, engine, ids = _load(
        model_dir, prompts_path, info_path, device, dtype, threads
    )
    site = locate_sites(model, site_override)[layer]
    captured = engine.capture_layer_inputs(
        ids, site, Progress(len(ids), f"layer {layer} inputs", log)
    )
    _save_tensors(out_path, captured, {"layer": str(layer)})


METHODS = ("fast", "naive")


def run_perturbation(
    *,
    prompts_path,
    info_path,
    model_dir,
    out_path,
    activations_path=None,
    program_dir=None,
    method: str = "fast",
    site: str,
    layer: int,
    head: int,
    scale: str,
    repeats: int,
    kind: str = "noise",
    noise_mode: str = "absolute",
    rms_path=None,
    seed: int,
    device,
    dtype,
    threads,
    site_override=None,
) -> dict[str, np.ndarray]:
    """Score every prompt with one head perturbed, every draw; write and return the columns.

    A last-layer job given ``program_dir`` (method ``fast``) runs the baseline's exported last
    layer (:func:`perturb_with_program`) and never loads the model; every other job loads it."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not allowed; allowed: {', '.join(METHODS)}")
    job = dict(site=site, layer=layer, head=head, scale=scale, kind=kind, noise_mode=noise_mode,
               repeats=repeats, seed=seed, method=method, dtype=dtype)  # fmt: skip
    if method == "fast" and program_dir is not None:
        out = perturb_with_program(
            program_dir=program_dir, prompts_path=prompts_path, info_path=info_path,
            model_dir=model_dir, out_path=out_path, state_path=activations_path,
            rms_path=rms_path, device=device, threads=threads, **job,
        )  # fmt: skip
        if out is not None:
            return out
    return _perturb_with_model(
        prompts_path=prompts_path, info_path=info_path, model_dir=model_dir, out_path=out_path,
        activations_path=activations_path, rms_path=rms_path, device=device, threads=threads,
        site_override=site_override, **job,
    )  # fmt: skip


def _perturb_with_model(*, prompts_path, info_path, model_dir, out_path, activations_path,
                        rms_path, device, threads, site_override, site, layer, head, scale, kind,
                        noise_mode, repeats, seed, method, dtype):  # fmt: skip
    from .sites import locate_sites

    model, model_info, prompts, engine, ids = _load(
        model_dir, prompts_path, info_path, device, dtype, threads
    )
    sites = locate_sites(model, site_override)
    target = sites[layer]
    pids = prompts["prompt_id"].tolist()
    last = layer == len(sites) - 1
    activations = None if method == "naive" else _load_tensors(activations_path)

    def clean():
        if activations is not None and last:
            return engine.final_activations(activations, target, head, site)
        return engine.head_activations(ids, target, head, site, activations)

    values, mode, draws = _perturbation(
        kind, engine.width(target, head, site), clean, layer, head, repeats, seed
    )
    sigma = _sigma(kind, scale, noise_mode, rms_path, site, layer, head)
    kwargs = dict(site=target, head=head, where=site, scale=sigma, draws=draws,
                  seed=seed, values=values, mode=mode)  # fmt: skip
    what = f"{site} {kind} layer {layer} head {head}" + (f" scale {scale}" if scale else "")
    with gpu_memory_hint():
        if method == "naive":
            progress = Progress(len(ids), what, log)
            logits = engine.perturbed_naive(ids, pids, progress=progress, **kwargs)
        elif last:
            logits = engine.perturbed_last(activations, pids, **kwargs)
        else:
            progress = Progress(len(ids), what, log)
            logits = engine.perturbed_from_layer(
                activations, ids, pids, progress=progress, **kwargs
            )
    return _write_perturbation(
        out_path, pids, prompts["label"].to_numpy(), logits, model_info, str(engine.device),
        info_path, "model", site=site, kind=kind, layer=layer, head=head, scale=scale,
        noise_mode=noise_mode, sigma=sigma, seed=seed, method=method, dtype=dtype,
    )  # fmt: skip


def perturb_with_program(*, program_dir, prompts_path, info_path, model_dir, out_path,
                         state_path, rms_path, device, threads, site, layer, head, scale, kind,
                         noise_mode, repeats, seed, method, dtype):  # fmt: skip
    """A last-layer job from the baseline's final state and exported last layer: torch and
    pyarrow only, every prompt and draw in one call. None when there is no program for this
    job's device (the caller then loads the model)."""
    import pyarrow.parquet as pq

    from . import models, tail

    models.set_threads(threads)
    resolved = models.resolve_device(device)
    program, meta = tail.load(program_dir, resolved)
    if program is None:
        log.info("last-layer program not used: %s; loading the model", meta)
        return None
    if meta["layer"] != layer:
        raise ValueError(f"the program in {program_dir} is layer {meta['layer']}, not {layer}")
    state = _load_tensors(state_path)
    prompts = pq.ParquetFile(prompts_path).read(columns=["prompt_id", "label"])
    pids = prompts.column("prompt_id").to_pylist()
    if len(pids) != len(state["n_tokens"]):
        raise ValueError(f"{state_path} holds {len(state['n_tokens'])} prompts, not {len(pids)}")

    def clean():
        return [row[None] for row in tail.clean_outputs(state, meta, head, site)]

    cols = tail.columns(meta, head, site)
    values, mode, draws = _perturbation(
        kind, cols.stop - cols.start, clean, layer, head, repeats, seed
    )
    sigma = _sigma(kind, scale, noise_mode, rms_path, site, layer, head)
    with gpu_memory_hint():
        logits = tail.perturbed(program, state, pids, meta, head=head, where=site, draws=draws,
                                scale=sigma, seed=seed, values=values, mode=mode,
                                device=resolved)  # fmt: skip
    model_info = io.read_json(Path(model_dir) / models.INFO_FILE)
    return _write_perturbation(
        out_path, pids, np.asarray(prompts.column("label").to_pylist()), logits, model_info, resolved,
        info_path, "program", site=site, kind=kind, layer=layer, head=head, scale=scale,
        noise_mode=noise_mode, sigma=sigma, seed=seed, method=method, dtype=dtype,
    )  # fmt: skip


def _sigma(kind, scale, noise_mode, rms_path, site, layer, head) -> float:
    if kind != "noise":
        return float("nan")
    return noise_sigma(float(scale or 0), noise_mode, rms_path, site, layer, head)


def _write_perturbation(out_path, pids, labels, logits, model_info, device, info_path, engine,
                        *, site, kind, layer, head, scale, noise_mode, sigma, seed, method,
                        dtype) -> dict[str, np.ndarray]:  # fmt: skip
    """Write one row per (draw, prompt) with the job's settings in front; return the columns."""
    n, draws = logits.shape[:2]
    per_draw = [scoring.per_prompt_columns(pids, labels, logits[:, d, :]) for d in range(draws)]
    settings = {"site": site, "kind": kind, "layer": layer, "head": head, "scale": scale,
                "noise_mode": noise_mode if kind == "noise" else "", "sigma": sigma,
                "seed": seed}  # fmt: skip
    columns = {key: np.repeat(np.asarray([value]), n * draws) for key, value in settings.items()}
    columns["draw"] = np.repeat(np.arange(draws, dtype=np.int64), n)
    for key in scoring.PER_PROMPT_COLUMNS:
        columns[key] = np.concatenate([d[key] for d in per_draw])
    step = {"step": "perturbation", "site": site, "kind": kind, "layer": layer, "head": head,
            "scale": scale, "noise_mode": noise_mode, "repeats": draws, "seed": seed,
            "method": method, "dtype": dtype, "prompts_sha256": _prompt_digest(info_path)}  # fmt: skip
    meta = provenance(model_info, device, step)
    meta["method"] = method
    meta["engine"] = engine
    io.write_parquet(out_path, columns, meta)
    correct = columns["correct"].reshape(draws, n).mean(axis=1)
    log.info("accuracy per draw: %s", ", ".join(f"{a:.4f}" for a in correct))
    return columns


def noise_sigma(scale: float, mode: str, rms_path, site: str, layer: int, head: int) -> float:
    """The noise's standard deviation: ``scale`` itself (``absolute``, the original study), or
    ``scale`` times the head's RMS output on the baseline prompts (``relative``)."""
    if mode == "absolute":
        return scale
    if mode != "relative":
        raise ValueError(f"noise_mode {mode!r} is not allowed; allowed: absolute, relative")
    import pyarrow.parquet as pq

    rms = pq.ParquetFile(rms_path).read().to_pydict()
    keys = zip(rms["site"], rms["layer"], rms["head"], rms["rms"])
    found = [value for s_, l_, h_, value in keys if (s_, l_, h_) == (site, layer, head)]
    if len(found) != 1:
        raise ValueError(f"{rms_path} holds no RMS for {site} layer {layer} head {head}")
    return scale * float(found[0])


def _perturbation(kind, width, clean, layer, head, repeats, seed):
    """(values, mode, draws) for ``kind``: None for noise (the engine draws it), else a function
    giving the (draws, length, width) replacement of the head's output for a prompt. ``clean()``
    returns the head's clean outputs, one (length, width) tensor per prompt (mean, resample)."""
    import torch

    from .intervention import donors, mean_from_end

    if kind == "noise":
        return None, "add", repeats
    if kind == "zero":
        return (lambda _i, _pid, length: torch.zeros(1, length, width)), "set", 1
    if kind not in ("mean", "resample"):
        raise ValueError(f"kind {kind!r} is not allowed; allowed: noise, zero, mean, resample")
    acts = clean()
    if kind == "mean":
        mean = mean_from_end(acts)
        return (lambda _i, _pid, length: mean[-length:][None]), "set", 1
    chosen = [donors(seed, layer, head, d, len(acts)) for d in range(repeats)]

    def resample(i, _pid, length):
        picks = [acts[int(c[i])] for c in chosen]
        k = min(length, *(len(p) for p in picks))
        return torch.stack([p[-k:] for p in picks])

    return resample, "set", repeats


def job_metrics(frame: pd.DataFrame, baseline: pd.DataFrame | None = None, **stat_kwargs) -> dict:
    """One perturbation file's row of the table: metrics (mean and sd over its draws) and, given
    the baseline's per-prompt frame, changes with intervals and p-values (stats.paired_summary)."""
    from . import stats

    per_draw = [scoring.metrics(g["label"], g["prediction"]) for _, g in frame.groupby("draw")]
    first = frame.iloc[0]
    row = {key: first[key] for key in stats.KEYS}
    row["layer"], row["head"], row["scale"] = int(row["layer"]), int(row["head"]), str(row["scale"])
    row["draws"] = len(per_draw)
    if "noise_mode" in frame.columns:
        row["noise_mode"], row["sigma"] = str(first["noise_mode"]), float(first["sigma"])
    for metric in ("accuracy", "f1"):
        values = np.array([m[metric] for m in per_draw])
        row[metric] = float(values.mean())
        row[f"{metric}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    row["mean_margin"] = float(frame["margin"].mean())
    if baseline is None:
        return row
    wide = frame.pivot(index="prompt_id", columns="draw", values=["prediction", "margin"])
    base = baseline.set_index("prompt_id").loc[wide.index]
    summary = stats.paired_summary(
        base["label"].to_numpy(),
        base["prediction"].to_numpy(),
        base["margin"].to_numpy(),
        wide["prediction"].to_numpy(),
        wide["margin"].to_numpy(),
        **stat_kwargs,
    )
    row.update(summary)
    half = row["draws"] // 2
    if half:
        accs = np.array([m["accuracy"] for m in per_draw])
        row["_halves"] = (accs[:half].mean(), accs[half : 2 * half].mean())
    return row


def run_aggregation(
    *,
    baseline_path,
    baseline_per_prompt_path,
    perturbed_paths,
    parquet_path,
    csv_path,
    high,
    medium,
    statistics: dict | None = None,
):
    import pandas as pd

    from . import stats

    statistics = dict(statistics or {})
    alpha = float(statistics.pop("alpha", 0.05))
    stat_kwargs = {
        "n_boot": int(statistics.get("bootstrap", 2000)),
        "n_perm": int(statistics.get("permutations", 10_000)),
        "seed": int(statistics.get("seed", 0)),
    }
    baseline = io.read_json(baseline_path)
    base_frame = pd.read_parquet(baseline_per_prompt_path)
    rows = [job_metrics(pd.read_parquet(p), base_frame, **stat_kwargs) for p in perturbed_paths]
    halves = [row.pop("_halves", (np.nan, np.nan)) for row in rows]
    table = stats.aggregate(baseline, pd.DataFrame(rows), high=high, medium=medium)
    # intervals of the accuracy contribution under the names; the rest keep a suffix
    table = table.rename(columns={"ci_low_accuracy": "ci_low", "ci_high_accuracy": "ci_high"}).drop(
        columns=["change_accuracy", "change_f1"]
    )
    table["q_value"] = stats.bh_qvalues(table["p_value"])
    table["q_value_logit_diff"] = stats.bh_qvalues(table["p_value_logit_diff"])
    table["significant"] = table["q_value"] < alpha
    # the full key: zero, mean and resample rows of one head share site, layer, head and scale
    order = {tuple(r[k] for k in stats.KEYS): h for r, h in zip(rows, halves)}
    base_acc = baseline["accuracy"]
    rel_halves = [
        tuple(float(stats.relative_change(base_acc, x)) for x in order[key])
        for key in zip(*(table[k] for k in stats.KEYS))
    ]
    table["category_stable"] = stats.category_stability(rel_halves, high, medium)
    first = [*stats.KEYS, "draws", "baseline_accuracy", "accuracy", "contribution_accuracy",
             "ci_low", "ci_high", "relative_change_accuracy", "p_value", "q_value", "significant",
             "direction", "impact", "category_stable", "baseline_f1", "f1", "contribution_f1",
             "ci_low_f1", "ci_high_f1", "relative_change_f1"]  # fmt: skip
    table = table[first + [c for c in table.columns if c not in first]]
    judged = table["category_stable"].dropna()
    share = float(judged.astype(bool).mean()) if len(judged) else None
    meta = {"baseline": baseline, "high": high, "medium": medium, "alpha": alpha,
            "statistics": stat_kwargs, "stability_share": share}  # fmt: skip
    io.write_parquet(parquet_path, table, meta)
    with io.atomic_path(csv_path, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    counts = stats.category_counts(table)
    log.info(
        "%d perturbations; baseline accuracy %.4f, F1 %.4f; impact %s; %d significant (q < %g)",
        len(table), baseline["accuracy"], baseline["f1"],
        ", ".join(f"{k} {v}" for k, v in counts.items()), int(table["significant"].sum()), alpha,
    )  # fmt: skip
    if share is None:
        log.info("category stability: needs repeats >= 2")
    else:
        log.info(
            "category stability: %.0f%% of %d heads keep their category between two halves of the draws",
            100 * share, len(judged),
        )  # fmt: skip
    return table


def read_table(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """The contribution table and its metadata (baseline metrics, thresholds)."""
    import pandas as pd

    return pd.read_parquet(path), io.read_parquet_metadata(path)

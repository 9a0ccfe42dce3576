"""The unperturbed model and its recordings: the baseline every head is compared with, and what
the fast passes start from (the final state, the exported last layer, a layer's input at every
position, every layer's keys and values)."""

from __future__ import annotations

import logging

from headperturb import joblog
from headperturb.core import files, plans
from headperturb.workflow.rulestep import model_spec, prompt_files, step

log = logging.getLogger("headperturb")


@step
def baseline(input, output, params, wildcards, threads):
    """Score the unperturbed model and record what the perturbed passes start from: every layer's
    final state, every head's RMS output and the last layer exported
    (:mod:`headperturb.model.tail`)."""
    from headperturb.analysis import scoring
    from headperturb.model import recordings
    from headperturb.model.context import gpu_memory_hint, load_engine, prompt_ids

    prompts, model = prompt_files(input), model_spec(input, params, threads)
    engine, sites, model_info, info = load_engine(prompts, model)
    ids, pids, labels = prompt_ids(prompts.prompts)
    progress = joblog.Progress(len(ids), "baseline prompts", log)
    recorded = gpu_memory_hint(engine.baseline, ids, sites, progress)
    expect = recordings.recording(
        "baseline", prompts.info, model_info, layers=len(sites), n_prompts=len(ids)
    )
    recordings.save(output.state, recorded.final_state, expect)
    _export_last_layer(
        engine,
        sites[-1],
        output.program,
        state=recorded.final_state,
        dtype=model.dtype,
        model_info=model_info,
    )
    files.write_parquet(output.rms, recorded.head_rms)
    offset = info.get("calibration", {}).get("offset", 0.0)
    what = "the unperturbed model"
    frame = scoring.per_prompt(pids, labels, recorded.logits, offset=offset, what=what)
    result = _baseline_metrics(frame, info)
    settings = {
        "step": "baseline",
        "dtype": model.dtype,
        "prompts_sha256": recordings.file_digest(prompts.info),
    }
    meta = recordings.provenance(model_info, str(engine.device), settings)
    files.write_parquet(output.per_prompt, frame, meta)
    files.write_json(output.metrics, result)
    log.info(
        "baseline: accuracy %.4f, macro-F1 %.4f, %.0f%% predicted positive on %d prompts",
        result["accuracy"],
        result["f1"],
        100 * result["share_positive"],
        result["n_prompts"],
    )


def _baseline_metrics(frame, info: dict) -> dict:
    """The unperturbed model's scores on the prompts, with its ROC AUC, mean margin, share of
    positive predictions and the calibration it was scored with."""
    from headperturb.analysis import effects, scoring

    result = scoring.metrics(frame["label"], frame["prediction"])
    result.update(
        auc=effects.roc_auc(frame["label"], frame["margin"]),
        mean_margin=float(frame["margin"].mean()),
        share_positive=float(frame["prediction"].mean()),
        calibration=info.get("calibration", {"method": "none", "offset": 0.0}),
    )
    return result


def _export_last_layer(engine, site, program_dir, *, state, dtype, model_info: dict) -> bool:
    """Export the last layer as a program (:func:`headperturb.model.tail.export`) into
    ``program_dir``. A model the export cannot trace gets a ``program.json`` that says why; its
    jobs then load the model."""
    from headperturb.model import tail

    meta = tail.describe(
        engine.model, site, engine.token_ids, device=str(engine.device), dtype=dtype
    )
    meta["weights_sha256"] = model_info.get("weights_sha256")
    try:
        exported = tail.export(
            engine.model, site, engine.token_ids, tail.layer_state(state, site.layer)
        )
    except Exception as exc:  # any tracing failure: the jobs fall back to the model
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.warning("could not export the last layer (%s); its jobs will load the model", reason)
        tail.save(program_dir, None, {**meta, "reason": reason})
        return False
    tail.save(program_dir, exported, meta)
    log.info("exported the last layer (layer %d) to %s", site.layer, program_dir)
    return True


@step
def capture_layer(input, output, params, wildcards, threads):
    """Record the residual stream entering one layer at every position of every prompt, from the
    recording of a lower layer where the rule names one (``input.source``)."""
    from headperturb.model import recordings
    from headperturb.model.context import gpu_memory_hint, load_engine, prompt_ids

    prompts, layer = prompt_files(input), int(wildcards.layer)
    engine, sites, model_info, _pinfo = load_engine(prompts, model_spec(input, params, threads))
    ids, _pids, _labels = prompt_ids(prompts.prompts)
    start = None
    if getattr(input, "source", None):  # the recording of a lower layer (plans.recording_source)
        below = plans.recording_source(layer, len(sites))
        if below is None:
            raise ValueError(
                f"layer {layer} of a {len(sites)}-layer model starts from no "
                f"recording, but the rule gave {input.source}"
            )
        expect = recordings.recording(
            "capture_layer", prompts.info, model_info, layer=below, n_prompts=len(ids)
        )
        start = (sites[below], recordings.load(input.source, expect=expect))
        log.info("starting from the recorded input of layer %d", below)
    progress = joblog.Progress(len(ids), f"layer {layer} inputs", log)
    captured = gpu_memory_hint(
        engine.capture_layer_inputs, ids, sites[layer], progress, start=start
    )
    meta = recordings.recording(
        "capture_layer", prompts.info, model_info, layer=layer, n_prompts=len(ids)
    )
    recordings.save(output.activations, captured, meta)


@step
def capture_cache(input, output, params, wildcards, threads):
    """Record every layer's keys and values at every position of every prompt, for the jobs that
    perturb the final position (:func:`headperturb.model.passes.final_position`)."""
    from headperturb.model import recordings
    from headperturb.model.context import gpu_memory_hint, load_engine, prompt_ids

    prompts = prompt_files(input)
    engine, sites, model_info, _pinfo = load_engine(prompts, model_spec(input, params, threads))
    ids, _pids, _labels = prompt_ids(prompts.prompts)
    progress = joblog.Progress(len(ids), "keys and values", log)
    kv = gpu_memory_hint(engine.capture_cache, ids, progress)
    meta = recordings.recording(
        "capture_cache", prompts.info, model_info, layers=len(sites), n_prompts=len(ids)
    )
    recordings.save(output.cache, kv, meta)
    log.info("recorded keys and values: %.0f MB", sum(t.numel() * 4 for t in kv.values()) / 1e6)

"""The workflow's model steps as plain functions: read the inputs, call the library, write the
outputs. Every step runs and is tested without Snakemake; :mod:`headperturb.adapters` maps a
rule's input, output and params onto these calls (one head job: :mod:`headperturb.jobs`).

torch and transformers are imported inside the steps, so importing this module is cheap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import effects, io, resources, scoring
from .logs import Progress
from .spec import format_scale, takes_scale

log = logging.getLogger("headperturb")


@dataclass(frozen=True)
class ModelSpec:
    """The prepared model a step runs: its folder, device, dtype, torch threads, and the
    ``model.site`` override for architectures headperturb does not know."""

    path: str
    device: str = "auto"
    dtype: str = "float32"
    threads: int = 1
    site: dict | None = None


@dataclass(frozen=True)
class PromptFiles:
    """``prompts.parquet`` and ``prompt_info.json`` of a run."""

    prompts: str
    info: str


def gpu_memory_hint(func, *args, **kwargs):
    """``func(...)``, with CUDA's out-of-memory error turned into one message that says which
    settings lower memory."""
    import torch

    from .models import ModelError

    try:
        return func(*args, **kwargs)
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelError(
            "out of GPU memory: lower prompts.n_test or prompts.max_review_tokens, set "
            "model.dtype: bfloat16, lower perturbation.repeats (draws run in one batch), or run "
            f"on model.device: cpu ({str(exc).splitlines()[0]})"
        ) from None


def load_engine(prompts: PromptFiles, model: ModelSpec):
    """(engine, sites, model info, prompt info) for a step's prompts."""
    from . import models
    from .engine import Engine
    from .sites import locate_sites

    models.set_threads(model.threads)
    net, model_info = resources.model(model.path, model.device, model.dtype)
    info = io.read_json(prompts.info)
    engine = Engine(net, info["prefix_len"], info["verbalizer_token_ids"])
    return engine, locate_sites(net, model.site), model_info, info


def prompt_ids(prompts_path) -> tuple[list[np.ndarray], list[int], np.ndarray]:
    frame = io.read_parquet(prompts_path, ["prompt_id", "label", "input_ids"])
    ids = [np.asarray(x, dtype=np.int64) for x in frame["input_ids"]]
    return ids, frame["prompt_id"].tolist(), frame["label"].to_numpy()


# -- model and prompts ----------------------------------------------------------------------


def prepare_model(source: str, out_dir, *, gguf_file=None, dtype="float32", sha256=None,
                  site=None, threads: int = 1) -> dict:  # fmt: skip
    """Load the source once and save it prepared (:func:`headperturb.models.prepare_model`)."""
    from . import models

    models.set_threads(threads)
    info = models.prepare_model(source, out_dir, gguf_file=gguf_file, dtype=dtype,
                                sha256=sha256, site_override=site)  # fmt: skip
    log.info(
        "prepared %s: %s, %d layers x %d query heads (%s KV heads), head_dim %d, %d parameters; "
        "%.2g s per token and layer on this machine", source, info["architecture"],
        info["n_layers"], info["n_heads"], info["n_kv_heads"], info["head_dim"],
        info["n_parameters"], info.get("seconds_per_token_layer") or float("nan"),
    )  # fmt: skip
    return info


def select_reviews(data: dict, settings: dict, out_path) -> None:
    """Which reviews the run uses (:func:`headperturb.prompts.select_reviews`): data only, no
    model, so a setting the data cannot meet stops the run before any model work."""
    from . import prompts
    from .data import load_split

    train = load_split(data["path"], "train", data["hub_dataset"])
    test = load_split(data["path"], "test", data["hub_dataset"])
    reviews = prompts.select_reviews(
        train, test, k_shot=settings["k_shot"], n_test=settings["n_test"], seed=settings["seed"],
        candidates=settings["candidates"], n_dev=settings["n_dev"],
    )  # fmt: skip
    io.write_parquet(out_path, reviews)
    counts = reviews["role"].value_counts().to_dict()
    log.info("selected %s reviews", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))


def build_prompts(reviews_path, model: ModelSpec, settings: dict, calibration: str, out: dict):
    """Tokenize the prompts, choose the demonstrations and the decision rule on the development
    reviews (:mod:`headperturb.calibration`), and write the test prompts with the chosen
    demonstrations. ``out`` holds the paths ``prompts``, ``demonstrations``, ``info`` and
    ``selection``."""
    from . import calibration as cal
    from . import models, prompts

    info = io.read_json(Path(model.path) / models.INFO_FILE)
    built = prompts.tokenize_prompts(
        io.read_parquet(reviews_path), models.load_tokenizer(model.path),
        max_review_tokens=settings["max_review_tokens"], template=settings["template"],
        verbalizers=tuple(settings["verbalizers"]), separator=settings["separator"],
        context_length=info["context_length"],
    )  # fmt: skip
    rows = [{"candidate": int(c), "calibration": {"method": "none", "offset": 0.0}}
            for c in built.prefixes["candidate"]]  # fmt: skip
    if len(rows) > 1 or calibration != "none":
        rows = _score_candidates(built, model, calibration)
    chosen = cal.choose(rows)
    fitted = next(r["calibration"] for r in rows if r["candidate"] == chosen)
    test = built.prompts(chosen)
    io.write_parquet(out["prompts"], test)
    io.write_parquet(out["demonstrations"], built.demonstrations_of(chosen))
    table = [{**{k: v for k, v in r.items() if k != "calibration"}, "method": r["calibration"]["method"],
              "offset": r["calibration"]["offset"], "chosen": r["candidate"] == chosen}
             for r in rows]  # fmt: skip
    io.write_csv(out["selection"], table)
    io.write_json(out["info"], prompts.prompt_info(built, chosen, test, calibration=fitted,
                                                   selection=table))  # fmt: skip
    log.info("demonstrations: candidate %d of %d; calibration %s (offset %+.4f); %d test prompts "
             "of %.0f tokens on average", chosen, len(rows), fitted["method"], fitted["offset"],
             len(test), test["n_tokens"].mean())  # fmt: skip


def pair_prompts(prompts_path, seed: int, out_path) -> None:
    """Each test prompt's opposite-sentiment partner (:func:`headperturb.prompts.pair_prompts`)."""
    from . import prompts

    pairs = prompts.pair_prompts(io.read_parquet(prompts_path), seed)
    io.write_parquet(out_path, pairs)
    paired = int((pairs["partner_id"] >= 0).sum())
    log.info("paired %d of %d test prompts with an opposite-sentiment prompt of the same length; "
             "the other %d (lengths no prompt of the other label has) take no part in patching",
             paired, len(pairs), len(pairs) - paired)  # fmt: skip


def _score_candidates(built, model: ModelSpec, method: str) -> list[dict]:
    """Each candidate's development margins, its fitted calibration and its development scores."""
    from . import calibration as cal
    from . import models, prompts
    from .engine import Engine

    models.set_threads(model.threads)
    net, _info = resources.model(model.path, model.device, model.dtype)
    tokenizer = models.load_tokenizer(model.path)
    free = prompts.content_free_queries(tokenizer, built.info["template"],
                                        built.info["verbalizers"], cal.CONTENT_FREE)  # fmt: skip
    rows = []
    for c in built.prefixes["candidate"]:
        dev = built.prompts(int(c), "dev")
        prefix = list(built.prefixes.loc[built.prefixes["candidate"] == c, "prefix_ids"].iloc[0])
        engine = Engine(net, len(prefix), built.info["verbalizer_token_ids"])
        ids = [np.asarray(x) for x in dev["input_ids"]] + [np.asarray(prefix + q) for q in free]
        logits = gpu_memory_hint(engine.score, ids, Progress(len(ids), f"candidate {c}", log))
        margins = logits[:, 1] - logits[:, 0]
        dev_m, free_m = margins[: len(dev)], margins[len(dev) :]
        fitted = cal.fit(method, dev_m, dev["label"].to_numpy(), free_m)
        rows.append({"candidate": int(c), **cal.dev_scores(fitted, dev_m, dev["label"].to_numpy()),
                     "calibration": fitted.as_dict()})  # fmt: skip
        log.info("candidate %d: %s", c, {k: v for k, v in rows[-1].items() if k != "candidate"})
    return rows


# -- the unperturbed model --------------------------------------------------------------------


def baseline(prompt_files: PromptFiles, model: ModelSpec, out: dict) -> dict:
    """Score the unperturbed model and record what the perturbed passes start from: ``out`` holds
    the paths ``per_prompt``, ``metrics``, ``state`` (every layer's final state), ``rms`` and
    ``program`` (the last layer exported, :mod:`headperturb.tail`)."""
    from . import tensors

    engine, sites, model_info, info = load_engine(prompt_files, model)
    ids, pids, labels = prompt_ids(prompt_files.prompts)
    recorded = gpu_memory_hint(
        engine.baseline, ids, sites, Progress(len(ids), "baseline prompts", log)
    )
    tensors.save(out["state"], recorded.final_state,
                 tensors.recording("baseline", prompt_files.info, model_info, layers=len(sites),
                                   n_prompts=len(ids)))  # fmt: skip
    export_last_layer(engine, sites[-1], recorded.final_state, out["program"], model.dtype,
                      model_info)  # fmt: skip
    io.write_parquet(out["rms"], recorded.head_rms)
    offset = info.get("calibration", {}).get("offset", 0.0)
    frame = scoring.per_prompt(pids, labels, recorded.logits, offset, "the unperturbed model")
    result = scoring.metrics(frame["label"], frame["prediction"])
    result.update(auc=effects.roc_auc(frame["label"], frame["margin"]),
                  mean_margin=float(frame["margin"].mean()),
                  share_positive=float(frame["prediction"].mean()),
                  calibration=info.get("calibration", {"method": "none", "offset": 0.0}))  # fmt: skip
    settings = {"step": "baseline", "dtype": model.dtype,
                "prompts_sha256": tensors.file_digest(prompt_files.info)}  # fmt: skip
    io.write_parquet(
        out["per_prompt"], frame, tensors.provenance(model_info, str(engine.device), settings)
    )
    io.write_json(out["metrics"], result)
    log.info("baseline: accuracy %.4f, macro-F1 %.4f, %.0f%% predicted positive on %d prompts",
             result["accuracy"], result["f1"], 100 * result["share_positive"], result["n_prompts"])  # fmt: skip
    return result


def export_last_layer(engine, site, state, program_dir, dtype, model_info: dict) -> bool:
    """Export the last layer as a program (:func:`headperturb.tail.export`) into
    ``program_dir``. A model the export cannot trace gets a ``program.json`` that says why; its
    jobs then load the model."""
    from . import tail

    meta = tail.describe(engine.model, site, engine.token_ids, str(engine.device), dtype)
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


def capture_layer(prompt_files: PromptFiles, model: ModelSpec, layer: int, out_path) -> None:
    """Save the residual stream entering ``layer`` at every position of every prompt."""
    from . import tensors

    engine, sites, model_info, _pinfo = load_engine(prompt_files, model)
    ids, _pids, _labels = prompt_ids(prompt_files.prompts)
    captured = gpu_memory_hint(engine.capture_layer_inputs, ids, sites[layer],
                               Progress(len(ids), f"layer {layer} inputs", log))  # fmt: skip
    tensors.save(out_path, captured, tensors.recording("capture_layer", prompt_files.info,
                                                       model_info, layer=layer, n_prompts=len(ids)))  # fmt: skip


def capture_cache(prompt_files: PromptFiles, model: ModelSpec, out_path) -> None:
    """Save every layer's keys and values at every position of every prompt, for the jobs that
    perturb the final position (:func:`headperturb.passes.final_position`)."""
    from . import tensors

    engine, sites, model_info, _pinfo = load_engine(prompt_files, model)
    ids, _pids, _labels = prompt_ids(prompt_files.prompts)
    kv = gpu_memory_hint(engine.capture_cache, ids, Progress(len(ids), "keys and values", log))
    tensors.save(out_path, kv, tensors.recording("capture_cache", prompt_files.info, model_info,
                                                 layers=len(sites), n_prompts=len(ids)))  # fmt: skip
    log.info("recorded keys and values: %.0f MB", sum(t.numel() * 4 for t in kv.values()) / 1e6)


def screen(prompt_files: PromptFiles, model: ModelSpec, settings: dict, inputs: dict, out: dict):
    """Estimate every head of every layer from one forward and one backward pass per prompt
    (:mod:`headperturb.screen`). ``settings``: ``kinds``, ``positions``, ``scales``,
    ``noise_mode``; ``inputs``: the baseline's ``per_prompt`` file (the calibrated
    margins), ``rms`` (relative noise) and ``pairs`` (patch); ``out``: ``estimates`` (per prompt)
    and ``heads``."""
    import pandas as pd

    from . import screen as sc
    from . import tensors

    engine, sites, model_info, _info = load_engine(prompt_files, model)
    ids, pids, labels = prompt_ids(prompt_files.prompts)
    base = io.read_parquet(inputs["per_prompt"], ["prompt_id", "calibrated_margin"])
    if base["prompt_id"].tolist() != list(pids):
        raise ValueError(f"{inputs['per_prompt']} does not hold the run's prompts in order")
    means = gpu_memory_hint(sc.head_means, engine, ids, sites)
    partners = None
    if "patch" in settings["kinds"]:
        pairs = io.read_parquet(inputs["pairs"], ["prompt_id", "partner_id"])
        index = {int(p): i for i, p in enumerate(pids)}
        found = dict(zip(pairs["prompt_id"].astype(int), pairs["partner_id"].astype(int)))
        partners = [index[found[int(p)]] if found.get(int(p), -1) >= 0 else -1 for p in pids]
    sums = gpu_memory_hint(sc.gradient_sums, engine, ids, sites, means,
                           Progress(len(ids), "screen: forward and backward passes", log),
                           partners)  # fmt: skip
    rms = 1.0  # sigma = scale, or scale x each head's RMS output (a layer x head grid)
    if settings["noise_mode"] == "relative":
        table = pd.DataFrame(io.read_parquet(inputs["rms"]))
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
    est = sc.estimates(sums, pids, labels, base["calibrated_margin"].to_numpy(),
                       [s.layer for s in sites], plan)  # fmt: skip
    meta = tensors.provenance(model_info, str(engine.device), {"step": "screen", **settings,
                              "prompts_sha256": tensors.file_digest(prompt_files.info)})  # fmt: skip
    io.write_parquet(out["estimates"], est, meta)
    heads = sc.per_head(pd.DataFrame(est))
    io.write_parquet(out["heads"], heads, meta)
    log.info("screened %d heads of %d layers on %d prompts", sites[0].n_heads * len(sites),
             len(sites), len(ids))  # fmt: skip

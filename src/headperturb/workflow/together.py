"""Heads together: every head ranked under an order, the set jobs of the joint-ablation curves,
the curves' table and summary, and every head's direct effect beside its total effect."""

from __future__ import annotations

import logging

import numpy as np

from headperturb.core import files, hints
from headperturb.model.rows import partners_of, read_pairs
from headperturb.workflow.rulestep import job_inputs, model_spec, prompt_files, step

log = logging.getLogger("headperturb")


# -- joint-ablation curves ---------------------------------------------------------------------


@step(quiet=True)
def rank_heads(input, output, params, wildcards, threads):
    """Every head ranked best first under one order
    (:func:`headperturb.analysis.curves.ranking`)."""
    from headperturb.analysis import curves
    from headperturb.core.sets import parse_order

    order, seed = parse_order(wildcards.order)
    screen_heads = files.read_parquet(input.screen) if getattr(input, "screen", None) else None
    table = files.read_parquet(input.table) if getattr(input, "table", None) else None
    anatomy = None
    if getattr(input, "shares", None):
        from headperturb.analysis.anatomy import head_scores

        read = files.read_parquet
        scores = head_scores(read(input.shares), read(input.types), read(input.function_vectors))
        anatomy = {"scores": scores, "exclude": params.exclude}
    setting = curves.Setting(site=wildcards.site, position=wildcards.position, kind=wildcards.kind)
    ranked = curves.ranking(
        order,
        setting,
        params.n_layers,
        params.n_heads,
        seed=seed,
        screen_heads=screen_heads,
        table=table,
        anatomy=anatomy,
    )
    meta = {
        "order": wildcards.order,
        "kind": wildcards.kind,
        "position": wildcards.position,
        "site": wildcards.site,
    }
    files.write_parquet(output.ranking, ranked, meta)


@step(quiet=True)
def mib_nodes(input, output, params, wildcards, threads):
    """An order's head scores as MIB's node-level circuit file
    (:func:`headperturb.analysis.faithfulness.mib_node_json`), to compare with MIB's methods."""
    from pathlib import Path

    from headperturb.analysis import faithfulness

    model_config = files.read_json(Path(input.model) / "config.json")
    cfg = faithfulness.mib_cfg(model_config, params.n_layers, params.n_heads)
    nodes = faithfulness.mib_node_json(files.read_parquet(input.ranking), cfg)
    files.write_text(output.nodes, nodes + "\n")


@step(quiet=True)
def perturb_set(input, output, params, wildcards, threads):
    """Several heads perturbed together (:func:`headperturb.model.headset.perturb_set`)."""
    from headperturb.analysis.curves import read_ranking
    from headperturb.core.targets import set_job
    from headperturb.model import headset

    job = set_job(wildcards)
    members = job.members(read_ranking(input.ranking))
    model = model_spec(input, params, threads)
    meta = {"ranking_sha256": files.sha256_file(input.ranking)}
    headset.perturb_set(
        job, members, job_inputs(input), model, output.result, method=params.method, meta=meta
    )


@step
def curves(input, output, params, wildcards, threads):
    """The curves' table and summary (:mod:`headperturb.analysis.curves`), after checking that
    every set file holds the heads its ranking names now."""
    import pandas as pd

    from headperturb.analysis import curves as cv
    from headperturb.analysis import faithfulness
    from headperturb.core.sets import SetJob
    from headperturb.model import recordings

    stat = params.statistics
    stat_kwargs = {
        "n_boot": int(stat["bootstrap"]),
        "n_perm": int(stat["permutations"]),
        "seed": int(stat["seed"]),
    }
    prompts_sha256 = recordings.file_digest(input.info)
    baseline = files.read_parquet(input.baseline_per_prompt)
    rankings = {path: cv.read_ranking(path) for path in set(input.rankings)}
    jobs = [SetJob(**job) for job in params.jobs]
    # each job's ranking, in the jobs' order
    ranked_of = {job: rankings[path] for job, path in zip(jobs, input.rankings)}
    check = {
        "prompts_sha256": prompts_sha256,
        "method": params.method,
        "stale_list": params.stale_list,
    }
    rows, changes, kept = _points(
        jobs, input.sets, ranked_of, baseline=baseline, check=check, stat_kwargs=stat_kwargs
    )
    singles = {
        (s["site"], s["position"], s["kind"], s["layer"], s["head"]): p
        for s, p in zip(params.single_jobs, input.singles)
    }
    points = pd.DataFrame(rows)
    known = {"changes": changes, "singles": singles, "baseline": baseline}
    extra = [
        _interaction(job, ranked_of[job], **known, stat_kwargs=stat_kwargs)
        for job in jobs
        if job in changes
    ]
    points = pd.concat([points, pd.DataFrame(extra, index=points.index)], axis=1)
    points = points.sort_values(cv.SET_KEYS, ignore_index=True)
    prompts = faithfulness.Prompts(
        baseline, kept, n_boot=stat_kwargs["n_boot"], seed=stat_kwargs["seed"]
    )
    summary = cv.summarize(points, params.n_heads_total, prompts)
    meta = {"n_heads_total": params.n_heads_total, "statistics": stat_kwargs}
    files.write_parquet(output.points, points, meta)
    files.write_csv(output.points_csv, points)
    files.write_csv(output.summary, cv.control_band(summary) if len(summary) else summary)
    log.info(
        "%d curve points over %d curves", len(points), len(summary) // max(len(cv.SUMMARIZED), 1)
    )


def _points(jobs, paths, ranked_of, *, baseline, check: dict, stat_kwargs: dict):
    """Each set file's row (:func:`headperturb.analysis.curves.point_row`), per-prompt change
    and, for the ``keep`` curves, its per-prompt rows (MIB's faithfulness intervals), after
    checking that it holds the heads its ranking names now and the run's prompts and method
    (``check``); a file that does not is listed in ``check["stale_list"]`` and stops the table."""
    from headperturb.analysis import aggregation
    from headperturb.analysis import curves as cv

    stale, rows, changes, kept = [], [], {}, []
    for job, path in zip(jobs, paths):
        if not _holds(job, path, ranked_of[job], check):
            stale.append(path)
            continue
        frame = files.read_parquet(path)
        rows.append(cv.point_row(frame, baseline, **stat_kwargs))
        changes[job] = cv.per_prompt_change(frame, baseline)
        if job.mode == "keep":
            kept.append(frame)
    if stale:
        stale_list = check["stale_list"]
        files.write_text(stale_list, "".join(p + "\n" for p in stale))
        raise aggregation.StaleResultsError(
            f"{len(stale)} set file(s) hold other heads or settings than their ranking and this "
            f"run's config ask for (e.g. {stale[0]}); they are listed in {stale_list}; redo "
            f"them with: {hints.command('--forcerun', f'$(cat {stale_list})')}"
        )
    return rows, changes, kept


def _holds(job, path, ranked, check: dict) -> bool:
    """Whether a set file holds ``job``'s members under ``ranked``, its order, k and mode, and
    the run's prompts and method (``check``)."""
    settings = files.read_parquet_metadata(path).get("settings", {})
    expected = {
        "members": [f"L{layer}H{head}" for layer, head in job.members(ranked)],
        "prompts_sha256": check["prompts_sha256"],
        "order": job.order_name,
        "k": job.k,
        "mode": job.mode,
        "method": check["method"],
    }
    return all(settings.get(key) == value for key, value in expected.items())


def _interaction(job, ranked, *, changes, singles, baseline, stat_kwargs) -> dict:
    """The interaction of one set point, where every member's single change is known: from the
    run's exact single-head files, or from the order's ``single`` set jobs."""
    from dataclasses import replace

    from headperturb.analysis import curves as cv

    empty = dict.fromkeys(cv.INTERACTION_COLUMNS, np.nan)
    if job.mode == "single":
        return empty
    rank_of = {head: r for r, head in enumerate(ranked, start=1)}
    found = []
    for layer, head in job.members(ranked):
        key = (job.site, job.position, job.kind, layer, head)
        single = replace(job, mode="single", k=rank_of[(layer, head)])
        if single in changes:
            found.append(changes[single])
        elif key in singles:
            found.append(cv.per_prompt_change(files.read_parquet(singles[key]), baseline))
        else:
            return empty
    return cv.interaction(changes[job], found, stat_kwargs["n_boot"], stat_kwargs["seed"])


# -- direct effects and self-repair ------------------------------------------------------------


@step
def direct_effects(input, output, params, wildcards, threads):
    """Every head's direct effect on the margin at the final position, beside its total effect
    where the run measured it (:mod:`headperturb.model.direct`,
    :mod:`headperturb.analysis.repair`)."""
    from headperturb.analysis import repair
    from headperturb.core.kinds import build
    from headperturb.model import cache, direct, recordings
    from headperturb.model.context import load_engine, prompt_ids

    prompts = prompt_files(input)
    engine, sites, model_info, _info = load_engine(prompts, model_spec(input, params, threads))
    ids, pids, labels = prompt_ids(prompts.prompts)
    expect = recordings.recording(
        "baseline", prompts.info, model_info, layers=len(sites), n_prompts=len(ids)
    )
    state = cache.cached_tensors(input.state, None, expect)
    partners = None
    if "patch" in params.kinds:
        partners = np.array(partners_of(read_pairs(input.pairs), pids))
    grads = direct.gradients(engine.model, sites, engine.token_ids, state)
    sums = direct.head_sums(grads, state, sites, partners)
    contributions = {
        kind: repair.direct_contributions(build(kind).first_order(sums), labels)
        for kind in params.kinds
    }
    baseline = files.read_parquet(input.baseline_per_prompt)
    totals = {
        (job["kind"], job["layer"], job["head"]): repair.totals_from(
            files.read_parquet(path), baseline
        )
        for job, path in zip(params.total_jobs, input.totals)
    }
    stat = params.statistics
    n_boot, seed = int(stat["bootstrap"]), int(stat["seed"])
    frame = repair.table(contributions, pids, totals, n_boot=n_boot, seed=seed)
    files.write_parquet(output.parquet, frame, {"kinds": list(params.kinds)})
    files.write_csv(output.csv, frame)
    for kind, s in repair.repair_summary(frame).items():
        log.info(
            "direct effects, %s: %d heads with a total; sum direct %.3f, sum total %.3f, "
            "Pearson %.2f",
            kind,
            s["heads"],
            s["sum_direct"],
            s["sum_total"],
            s["pearson"],
        )

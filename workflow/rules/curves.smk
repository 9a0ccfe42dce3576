# Heads removed together: joint-ablation curves (perturbation.curves). Every head is ranked under
# each order (a checkpoint: the all-position points start at their set's lowest layer), one job
# per point writes its own per-prompt file, and one table puts the points together with their
# random controls; adding a k, a seed or an order reruns only its jobs.


checkpoint rank_heads:
    input:
        unpack(ranking_inputs),
    output:
        ranking=sets.ranking_path(RESULTS, "{site}", "{position}", "{kind}", "{order}"),
    log:
        sets.ranking_path(LOGS, "{site}", "{position}", "{kind}", "{order}").replace(
            ".parquet", ".log"
        ),
    wildcard_constraints:
        site="|".join(spec.SITES),
        position="|".join(spec.POSITIONS),
        kind="|".join(sets.SET_KINDS),
        order=r"screen|exact|random\d+",
    params:
        n_layers=lambda wildcards: model_shape()["n_layers"],
        n_heads=lambda wildcards: model_shape()["n_heads"],
    run:
        steps.rank_heads(input, output, params, wildcards, threads, log)


rule perturb_set:
    input:
        unpack(set_inputs),
    output:
        result=sets.set_path(
            RESULTS, "{site}", "{position}", "{kind}", "{order}", "{mode}", "{k}"
        ),
    log:
        sets.set_path(
            LOGS, "{site}", "{position}", "{kind}", "{order}", "{mode}", "{k}"
        ).replace(".parquet", ".log"),
    wildcard_constraints:
        site="|".join(spec.SITES),
        position="|".join(spec.POSITIONS),
        kind="|".join(sets.SET_KINDS),
        order=r"screen|exact|random\d+",
        mode="|".join(sets.SET_MODES),
        k=r"\d+",
    threads: step_threads("perturb")
    params:
        **MODEL_PARAMS,
        method=PERTURBATION["method"],
    run:
        steps.perturb_set(input, output, params, wildcards, threads, log)


rule curves:
    input:
        baseline_per_prompt=BASELINE_PER_PROMPT,
        info=PROMPT_INFO,
        sets=lambda wildcards: [job.path(RESULTS) for job in set_jobs()],
        rankings=lambda wildcards: [job.ranking(RESULTS) for job in set_jobs()],
        singles=lambda wildcards: [job.path(RESULTS) for job in single_head_jobs()],
    output:
        points=f"{CURVES}/points.parquet",
        points_csv=report(
            f"{CURVES}/points.csv",
            caption="../report/curves.rst",
            category="Heads together",
            subcategory="curve points",
        ),
        summary=report(
            f"{CURVES}/summary.csv",
            caption="../report/curves.rst",
            category="Heads together",
            subcategory="curve summary",
        ),
    log:
        f"{LOGS}/curves.log",
    params:
        jobs=lambda wildcards: [asdict(job) for job in set_jobs()],
        single_jobs=lambda wildcards: [asdict(job) for job in single_head_jobs()],
        n_heads_total=lambda wildcards: model_shape()["n_layers"]
        * model_shape()["n_heads"],
        statistics=config["statistics"],
        method=PERTURBATION["method"],
        stale_list=f"{RESULTS}/stale_sets.txt",
    run:
        steps.curves(input, output, params, wildcards, threads, log)

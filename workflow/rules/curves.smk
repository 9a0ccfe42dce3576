# Heads removed together: joint-ablation curves (perturbation.curves). Every head is ranked under
# each order (a checkpoint: the all-position points start at their set's lowest layer), one job
# per point writes its own per-prompt file, and one table puts the points together with their
# random controls; adding a k, a seed or an order reruns only its jobs.


checkpoint rank_heads:
    input:
        unpack(ranking_inputs),
    output:
        ranking=PATHS.ranking,
    log:
        PATHS.log_of(PATHS.ranking),
    wildcard_constraints:
        site="|".join(spec.SITES),
        position=spec.POSITION_PATTERN,
        kind="|".join(sets.SET_KINDS),
        order=sets.ORDER_PATTERN,
    params:
        n_layers=lambda wildcards: model_shape()["n_layers"],
        n_heads=lambda wildcards: model_shape()["n_heads"],
        exclude=ANATOMY["exclude"],
    run:
        steps.rank_heads(input, output, params, wildcards, threads, log)


# every order's head scores as MIB's node-level circuit file (docs/method.md)
rule mib_nodes:
    input:
        ranking=PATHS.ranking,
        model=PATHS.model_dir,
    output:
        nodes=PATHS.mib_nodes,
    log:
        PATHS.log_of(PATHS.mib_nodes),
    wildcard_constraints:
        site="|".join(spec.SITES),
        position=spec.POSITION_PATTERN,
        kind="|".join(sets.SET_KINDS),
        order=sets.ORDER_PATTERN,
    params:
        n_layers=lambda wildcards: model_shape()["n_layers"],
        n_heads=lambda wildcards: model_shape()["n_heads"],
    run:
        steps.mib_nodes(input, output, params, wildcards, threads, log)


rule perturb_set:
    input:
        unpack(set_inputs),
    output:
        result=PATHS.set_job,
    log:
        PATHS.log_of(PATHS.set_job),
    wildcard_constraints:
        site="|".join(spec.SITES),
        position=spec.POSITION_PATTERN,
        kind="|".join(sets.SET_KINDS),
        order=sets.ORDER_PATTERN,
        mode="|".join(sets.SET_MODES),
        k=r"\d+",
    threads: config["threads"]["perturb"]
    params:
        **MODEL_PARAMS,
        method=PERTURBATION["method"],
    run:
        steps.perturb_set(input, output, params, wildcards, threads, log)


rule curves:
    input:
        baseline_per_prompt=PATHS.baseline_per_prompt,
        info=PATHS.prompt_info,
        sets=lambda wildcards: [job.path(PATHS.results) for job in set_jobs()],
        rankings=lambda wildcards: [job.ranking(PATHS.results) for job in set_jobs()],
        singles=lambda wildcards: [
            job.path(PATHS.results) for job in single_head_jobs()
        ],
    output:
        points=PATHS.curve_points,
        points_csv=report(
            PATHS.curve_points_csv,
            caption="../report/curves.rst",
            category="Heads together",
            subcategory="curve points",
        ),
        summary=report(
            PATHS.curve_summary,
            caption="../report/curves.rst",
            category="Heads together",
            subcategory="curve summary",
        ),
    log:
        PATHS.log("curves"),
    params:
        jobs=lambda wildcards: [asdict(job) for job in set_jobs()],
        single_jobs=lambda wildcards: [asdict(job) for job in single_head_jobs()],
        n_heads_total=lambda wildcards: model_shape()["n_layers"]
        * model_shape()["n_heads"],
        statistics=RESAMPLING,
        method=PERTURBATION["method"],
        stale_list=PATHS.stale_sets,
    run:
        steps.curves(input, output, params, wildcards, threads, log)

# Contribution scores and impact categories: one table for the whole run, after checking that
# every per-head file holds what this run's config asks for.


rule aggregate:
    input:
        baseline=PATHS.baseline_metrics,
        baseline_per_prompt=PATHS.baseline_per_prompt,
        info=PATHS.prompt_info,
        perturbed=perturb_files,
    output:
        parquet=PATHS.table,
        csv=report(
            PATHS.table_csv,
            caption="../report/table.rst",
            category="Run",
            subcategory="contribution table",
        ),
    log:
        PATHS.log("aggregate"),
    params:
        high=config["categories"]["high"],
        medium=config["categories"]["medium"],
        statistics=config["statistics"],
        jobs=lambda wildcards: [asdict(job) for job in head_jobs()],
        run={
            key: PERTURBATION[key]
            for key in ("noise_mode", "seed", "repeats", "method")
        }
        | {"dtype": MODEL["dtype"]},
        stale_list=PATHS.stale_results,
    run:
        steps.aggregate(input, output, params, wildcards, threads, log)

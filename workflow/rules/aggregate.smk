# Contribution scores and impact categories: one table for the whole run, after checking that
# every per-head file holds what this run's config asks for.


rule aggregate:
    input:
        baseline=BASELINE_METRICS,
        baseline_per_prompt=BASELINE_PER_PROMPT,
        info=PROMPT_INFO,
        perturbed=perturb_files,
    output:
        parquet=TABLE,
        csv=report(
            f"{RESULTS}/contributions.csv",
            caption="../report/table.rst",
            category="Run",
            subcategory="contribution table",
        ),
    log:
        f"{LOGS}/aggregate.log",
    params:
        high=config["categories"]["high"],
        medium=config["categories"]["medium"],
        statistics=config["statistics"],
        jobs=lambda wildcards: job_table(),
        run={
            key: PERTURBATION[key]
            for key in ("noise_mode", "seed", "repeats", "method")
        }
        | {"dtype": MODEL["dtype"]},
        stale_list=f"{RESULTS}/stale_results.txt",
    run:
        steps.aggregate(input, output, params, wildcards, threads, log)

# Every head's direct effect on the margin at the final position, from the baseline's final
# state and the model's weights (no forward pass), beside its total effect where a sweep measures
# the head at the final position: self-repair = direct - total (headperturb.model.direct).


rule direct_effects:
    input:
        unpack(direct_inputs),
        prompts=PATHS.prompts,
        info=PATHS.prompt_info,
        model=PATHS.model_dir,
        state=PATHS.final_state,
        baseline_per_prompt=PATHS.baseline_per_prompt,
        totals=lambda wildcards: [job.path(PATHS.results) for job in total_jobs()],
    output:
        parquet=PATHS.direct,
        csv=report(
            PATHS.direct_csv,
            caption="../report/direct.rst",
            category="Heads together",
            subcategory="direct effects and self-repair",
        ),
    log:
        PATHS.log("direct_effects"),
    threads: config["threads"]["model"]
    params:
        **MODEL_PARAMS,
        kinds=DIRECT_EFFECTS["kinds"],
        statistics=RESAMPLING,
        total_jobs=lambda wildcards: [asdict(job) for job in total_jobs()],
    run:
        steps.direct_effects(input, output, params, wildcards, threads, log)

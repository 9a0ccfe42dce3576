# Every head's direct effect on the margin at the final position, from the baseline's final
# state and the model's weights (no forward pass), beside its total effect where a sweep measures
# the head at the final position: self-repair = direct - total (headperturb.model.direct).


rule direct_effects:
    input:
        unpack(direct_inputs),
        prompts=PROMPT_TABLE,
        info=PROMPT_INFO,
        model=MODEL_DIR,
        state=FINAL_STATE,
        baseline_per_prompt=BASELINE_PER_PROMPT,
        totals=lambda wildcards: [job.path(RESULTS) for job in total_jobs()],
    output:
        parquet=DIRECT,
        csv=report(
            DIRECT.replace(".parquet", ".csv"),
            caption="../report/direct.rst",
            category="Heads together",
            subcategory="direct effects and self-repair",
        ),
    log:
        f"{LOGS}/direct_effects.log",
    threads: step_threads("model")
    params:
        **MODEL_PARAMS,
        kinds=DIRECT_EFFECTS["kinds"],
        statistics=config["statistics"],
        total_jobs=lambda wildcards: [asdict(job) for job in total_jobs()],
    run:
        steps.direct_effects(input, output, params, wildcards, threads, log)

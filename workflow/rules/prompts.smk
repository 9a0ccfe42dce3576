# k-shot prompts: which reviews the run uses (data only, before any model work), then the prompts,
# with the demonstrations and the decision rule chosen on development reviews from train.


rule select_reviews:
    input:
        DATA_FILES,
    output:
        REVIEWS,
    log:
        f"{LOGS}/select_reviews.log",
    params:
        data=config["data"],
        prompts=PROMPTS,
    run:
        in_process(rule, input, output, params, wildcards, threads, log)


rule build_prompts:
    input:
        reviews=REVIEWS,
        model=MODEL_DIR,
    output:
        prompts=PROMPT_TABLE,
        demonstrations=f"{RESULTS}/prompts/demonstrations.parquet",
        info=PROMPT_INFO,
        selection=report(
            f"{RESULTS}/prompts/selection.csv",
            caption="../report/selection.rst",
            category="Run",
            subcategory="demonstrations and decision rule",
        ),
    log:
        f"{LOGS}/build_prompts.log",
    threads: step_threads("model")
    params:
        **MODEL_PARAMS,
        prompts=PROMPTS,
        calibration=config["scoring"]["calibration"],
    run:
        in_process(rule, input, output, params, wildcards, threads, log)


# Each test prompt's opposite-sentiment partner of the same length, for the patching kinds.
rule pair_prompts:
    input:
        PROMPT_TABLE,
    output:
        PAIRS,
    log:
        f"{LOGS}/pair_prompts.log",
    params:
        seed=PROMPTS["seed"],
    run:
        in_process(rule, input, output, params, wildcards, threads, log)

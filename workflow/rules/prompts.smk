# k-shot prompts: which reviews the run uses (data only, before any model work), then the prompts,
# with the demonstrations and the decision rule chosen on development reviews from train.


rule select_reviews:
    input:
        DATA_FILES,
    output:
        reviews=REVIEWS,
    log:
        f"{LOGS}/select_reviews.log",
    params:
        data=config["data"],
        prompts=PROMPTS,
    run:
        steps.select_reviews(input, output, params, wildcards, threads, log)


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
        steps.build_prompts(input, output, params, wildcards, threads, log)


# Each test prompt's opposite-sentiment partner of the same length, for the patching kinds.
rule pair_prompts:
    input:
        prompts=PROMPT_TABLE,
    output:
        pairs=PAIRS,
    log:
        f"{LOGS}/pair_prompts.log",
    params:
        seed=PROMPTS["seed"],
    run:
        steps.pair_prompts(input, output, params, wildcards, threads, log)

# k-shot prompts: which reviews the run uses (data only, before any model work), then the prompts,
# with the demonstrations and the decision rule chosen on development reviews from train.


rule select_reviews:
    input:
        DATA_FILES,
    output:
        reviews=PATHS.reviews,
    log:
        PATHS.log("select_reviews"),
    params:
        data=config["data"],
        prompts=PROMPTS,
    run:
        steps.select_reviews(input, output, params, wildcards, threads, log)


rule build_prompts:
    input:
        reviews=PATHS.reviews,
        model=PATHS.model_dir,
    output:
        prompts=PATHS.prompts,
        demonstrations=PATHS.demonstrations,
        info=PATHS.prompt_info,
        selection=report(
            PATHS.selection,
            caption="../report/selection.rst",
            category="Run",
            subcategory="demonstrations and decision rule",
        ),
    log:
        PATHS.log("build_prompts"),
    threads: config["threads"]["model"]
    params:
        **MODEL_PARAMS,
        prompts=PROMPTS,
        calibration=config["scoring"]["calibration"],
    run:
        steps.build_prompts(input, output, params, wildcards, threads, log)


# Each test prompt's opposite-sentiment partner of the same length, for the patching kinds.
rule pair_prompts:
    input:
        prompts=PATHS.prompts,
    output:
        pairs=PATHS.pairs,
    log:
        PATHS.log("pair_prompts"),
    params:
        seed=PROMPTS["seed"],
    run:
        steps.pair_prompts(input, output, params, wildcards, threads, log)

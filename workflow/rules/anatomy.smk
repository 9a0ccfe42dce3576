# What kind of head each one is (headperturb.workflow.anatomy): where it looks from the final
# position, its type scores on repeated random tokens, what it writes at the unembedding, and one
# table joining these with its measured effects. docs/method.md, "What kind of head".


rule attention_shares:
    input:
        prompts=PATHS.prompts,
        info=PATHS.prompt_info,
        model=PATHS.model_dir,
    output:
        shares=PATHS.anatomy("shares.parquet"),
        examples=PATHS.anatomy("examples.parquet"),
        tokens=PATHS.anatomy("example_tokens.parquet"),
    log:
        PATHS.log("attention_shares"),
    threads: config["threads"]["model"]
    params:
        **MODEL_PARAMS,
        examples=ANATOMY["examples"],
        statistics=RESAMPLING,
    run:
        steps.attention_shares(input, output, params, wildcards, threads, log)


rule head_types:
    input:
        prompts=PATHS.prompts,
        info=PATHS.prompt_info,
        model=PATHS.model_dir,
    output:
        types=PATHS.anatomy("types.parquet"),
    log:
        PATHS.log("head_types"),
    threads: config["threads"]["model"]
    params:
        **MODEL_PARAMS,
        settings={
            "length": ANATOMY["repeat_length"],
            "sequences": ANATOMY["repeat_sequences"],
            "seed": PERTURBATION["seed"],
        },
        statistics=RESAMPLING,
    run:
        steps.head_types(input, output, params, wildcards, threads, log)


rule head_writes:
    input:
        prompts=PATHS.prompts,
        info=PATHS.prompt_info,
        model=PATHS.model_dir,
        state=PATHS.final_state,
    output:
        writes=PATHS.anatomy("writes.parquet"),
    log:
        PATHS.log("head_writes"),
    threads: config["threads"]["model"]
    params:
        **MODEL_PARAMS,
        top=ANATOMY["top_tokens"],
    run:
        steps.head_writes(input, output, params, wildcards, threads, log)


rule anatomy:
    input:
        unpack(anatomy_inputs),
        shares=PATHS.anatomy("shares.parquet"),
        types=PATHS.anatomy("types.parquet"),
        writes=PATHS.anatomy("writes.parquet"),
    output:
        heads=PATHS.anatomy("heads.parquet"),
        heads_csv=report(
            PATHS.anatomy("heads.csv"),
            caption="../report/anatomy.rst",
            category="Anatomy",
            subcategory="every head: where it looks, its type, what it writes, its effects",
        ),
        correlations=PATHS.anatomy("correlations.csv"),
    log:
        PATHS.log("anatomy"),
    params:
        threshold=ANATOMY["type_threshold"],
    run:
        steps.anatomy_table(input, output, params, wildcards, threads, log)


rule plot_attention_map:
    input:
        shares=PATHS.anatomy("shares.parquet"),
    output:
        figure=report(
            PATHS.plot("attention_map"),
            caption="../report/anatomy.rst",
            category="Anatomy",
            subcategory="where each head looks",
        ),
    log:
        PATHS.log("plot_attention_map"),
    params:
        run_name=config["run_name"],
    run:
        steps.plot_attention_map(input, output, params, wildcards, threads, log)


rule plot_head_cards:
    input:
        heads=PATHS.anatomy("heads.parquet"),
        shares=PATHS.anatomy("shares.parquet"),
        types=PATHS.anatomy("types.parquet"),
        writes=PATHS.anatomy("writes.parquet"),
        examples=PATHS.anatomy("examples.parquet"),
        tokens=PATHS.anatomy("example_tokens.parquet"),
    output:
        cards=report(
            directory(PATHS.plot("head_cards").removesuffix(".png")),
            patterns=["{name}.png"],
            caption="../report/anatomy.rst",
            category="Anatomy",
            subcategory="head cards",
        ),
    log:
        PATHS.log("plot_head_cards"),
    params:
        run_name=config["run_name"],
        cards=ANATOMY["cards"],
    run:
        steps.plot_head_cards(input, output, params, wildcards, threads, log)


rule function_vectors:
    input:
        prompts=PATHS.prompts,
        info=PATHS.prompt_info,
        model=PATHS.model_dir,
        state=PATHS.final_state,
    output:
        scores=PATHS.anatomy("function_vectors.parquet"),
    log:
        PATHS.log("function_vectors"),
    threads: config["threads"]["model"]
    params:
        **MODEL_PARAMS,
        seed=PERTURBATION["seed"],
        statistics=RESAMPLING,
    run:
        steps.function_vectors(input, output, params, wildcards, threads, log)

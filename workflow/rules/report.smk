# The run's findings on one page; `snakemake --report report.html` gathers it with every plot.


rule summarize:
    input:
        unpack(summary_inputs),
        table=TABLE,
        info=PROMPT_INFO,
        model=MODEL_DIR,
    output:
        summary=report(
            f"{RESULTS}/summary.md",
            caption="../report/summary.rst",
            category="Run",
            subcategory="summary",
        ),
    log:
        f"{LOGS}/summarize.log",
    params:
        settings={
            key: config[key]
            for key in (
                "run_name",
                "model",
                "data",
                "prompts",
                "perturbation",
                "scoring",
                "screen",
                "categories",
                "statistics",
                "direct_effects",
            )
        },
    run:
        steps.summarize(input, output, params, wildcards, threads, log)

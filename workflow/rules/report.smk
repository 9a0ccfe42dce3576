# The run's findings on one page; `snakemake --report report.html` gathers it with every plot.


rule summarize:
    input:
        unpack(summary_inputs),
        table=PATHS.table,
        info=PATHS.prompt_info,
        model=PATHS.model_dir,
    output:
        summary=report(
            PATHS.summary,
            caption="../report/summary.rst",
            category="Run",
            subcategory="summary",
        ),
    log:
        PATHS.log("summarize"),
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
                "anatomy",
            )
        },
    run:
        steps.summarize(input, output, params, wildcards, threads, log)

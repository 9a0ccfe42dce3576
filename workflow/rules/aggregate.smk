# Contribution scores and impact categories: one table for the whole run.


rule aggregate:
    input:
        baseline=BASELINE_METRICS,
        baseline_per_prompt=f"{RESULTS}/baseline/per_prompt.parquet",
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
    conda:
        ENV
    params:
        high=config["categories"]["high"],
        medium=config["categories"]["medium"],
        statistics=config["statistics"],
    script:
        "../scripts/aggregate.py"

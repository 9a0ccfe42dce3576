# The unperturbed model on every prompt: the reference every head is compared with.


rule baseline:
    input:
        prompts=PROMPTS,
        info=PROMPT_INFO,
        model=MODEL_DIR,
    output:
        per_prompt=f"{RESULTS}/baseline/per_prompt.parquet",
        metrics=BASELINE_METRICS,
    log:
        f"{LOGS}/baseline.log",
    conda:
        ENV
    threads: config["threads"]["model"]
    params:
        device=MODEL["device"],
        dtype=MODEL["dtype"],
    script:
        "../scripts/baseline.py"

# The screen: every head of every layer estimated from one forward and one backward pass per
# prompt (headperturb.analysis.screen). Estimates choose what to measure exactly (heads: {screen_top: K})
# and are compared with every exact measurement of the run; they are never reported as
# measurements. A checkpoint: the jobs of a screened sweep are known once it ran.


checkpoint screen:
    input:
        unpack(pairs_input),
        prompts=PROMPT_TABLE,
        info=PROMPT_INFO,
        model=MODEL_DIR,
        per_prompt=BASELINE_PER_PROMPT,
        rms=HEAD_RMS,
    output:
        estimates=f"{SCREEN}/estimates.parquet",
        heads=SCREEN_HEADS,
    log:
        f"{LOGS}/screen.log",
    priority: plans.CHECKPOINT_PRIORITY  # its choice of heads extends the DAG
    conda:
        MODEL_ENV
    threads: step_threads("model")
    params:
        **MODEL_PARAMS,
        settings={
            "kinds": config["screen"]["kinds"],
            "positions": config["screen"]["positions"],
            "scales": PERTURBATION["scales"],
            "noise_mode": PERTURBATION["noise_mode"],
        },
    script:
        "../scripts/screen.py"


# How well the screen agreed with the exact measurements of the run, head by head.
rule screen_agreement:
    input:
        table=TABLE,
        heads=SCREEN_HEADS,
    output:
        agreement=report(
            f"{SCREEN}/agreement.csv",
            caption="../report/agreement.rst",
            category="Screen",
            subcategory="agreement with exact measurements",
        ),
        disagreements=f"{SCREEN}/disagreements.csv",
    log:
        f"{LOGS}/screen_agreement.log",
    params:
        threshold=config["screen"]["disagreement"],
    run:
        steps.screen_agreement(input, output, params, wildcards, threads, log)

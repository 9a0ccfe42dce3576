# The screen: every head of every layer estimated from one forward and one backward pass per
# prompt (headperturb.analysis.screen). Estimates choose what to measure exactly (heads: {screen_top: K})
# and are compared with every exact measurement of the run; they are never reported as
# measurements. A checkpoint: the jobs of a screened sweep are known once it ran.


checkpoint screen:
    input:
        unpack(pairs_input),
        prompts=PATHS.prompts,
        info=PATHS.prompt_info,
        model=PATHS.model_dir,
        per_prompt=PATHS.baseline_per_prompt,
        rms=PATHS.head_rms,
    output:
        estimates=PATHS.screen_estimates,
        heads=PATHS.screen_heads,
    log:
        PATHS.log("screen"),
    priority: plans.CHECKPOINT_PRIORITY  # its choice of heads extends the DAG
    conda:
        MODEL_ENV
    threads: config["threads"]["model"]
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
        table=PATHS.table,
        heads=PATHS.screen_heads,
    output:
        agreement=report(
            PATHS.agreement,
            caption="../report/agreement.rst",
            category="Screen",
            subcategory="agreement with exact measurements",
        ),
        disagreements=PATHS.disagreements,
    log:
        PATHS.log("screen_agreement"),
    params:
        threshold=config["screen"]["disagreement"],
    run:
        steps.screen_agreement(input, output, params, wildcards, threads, log)

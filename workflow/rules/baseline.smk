# The unperturbed model on every prompt: the reference every head is compared with, and what the
# fast perturbation passes start from (headperturb.model.passes).


rule baseline:
    input:
        prompts=PROMPT_TABLE,
        info=PROMPT_INFO,
        model=MODEL_DIR,
    output:
        per_prompt=BASELINE_PER_PROMPT,
        metrics=BASELINE_METRICS,
        state=FINAL_STATE,
        rms=HEAD_RMS,
        program=directory(LAST_LAYER_PROGRAM),
    log:
        f"{LOGS}/baseline.log",
    threads: step_threads("model")
    params:
        **MODEL_PARAMS,
    run:
        steps.baseline(input, output, params, wildcards, threads, log)


# The residual stream entering a layer at every position, for its all-position jobs: the layers
# below it then never run again. Each recording starts from the one of a lower layer (every few
# layers, headperturb.core.plans.recording_source), so the layers below run about once per run.
rule capture_layer:
    input:
        unpack(recording_inputs),
    output:
        activations=f"{RESULTS}/activations/layer{{layer}}.safetensors",
    log:
        f"{LOGS}/capture_layer/layer{{layer}}.log",
    wildcard_constraints:
        layer=r"\d+",
    priority: plans.RECORDING_PRIORITY
    conda:
        MODEL_ENV
    threads: step_threads("model")
    params:
        **MODEL_PARAMS,
    script:
        "../scripts/capture_layer.py"


# Every layer's keys and values at every position, for the jobs that perturb the final position
# only: one token per prompt then runs through the layers above the perturbed one.
rule capture_cache:
    input:
        prompts=PROMPT_TABLE,
        info=PROMPT_INFO,
        model=MODEL_DIR,
    output:
        cache=CACHE,
    log:
        f"{LOGS}/capture_cache.log",
    conda:
        MODEL_ENV
    threads: step_threads("model")
    params:
        **MODEL_PARAMS,
    script:
        "../scripts/capture_cache.py"

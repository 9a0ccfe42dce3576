# The unperturbed model on every prompt: the reference every head is compared with, and what the
# fast perturbation passes start from (headperturb.model.passes).


rule baseline:
    input:
        prompts=PATHS.prompts,
        info=PATHS.prompt_info,
        model=PATHS.model_dir,
    output:
        per_prompt=PATHS.baseline_per_prompt,
        metrics=PATHS.baseline_metrics,
        state=PATHS.final_state,
        rms=PATHS.head_rms,
        program=directory(PATHS.last_layer_program),
    log:
        PATHS.log("baseline"),
    threads: config["threads"]["model"]
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
        activations=PATHS.activations("{layer}"),
    log:
        PATHS.log("capture_layer/layer{layer}"),
    wildcard_constraints:
        layer=r"\d+",
    priority: plans.RECORDING_PRIORITY
    conda:
        MODEL_ENV
    threads: config["threads"]["model"]
    params:
        **MODEL_PARAMS,
    script:
        "../scripts/capture_layer.py"


# Every layer's keys and values at every position, for the jobs that perturb the final position
# only: one token per prompt then runs through the layers above the perturbed one.
rule capture_cache:
    input:
        prompts=PATHS.prompts,
        info=PATHS.prompt_info,
        model=PATHS.model_dir,
    output:
        cache=PATHS.cache,
    log:
        PATHS.log("capture_cache"),
    conda:
        MODEL_ENV
    threads: config["threads"]["model"]
    params:
        **MODEL_PARAMS,
    script:
        "../scripts/capture_cache.py"

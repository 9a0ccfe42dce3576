# The unperturbed model on every prompt: the reference every head is compared with. It also
# records what the last layer's perturbation jobs start from (the final-position state) and
# exports that layer as a program, so those jobs never load the model.


rule baseline:
    input:
        prompts=PROMPTS,
        info=PROMPT_INFO,
        model=MODEL_DIR,
    output:
        per_prompt=f"{RESULTS}/baseline/per_prompt.parquet",
        metrics=BASELINE_METRICS,
        state=FINAL_STATE,
        rms=HEAD_RMS,
        program=directory(LAST_LAYER_PROGRAM),
    log:
        f"{LOGS}/baseline.log",
    conda:
        ENV
    threads: config["threads"]["model"]
    params:
        device=MODEL["device"],
        dtype=MODEL["dtype"],
        site_override=MODEL.get("site"),
    script:
        "../scripts/baseline.py"


# The residual stream entering a layer that is not the last, for the perturbation jobs of its
# heads: the layers below it then never run again.
rule capture_layer:
    input:
        prompts=PROMPTS,
        info=PROMPT_INFO,
        model=MODEL_DIR,
    output:
        f"{RESULTS}/activations/layer{{layer}}.safetensors",
    log:
        f"{LOGS}/capture_layer/layer{{layer}}.log",
    wildcard_constraints:
        layer=r"\d+",
    conda:
        ENV
    threads: config["threads"]["model"]
    params:
        device=MODEL["device"],
        dtype=MODEL["dtype"],
        site_override=MODEL.get("site"),
    script:
        "../scripts/capture_layer.py"

# One job per perturbed head and setting: adding a head, a scale or an ablation adds only its jobs.


rule perturb_head:
    input:
        prompts=PROMPTS,
        info=PROMPT_INFO,
        model=MODEL_DIR,
        activations=perturb_activations,
        program=perturb_program,
        rms=HEAD_RMS,
    output:
        spec.perturb_path(RESULTS, "{site}", "{layer}", "{head}", "{scale}"),
    log:
        f"{LOGS}/perturb/{{site}}/noise/layer{{layer}}/head{{head}}_scale{{scale}}.log",
    wildcard_constraints:
        site="|".join(spec.SITES),
        layer=r"\d+",
        head=r"\d+",
        scale=r"[0-9][0-9.e+-]*",
    conda:
        ENV
    threads: config["threads"]["perturb"]
    params:
        kind="noise",
        noise_mode=PERTURBATION["noise_mode"],
        method=PERTURBATION["method"],
        repeats=PERTURBATION["repeats"],
        seed=PERTURBATION["seed"],
        device=MODEL["device"],
        dtype=MODEL["dtype"],
        site_override=MODEL.get("site"),
    script:
        "../scripts/perturb_head.py"


rule ablate_head:
    input:
        prompts=PROMPTS,
        info=PROMPT_INFO,
        model=MODEL_DIR,
        activations=perturb_activations,
        program=perturb_program,
    output:
        spec.ablation_path(RESULTS, "{site}", "{kind}", "{layer}", "{head}"),
    log:
        f"{LOGS}/perturb/{{site}}/{{kind}}/layer{{layer}}/head{{head}}.log",
    wildcard_constraints:
        site="|".join(spec.SITES),
        kind="zero|mean|resample",
        layer=r"\d+",
        head=r"\d+",
    conda:
        ENV
    threads: config["threads"]["perturb"]
    params:
        method=PERTURBATION["method"],
        repeats=PERTURBATION["repeats"],
        seed=PERTURBATION["seed"],
        device=MODEL["device"],
        dtype=MODEL["dtype"],
        site_override=MODEL.get("site"),
    script:
        "../scripts/perturb_head.py"

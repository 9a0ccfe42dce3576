# One job per perturbed head and setting: adding a head, a scale, a kind or a position adds only
# its jobs. On a workstation the jobs run in threads of the Snakemake process (profiles/default
# sets force-use-threads), so the model is loaded once per run, not once per head; on a cluster
# each job is its own process.


rule perturb_head:
    input:
        unpack(job_inputs),
    output:
        result=PATHS.head_job,
    log:
        PATHS.log_of(PATHS.head_job),
    wildcard_constraints:
        site="|".join(spec.SITES),
        position=spec.POSITION_PATTERN,
        setting=spec.setting_pattern(),
        layer=r"\d+",
        head=r"\d+",
    priority: job_priority
    threads: config["threads"]["perturb"]
    params:
        **MODEL_PARAMS,
        noise_mode=PERTURBATION["noise_mode"],
        method=PERTURBATION["method"],
        # a kind that draws draws perturbation.repeats times, the others once: changing repeats
        # reruns only the jobs that draw
        repeats=head_draws,
        seed=PERTURBATION["seed"],
    run:
        steps.perturb_head(input, output, params, wildcards, threads, log)

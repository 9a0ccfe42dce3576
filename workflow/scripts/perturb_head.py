"""Snakemake script: score every prompt with one head perturbed, for every noise draw."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from headperturb import evaluation, logs  # noqa: E402

logs.setup(snakemake.log[0])
w, p = snakemake.wildcards, snakemake.params
evaluation.run_perturbation(
    prompts_path=snakemake.input.prompts,
    info_path=snakemake.input.info,
    model_dir=snakemake.input.model,
    out_path=snakemake.output[0],
    activations_path=snakemake.input.activations or None,
    program_dir=snakemake.input.program or None,
    method=p.method,
    site=w.site,
    layer=int(w.layer),
    head=int(w.head),
    scale=getattr(w, "scale", ""),
    kind=getattr(w, "kind", "noise"),
    noise_mode=getattr(p, "noise_mode", "absolute"),
    rms_path=getattr(snakemake.input, "rms", None),
    repeats=p.repeats,
    seed=p.seed,
    device=p.device,
    dtype=p.dtype,
    threads=snakemake.threads,
    site_override=p.site_override,
)

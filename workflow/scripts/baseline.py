"""Snakemake script: score every prompt with the unperturbed model."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from headperturb import evaluation, logs  # noqa: E402

logs.setup(snakemake.log[0])
evaluation.run_baseline(
    prompts_path=snakemake.input.prompts,
    info_path=snakemake.input.info,
    model_dir=snakemake.input.model,
    per_prompt_path=snakemake.output.per_prompt,
    metrics_path=snakemake.output.metrics,
    state_path=snakemake.output.state,
    rms_path=snakemake.output.rms,
    program_dir=snakemake.output.program,
    device=snakemake.params.device,
    dtype=snakemake.params.dtype,
    threads=snakemake.threads,
    site_override=snakemake.params.site_override,
)

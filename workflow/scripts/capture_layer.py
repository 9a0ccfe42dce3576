"""Snakemake script: record the residual stream entering one layer, for its perturbation jobs."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from headperturb import evaluation, logs  # noqa: E402

logs.setup(snakemake.log[0])
evaluation.run_capture(
    prompts_path=snakemake.input.prompts,
    info_path=snakemake.input.info,
    model_dir=snakemake.input.model,
    out_path=snakemake.output[0],
    layer=int(snakemake.wildcards.layer),
    device=snakemake.params.device,
    dtype=snakemake.params.dtype,
    threads=snakemake.threads,
    site_override=snakemake.params.site_override,
)

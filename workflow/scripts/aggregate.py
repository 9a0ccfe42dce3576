"""Snakemake script: contribution scores and impact categories for every perturbed head."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from headperturb import evaluation, logs  # noqa: E402

logs.setup(snakemake.log[0])
evaluation.run_aggregation(
    baseline_path=snakemake.input.baseline,
    baseline_per_prompt_path=snakemake.input.baseline_per_prompt,
    perturbed_paths=list(snakemake.input.perturbed),
    parquet_path=snakemake.output.parquet,
    csv_path=snakemake.output.csv,
    high=snakemake.params.high,
    medium=snakemake.params.medium,
    statistics=snakemake.params.statistics,
)

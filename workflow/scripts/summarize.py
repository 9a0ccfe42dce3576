"""Snakemake script: the run's findings on one page (summary.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from headperturb import io, logs, models, summary  # noqa: E402
from headperturb.evaluation import read_table  # noqa: E402

logs.setup(snakemake.log[0])
table, meta = read_table(snakemake.input.table)
text = summary.summary_markdown(
    table,
    meta,
    io.read_json(snakemake.input.info),
    io.read_json(Path(snakemake.input.model) / models.INFO_FILE),
    snakemake.params.settings,
)
io.write_text(snakemake.output[0], text)

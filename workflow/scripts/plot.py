"""Snakemake script: one figure from the contribution table, chosen by the rule's name."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from headperturb import logs, plots  # noqa: E402

logs.setup(snakemake.log[0])
plots.plot_for_rule(snakemake.rule, snakemake.input[0], snakemake.output[0])

"""Snakemake script: this rule's step of the headperturb library (headperturb.adapters), as a
process of its own, logging to the rule's log."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))

from headperturb import adapters  # noqa: E402

adapters.script(snakemake)

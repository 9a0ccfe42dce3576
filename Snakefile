# headperturb: what each attention head of a causal LM contributes to few-shot IMDB sentiment
# classification, measured by perturbing one head at a time. See README.md.
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from headperturb import config as run_config  # noqa: E402
from headperturb.adapters import (
    check_cluster,
    end_of_error,
    end_of_run,
    start_of_run,
)  # noqa: E402

start_of_run()  # Ctrl-C stops the jobs in threads of this process too
check_cluster(
    workflow
)  # a SLURM profile where SLURM does not answer: one line, before any job

# The default run. A config file given with --configfile replaces it (keys it leaves out take
# the schema's defaults); --config KEY=VALUE overrides single keys. README: Configuration.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


config.update(
    run_config.validate(
        config, Path(workflow.basedir) / "workflow/schemas/config.schema.yaml"
    )
)


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/prompts.smk"
include: "workflow/rules/baseline.smk"
include: "workflow/rules/screen.smk"
include: "workflow/rules/perturb.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/plots.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        final_targets(),


# A SLURM profile where SLURM does not answer stops in one line, before any job is submitted.
onstart:
    check_cluster(workflow)


# Let the Snakemake process exit at once when the run ends (headperturb.adapters.end_of_run).
onsuccess:
    end_of_run()


onerror:
    end_of_error(workflow)

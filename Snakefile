# headperturb: what each attention head of a causal LM contributes to few-shot IMDB sentiment
# classification, measured by perturbing one head at a time. See README.md and docs/.
# Needs the package installed (`pip install -e ".[workflow]"`); works as a Snakemake module too.
from snakemake.utils import min_version

from headperturb.core import config as run_config
from headperturb.workflow import lifecycle

min_version("9.27")

# Ctrl-C stops the jobs in threads of this process too; failed jobs end the run with one line
# each; a config that changed finished steps' settings under --rerun-triggers mtime stops it
lifecycle.start_of_run(workflow)

# The default run. A config file given with --configfile replaces it (keys it leaves out take
# the schema's defaults); --config KEY=VALUE overrides single keys. config/README.md.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# a config that `extends` another is that one with its own keys changed (config/README.md);
# the schema beside this Snakefile checks the result, also where another workflow uses this one
# as a module
RESOLVED = run_config.resolved(dict(config), [".", workflow.basedir])
config.pop(run_config.EXTENDS, None)
config.update(
    run_config.validate(
        RESOLVED, workflow.source_path("workflow/schemas/config.schema.yaml")
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
include: "workflow/rules/curves.smk"
include: "workflow/rules/direct.smk"
include: "workflow/rules/anatomy.smk"
include: "workflow/rules/plots.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        final_targets(),


# A SLURM profile where SLURM does not answer stops in one line, before any job is submitted.
onstart:
    lifecycle.check_cluster(workflow)


# Let the Snakemake process exit at once when the run ends (headperturb.workflow.lifecycle.end_of_run);
# a run stopped by SIGTERM says so.
onsuccess:
    lifecycle.end_of_run()


onerror:
    lifecycle.end_of_error(workflow)

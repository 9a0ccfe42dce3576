"""The workflow's glue: what each Snakemake rule runs (:mod:`headperturb.workflow.steps`)."""

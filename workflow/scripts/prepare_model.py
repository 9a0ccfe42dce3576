"""Snakemake script: the prepare_model step (headperturb.workflow.steps.prepare_model), as a process of its own."""

from headperturb.workflow import steps

steps.script(snakemake, steps.prepare_model)

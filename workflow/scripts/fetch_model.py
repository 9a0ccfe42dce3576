"""Snakemake script: the fetch_model step (headperturb.workflow.steps.fetch_model), as a process of its own."""

from headperturb.workflow import steps

steps.script(snakemake, steps.fetch_model)

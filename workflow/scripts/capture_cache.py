"""Snakemake script: the capture_cache step (headperturb.workflow.steps.capture_cache), as a process of its own."""

from headperturb.workflow import steps

steps.script(snakemake, steps.capture_cache)

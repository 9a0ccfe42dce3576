"""headperturb: what each attention head of a causal LM contributes to a task.

The package holds the logic of the Snakemake workflow in this repository, in subpackages that
follow the import graph (each imports only from the ones above it; docs/extending.md):

- :mod:`headperturb.core`: torch-free: the config (:mod:`~headperturb.core.config`), head jobs,
  sweeps and file names (:mod:`~headperturb.core.spec`), sets of heads
  (:mod:`~headperturb.core.sets`), the plan of each job (:mod:`~headperturb.core.plans`), the
  kinds of perturbation (:mod:`~headperturb.core.kinds`), a run's paths and DAG
  (:mod:`~headperturb.core.paths`, :mod:`~headperturb.core.targets`), the checks made while the
  DAG is built (:mod:`~headperturb.core.checks`), job costs (:mod:`~headperturb.core.costs`) and
  atomic, checksummed files (:mod:`~headperturb.core.files`).
- :mod:`headperturb.joblog`: a leaf: job logs, one line per failure, progress.
- :mod:`headperturb.data`: IMDB (:mod:`~headperturb.data.imdb`), prompts and pairs
  (:mod:`~headperturb.data.prompts`), the decision rule (:mod:`~headperturb.data.calibration`).
- :mod:`headperturb.analysis`: numpy and pandas only: scoring, statistics, discrimination and bias
  (:mod:`~headperturb.analysis.effects`), the run's table, the screen's estimates and choice,
  figures and the summary.
- :mod:`headperturb.model`: torch: loading (:mod:`~headperturb.model.loading`), where heads live
  (:mod:`~headperturb.model.sites`), the named hook points and every hook
  (:mod:`~headperturb.model.hooks`), module-tree changes (:mod:`~headperturb.model.surgery`), the
  unperturbed model (:mod:`~headperturb.model.engine`), the perturbed passes
  (:mod:`~headperturb.model.passes`, :mod:`~headperturb.model.tail`), the screen's gradients
  (:mod:`~headperturb.model.gradients`), recordings (:mod:`~headperturb.model.recordings`), what a
  process loads once (:mod:`~headperturb.model.cache`), rows and partners
  (:mod:`~headperturb.model.rows`), what a job perturbs (:mod:`~headperturb.model.target`), one
  plan's pass (:mod:`~headperturb.model.run`) and one head or set job
  (:mod:`~headperturb.model.headjob`, :mod:`~headperturb.model.headset`).
- :mod:`headperturb.workflow`: what each Snakemake rule runs (:mod:`~headperturb.workflow.steps`)
  and the run's lifecycle (:mod:`~headperturb.workflow.lifecycle`: Ctrl-C, SIGTERM, the run's
  owner, the cluster check).
"""

__version__ = "0.3.0"

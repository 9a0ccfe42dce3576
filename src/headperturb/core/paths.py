"""Where a run's files live: one value, :class:`RunPaths`, for the rule files and the library.

Every file of a run lies under ``results/<run_name>/``, its logs under ``results/<run_name>/logs/``;
the prepared model under ``resources/models/<model name>/``, shared by the runs of one model.
Standard library only, so the Snakefile uses it while building the DAG.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from headperturb.core.sets import mib_path, ranking_path, set_path
from headperturb.core.spec import head_path

MODELS = "resources/models"
"""Where the prepared models (and the sources fetched for them) live."""


_HEAD_WILDCARDS = {
    "site": "{site}",
    "position": "{position}",
    "setting": "{setting}",
    "layer": "{layer}",
    "head": "{head}",
}
_RANKING_WILDCARDS = {
    "site": "{site}",
    "position": "{position}",
    "kind": "{kind}",
    "order_name": "{order}",
}
_SET_WILDCARDS = {**_RANKING_WILDCARDS, "mode": "{mode}", "k": "{k}"}


@dataclass(frozen=True)
class RunPaths:
    """The files of one run (``results``: ``results/<run_name>``) and of its model
    (``model_name``). Wildcards are passed through as text: ``activations("{layer}")`` is the
    rule's pattern."""

    results: str
    model_name: str = ""

    @classmethod
    def of(cls, run_name: str, model_name: str = "") -> RunPaths:
        return cls(results=f"results/{run_name}", model_name=model_name)

    # -- the model -----------------------------------------------------------------------------
    @property
    def model_dir(self) -> str:
        """The prepared model: safetensors, tokenizer and ``headperturb_model.json``."""
        return f"{MODELS}/{self.model_name}"

    @property
    def model_source(self) -> str:
        """Where a fetched source of the model goes (its GGUF, or a hub repository's files)."""
        return f"{MODELS}/{self.model_name}.source"

    @property
    def fetch_log(self) -> str:
        return f"{self.model_source}/fetch.log"

    @property
    def prepare_log(self) -> str:
        return f"{MODELS}/{self.model_name}.prepare.log"

    # -- logs ----------------------------------------------------------------------------------
    @property
    def logs(self) -> str:
        return f"{self.results}/logs"

    def log(self, name: str) -> str:
        """A step's log: ``log("aggregate")`` is ``<results>/logs/aggregate.log``."""
        return f"{self.logs}/{name}.log"

    def log_of(self, pattern: str) -> str:
        """The log of a pattern under the results (a head job's, a ranking's, a set job's): the
        same path under the logs, its suffix ``.log``."""
        return os.path.splitext(self.logs + pattern.removeprefix(self.results))[0] + ".log"

    # -- prompts -------------------------------------------------------------------------------
    @property
    def reviews(self) -> str:
        return f"{self.results}/prompts/reviews.parquet"

    @property
    def prompts(self) -> str:
        return f"{self.results}/prompts/prompts.parquet"

    @property
    def prompt_info(self) -> str:
        return f"{self.results}/prompts/prompt_info.json"

    @property
    def demonstrations(self) -> str:
        return f"{self.results}/prompts/demonstrations.parquet"

    @property
    def selection(self) -> str:
        return f"{self.results}/prompts/selection.csv"

    @property
    def pairs(self) -> str:
        return f"{self.results}/prompts/pairs.parquet"

    # -- the unperturbed model and its recordings ----------------------------------------------
    @property
    def baseline_metrics(self) -> str:
        return f"{self.results}/baseline/metrics.json"

    @property
    def baseline_per_prompt(self) -> str:
        return f"{self.results}/baseline/per_prompt.parquet"

    @property
    def final_state(self) -> str:
        return f"{self.results}/baseline/final_state.safetensors"

    @property
    def head_rms(self) -> str:
        return f"{self.results}/baseline/head_rms.parquet"

    @property
    def last_layer_program(self) -> str:
        return f"{self.results}/baseline/last_layer"

    @property
    def cache(self) -> str:
        return f"{self.results}/activations/cache.safetensors"

    def activations(self, layer) -> str:
        """The residual stream entering ``layer`` at every position."""
        return f"{self.results}/activations/layer{layer}.safetensors"

    def recording(self, name: str, layer) -> str:
        """The file of a recording a plan names (:data:`headperturb.core.plans.RECORDINGS`), for
        a job at ``layer``."""
        if name == "activations":
            return self.activations(layer)
        return {
            "state": self.final_state,
            "program": self.last_layer_program,
            "cache": self.cache,
            "unperturbed": self.baseline_per_prompt,
        }[name]

    # -- head jobs, the screen, sets of heads --------------------------------------------------
    @property
    def head_job(self) -> str:
        """The pattern of a head job's file."""
        return head_path(self.results, **_HEAD_WILDCARDS)

    @property
    def screen_estimates(self) -> str:
        return f"{self.results}/screen/estimates.parquet"

    @property
    def screen_heads(self) -> str:
        return f"{self.results}/screen/heads.parquet"

    @property
    def agreement(self) -> str:
        return f"{self.results}/screen/agreement.csv"

    @property
    def disagreements(self) -> str:
        return f"{self.results}/screen/disagreements.csv"

    @property
    def ranking(self) -> str:
        """The pattern of an order's ranking of every head."""
        return ranking_path(self.results, **_RANKING_WILDCARDS)

    @property
    def mib_nodes(self) -> str:
        """The pattern of an order's head scores as MIB's node-level circuit file."""
        return mib_path(self.results, **_RANKING_WILDCARDS)

    @property
    def set_job(self) -> str:
        """The pattern of a set job's file."""
        return set_path(self.results, **_SET_WILDCARDS)

    @property
    def curve_points(self) -> str:
        return f"{self.results}/curves/points.parquet"

    @property
    def curve_points_csv(self) -> str:
        return f"{self.results}/curves/points.csv"

    @property
    def curve_summary(self) -> str:
        return f"{self.results}/curves/summary.csv"

    @property
    def stale_sets(self) -> str:
        return f"{self.results}/stale_sets.txt"

    @property
    def direct(self) -> str:
        return f"{self.results}/direct_effects.parquet"

    @property
    def direct_csv(self) -> str:
        return f"{self.results}/direct_effects.csv"

    def anatomy(self, name: str) -> str:
        """A file of what kind of head each one is: ``anatomy("heads.csv")``."""
        return f"{self.results}/anatomy/{name}"

    # -- the table, the figures, the summary ---------------------------------------------------
    @property
    def table(self) -> str:
        return f"{self.results}/contributions.parquet"

    @property
    def table_csv(self) -> str:
        return f"{self.results}/contributions.csv"

    @property
    def stale_results(self) -> str:
        return f"{self.results}/stale_results.txt"

    def plot(self, name: str) -> str:
        return f"{self.results}/plots/{name}.png"

    @property
    def summary(self) -> str:
        return f"{self.results}/summary.md"

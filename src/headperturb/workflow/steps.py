"""What each Snakemake rule runs: one function per rule, named as the rule, from the rule's
``input``, ``output``, ``params``, ``wildcards`` and ``threads`` to the library.

A ``run:`` rule calls its step directly, ``steps.<rule>(input, output, params, wildcards, threads,
log)``: on a workstation in a thread of the Snakemake process (``profiles/default``), on a cluster
in a process of its own. A rule that is always a process of its own (fetching and preparing the
model, the recordings, the screen) runs ``workflow/scripts/<rule>.py``, which calls
:func:`script` with its step. Either way the job's records go to its log and a failure leaves
one line on the terminal and its traceback in the log (:mod:`headperturb.joblog`).

The steps live by stage: :mod:`~headperturb.workflow.preparing` (the model, the prompts),
:mod:`~headperturb.workflow.recording` (the baseline and the recordings),
:mod:`~headperturb.workflow.measuring` (the head jobs, the screen),
:mod:`~headperturb.workflow.together` (the curves, the direct effects),
:mod:`~headperturb.workflow.anatomy` (what kind of head each one is) and
:mod:`~headperturb.workflow.reporting` (the table, the figures, the summary), around
:mod:`~headperturb.workflow.rulestep` (the job a step runs as). This module gathers them under
the names the rules call.

Every step reads and writes files through :mod:`headperturb.core.files` and
:mod:`headperturb.model.recordings`; the tests call the steps with plain namespaces in place of
Snakemake's objects. torch and transformers are imported inside the steps, so importing this
module is cheap.
"""

from __future__ import annotations

from headperturb.workflow.anatomy import (
    anatomy_table,
    attention_shares,
    function_vectors,
    head_types,
    head_writes,
    plot_attention_map,
    plot_head_cards,
)
from headperturb.workflow.measuring import perturb_head, screen, screen_agreement
from headperturb.workflow.preparing import (
    build_prompts,
    fetch_model,
    pair_prompts,
    prepare_model,
    select_reviews,
)
from headperturb.workflow.recording import baseline, capture_cache, capture_layer
from headperturb.workflow.reporting import aggregate, plot, summarize
from headperturb.workflow.rulestep import script, step
from headperturb.workflow.together import (
    curves,
    direct_effects,
    mib_nodes,
    perturb_set,
    rank_heads,
)

__all__ = [
    "aggregate",
    "anatomy_table",
    "attention_shares",
    "baseline",
    "build_prompts",
    "capture_cache",
    "capture_layer",
    "curves",
    "direct_effects",
    "fetch_model",
    "function_vectors",
    "head_types",
    "head_writes",
    "mib_nodes",
    "pair_prompts",
    "perturb_head",
    "perturb_set",
    "plot",
    "plot_attention_map",
    "plot_head_cards",
    "prepare_model",
    "rank_heads",
    "screen",
    "screen_agreement",
    "script",
    "select_reviews",
    "step",
    "summarize",
]

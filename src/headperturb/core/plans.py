"""How a job is computed: the one place that chooses a pass.

:func:`plan` gives a head job (:class:`headperturb.core.spec.HeadJob`) or a set job
(:class:`headperturb.core.sets.SetJob`) its :class:`Plan`: the pass, the layer it starts at, the
recordings it reads and its cost. The rule's inputs (``workflow/rules/common.smk``), the job
itself (:func:`headperturb.model.run.run`), the cost preview and the priorities all read the same
plan. Standard library only, so the Snakefile uses it while building the DAG.
"""

from __future__ import annotations

from dataclasses import dataclass

from headperturb.core.kinds import build
from headperturb.core.sets import SetJob
from headperturb.core.spec import HeadJob, in_prefix, paired

PASSES = (
    "naive",
    "unperturbed",
    "last_layer",
    "final_position",
    "shared_prefix",
    "partner_patched",
)
"""Every pass (:mod:`headperturb.model.passes`); :func:`plan` says which runs a job."""

RECORDINGS = ("state", "program", "cache", "activations", "unperturbed")
"""What a pass may start from: ``state``, the baseline's final state of every layer;
``program``, the exported last layer; ``cache``, every layer's keys and values;
``activations``, the residual stream entering the plan's layer at every position;
``unperturbed``, the baseline's per-prompt logits."""


@dataclass(frozen=True)
class Plan:
    """How one job is computed: the pass (:data:`PASSES`), the layer it starts at (a head job's
    layer; a set's lowest member's), the model's layers, the draws it evaluates and the
    recordings it reads (:data:`RECORDINGS`); ``note`` says why, where that is worth a log line.
    Every pass gives the numbers of ``naive``, full
    forward passes with the hook (the equivalence tests)."""

    name: str
    layer: int
    n_layers: int
    draws: int = 1
    recordings: tuple[str, ...] = ()
    note: str = ""  # why this pass, where the reason is worth a log line (unperturbed)

    def cost(self, tokens: float, own: float | None = None, shared: float = 1.0):
        """What the job computes per prompt: (token-layers of full passes, final-token-layers).
        ``tokens``: a prompt's tokens; ``own``: its tokens after the demonstrations; ``shared``:
        the share of prompts whose edited demonstrations are computed anew (1: every prompt's,
        0: once per job)."""
        depth, draws = self.n_layers - self.layer, self.draws
        own = tokens if own is None else own
        return {
            "naive": (draws * tokens * self.n_layers, 0.0),
            "unperturbed": (0.0, 0.0),
            "last_layer": (0.0, float(draws)),
            "final_position": (0.0, float(draws * depth)),
            "shared_prefix": (draws * depth * (own + shared * (tokens - own)), 0.0),
            "partner_patched": (2.0 * depth * tokens, 0.0),
        }[self.name]


def unchanged(job: HeadJob, n_layers: int) -> str | None:
    """Why ``job``'s edit cannot reach the logits, so that its numbers are the unperturbed
    model's exactly; None where it can."""
    if job.position not in ("all", "last") and job.layer == n_layers - 1:
        return "at the last layer only the final position reaches the logits"
    if in_prefix(job.position) and paired(job.kind):
        return (
            "the partner prompt shares the demonstrations, so its output there is the prompt's own"
        )
    return None


def plan(
    job: HeadJob | SetJob,
    method: str,
    n_layers: int,
    *,
    repeats: int = 1,
    lowest: int | None = None,
) -> Plan:
    """The plan of ``job`` under ``method`` in a model of ``n_layers`` layers (``repeats``: the
    run's noise draws; ``lowest``: a set's lowest member's layer, once its ranking is known).

    A head job:

    - ``naive`` (``method: naive``): the reference, full forward passes, no recordings;
    - ``unperturbed``: an edit that cannot reach the logits (:func:`unchanged`: a segment before
      the final position of the last layer; patching the demonstrations, which the partner
      shares) takes the baseline's logits, so its changes are exactly 0, not float noise that a
      permutation test could call significant;
    - ``last_layer``: at the last layer only the final position reaches the logits: one position
      per prompt from the final state (the exported program where there is one for the device);
    - ``final_position`` (``positions: last`` below the last layer): the final token alone
      through the layers above, attending to the recorded keys and values;
    - ``shared_prefix`` (every other position below the last layer): the layers from the job's
      up, from the recorded residual stream entering it; the demonstrations once per group of
      prompts that get the same values there, then each prompt's own tokens on top of them.

    A set job: ``naive``; ``final_position`` at the final position; at every position
    ``partner_patched`` for patching (each prompt beside its partner in one batch, the members'
    outputs copied across) and ``shared_prefix`` for the others, from its lowest member's layer.
    """
    if isinstance(job, SetJob):
        return _set_plan(job, method, n_layers, lowest)
    draws = build(job.kind, job.scale or None).draws(repeats)

    def named(name: str, *recordings: str, note: str = "") -> Plan:
        return Plan(name, job.layer, n_layers, draws, recordings, note)

    if method == "naive":
        return named("naive")
    why = unchanged(job, n_layers)
    if why:
        return named("unperturbed", "unperturbed", note=why)
    if job.layer == n_layers - 1:
        return named("last_layer", "state", "program")
    if job.position == "last":
        return named("final_position", "state", "cache")
    return named("shared_prefix", "activations")


def _set_plan(job: SetJob, method: str, n_layers: int, lowest: int | None) -> Plan:
    layer = 0 if lowest is None else lowest
    if method == "naive":
        return Plan("naive", layer, n_layers)
    if job.position == "last":
        return Plan("final_position", layer, n_layers, recordings=("state", "cache"))
    name = "partner_patched" if paired(job.kind) else "shared_prefix"
    return Plan(name, layer, n_layers, recordings=("activations",))


def priority(job: HeadJob, method: str, n_layers: int, repeats: int = 1) -> int:
    """The job's Snakemake priority, about its cost: the layers its pass runs over every token,
    times its draws, times 5 where every prompt runs its own demonstrations (noise and resample
    at ``all`` or ``demonstrations``: the default prompts' demonstrations are about 4x each
    prompt's own tokens); 0 for the final position and the last layer. The longest jobs then
    start first, so short ones fill the cores at the end. Recordings and checkpoints come before
    any job (:data:`RECORDING_PRIORITY`, :data:`CHECKPOINT_PRIORITY`)."""
    perturbation = build(job.kind, float(job.scale) if job.scale else None)
    own = job.position in ("review", "last") or perturbation.prefix_key(1) is not None
    full, _final = plan(job, method, n_layers, repeats=repeats).cost(
        tokens=5.0, own=1.0, shared=0.0 if own else 1.0
    )
    return int(full)


RECORDING_PRIORITY = 10**6
"""A layer recording's priority: above every job's (:func:`priority`), so the jobs that wait for
it can start early."""

CHECKPOINT_PRIORITY = RECORDING_PRIORITY + 1
"""The screen's and the curves' rankings: their choice of heads extends the DAG."""

RECORDING_STOPS = 6
"""How many layers (evenly spaced) the recordings of a model start from: see
:func:`recording_source`."""


def recording_source(layer: int, n_layers: int) -> int | None:
    """The lower layer whose recorded input the recording of ``layer``'s input starts from (the
    layers between then run on it: :meth:`headperturb.model.engine.Engine.capture_layer_inputs`),
    or None: from the embeddings. The sources are every ``stride``-th layer (``stride`` =
    ceil((n_layers - 1) / RECORDING_STOPS)), each recorded from the one below it, so a run that
    records m layers computes about the deepest one's layers once plus fewer than ``stride``
    layers per recording, instead of each recording's layers anew; which layer a recording starts
    from depends on the model alone, so adding heads or layers to a run never changes a
    recording's inputs."""
    stride = max(1, -(-(n_layers - 1) // RECORDING_STOPS))
    source = (layer - 1) // stride * stride
    return source if source > 0 else None

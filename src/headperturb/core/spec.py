"""Which head jobs a config asks for, and where their files go: pure helpers shared by the
Snakefile and the library.

A *head job* (:class:`HeadJob`) is one perturbed head: (site, position, kind, scale, layer,
head). Its file is ``perturb/<site>/<position>/<setting>/layer<L>/head<H>.parquet`` where the
setting is the kind, with ``_scale<S>`` for kinds that take a scale (noise). The config lists
*sweeps* (``perturbation.sweeps``), each a product of layers x heads x kinds x scales x positions
x sites; a run's jobs are their union.

At run time a job travels as one :class:`Job`: the head job, the perturbation object and the
settings that produced its numbers.

A *set job* (:class:`SetJob`) perturbs several heads together: a point of a joint-ablation curve
(``perturbation.curves``), ``sets/<site>/<position>/<kind>/<order>/<mode>/k<k>.parquet``.

:func:`plan` decides how a head job is computed (its pass and the recordings it starts from), for
the rule's inputs, the job itself, the cost preview and the tests.

This module imports only the standard library (and the registry of perturbation kinds, which does
too), so the Snakefile uses it while building the DAG without paying for torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import product

from headperturb.core.kinds import PERTURBATIONS, Perturbation, build, format_scale, kinds

SITES = ("o_proj_input", "o_proj_output")
"""Where a head's output is perturbed.

``o_proj_input``: the head's own output, the input of the attention output projection
(TransformerLens ``hook_z``), a slice of width ``head_dim`` per head. The default.
``o_proj_output``: a slice of the projection's *output*, as the original study hooked it. The
projection mixes all heads, so that slice is a block of residual-stream coordinates, not a head.
"""

POSITIONS = ("all", "last", "demonstrations", "review")
"""Which positions of a prompt are perturbed: ``all`` (the original study); ``last``, the final
position, where the label is read; ``demonstrations``, the shared k-shot prefix (the tokens of
every filled demonstration and its separator, ``prefix_len`` in ``prompt_info.json``); or
``review``, the test review's own tokens (its template words and text) up to, not including,
the final position. ``demonstrations``, ``review`` and ``last`` make up ``all``."""

SEGMENTS = ("demonstrations", "review", "last")
"""The positions that partition a prompt, in prompt order."""

METHODS = ("fast", "naive")
"""``fast`` runs only what the perturbation can change, from recorded activations; ``naive``, the
reference, a full forward pass per prompt with the hook. They give the same numbers."""

SWEEP_KEYS = ("layers", "heads", "kinds", "scales", "positions", "sites")
"""The keys of ``perturbation`` a sweep may set; the others hold for the whole run."""


class SpecError(ValueError):
    """A setting that names layers, heads, kinds or sites the model or the schema does not allow."""


def resolve_layers(spec: int | str | Sequence[int | str], n_layers: int) -> list[int]:
    """Turn a layer selection into sorted, distinct, non-negative layer indices.

    ``spec`` is ``"all"``, an int, or a list of ints; negative ints count from the end
    (``-1`` is the last layer). Raises :class:`SpecError` for an index outside the model.
    """
    return _resolve(spec, n_layers, "layer", "layers", negative=True)


def resolve_heads(spec: int | str | Sequence[int | str], n_heads: int) -> list[int]:
    """Turn a head selection (``"all"``, an int or a list of ints >= 0) into query-head indices."""
    return _resolve(spec, n_heads, "head", "query heads", negative=False)


def _resolve(spec, count: int, what: str, plural: str, negative: bool) -> list[int]:
    if isinstance(spec, str):
        if spec.strip().lower() == "all":
            return list(range(count))
        raise SpecError(
            f"{what}s: {spec!r} is not allowed; give 'all', an integer or a list of integers"
        )
    items: Iterable = [spec] if isinstance(spec, int) else spec
    out = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise SpecError(f"{what}s: {item!r} is not an integer")
        index = item + count if item < 0 and negative else item
        if not 0 <= index < count:
            allowed = (
                f"{-count}..{count - 1}, negative ones from the end"
                if negative
                else f"0..{count - 1}"
            )
            raise SpecError(
                f"{what} {item} is out of range: the model has {count} {plural} (allowed {allowed})"
            )
        out.add(index)
    if not out:
        raise SpecError(f"{what}s: the selection is empty")
    return sorted(out)


@dataclass(frozen=True, order=True)
class HeadJob:
    """One perturbed head: where (site, positions), how (kind, scale), which (layer, head).
    ``scale`` is the canonical text of the noise scale (:func:`format_scale`), ``""`` for kinds
    without one."""

    site: str
    position: str
    kind: str
    scale: str
    layer: int
    head: int

    @property
    def setting(self) -> str:
        """The path component of (kind, scale): ``zero``, ``noise_scale2``."""
        return f"{self.kind}_scale{self.scale}" if self.scale else self.kind

    def path(self, results: str) -> str:
        return head_path(results, self.site, self.position, self.setting, self.layer, self.head)

    def perturbation(self, noise_mode: str = "absolute") -> Perturbation:
        return build(self.kind, self.scale or None, noise_mode)

    @classmethod
    def from_wildcards(cls, site, position, setting, layer, head) -> HeadJob:
        kind, scale = parse_setting(setting)
        return cls(site, position, kind, scale, int(layer), int(head))


def head_path(results: str, site, position, setting, layer, head) -> str:
    return f"{results}/perturb/{site}/{position}/{setting}/layer{layer}/head{head}.parquet"


def setting_pattern() -> str:
    """A regular expression for the setting wildcard: every registered kind, with ``_scale<S>``
    for the kinds that take a scale."""
    parts = [
        f"{k}_scale[0-9][0-9.e+-]*" if cls.takes_scale else k for k, cls in PERTURBATIONS.items()
    ]
    return "|".join(parts)


def parse_setting(setting: str) -> tuple[str, str]:
    """``noise_scale2`` -> ``("noise", "2")``; ``zero`` -> ``("zero", "")``."""
    match = re.fullmatch(r"([a-z]+)(?:_scale(.+))?", setting)
    if not match or match.group(1) not in PERTURBATIONS:
        raise SpecError(f"setting {setting!r} names no kind; kinds: {', '.join(kinds())}")
    kind, scale = match.group(1), match.group(2) or ""
    if PERTURBATIONS[kind].takes_scale != bool(scale):
        raise SpecError(
            f"setting {setting!r}: {kind} {'needs' if scale == '' else 'takes no'} scale"
        )
    return kind, scale


def sweeps(perturbation: dict) -> list[dict]:
    """The config's sweeps, each with every :data:`SWEEP_KEYS` key filled from the top level."""
    defaults = {key: perturbation[key] for key in SWEEP_KEYS if key in perturbation}
    return [{**defaults, **sweep} for sweep in perturbation.get("sweeps") or [{}]]


POSITION_LABELS = {"all": "all positions", "last": "last position",
                   "demonstrations": "demonstration positions", "review": "review positions"}  # fmt: skip


def position_label(position: str) -> str:
    """``all`` -> ``all positions``, ``last`` -> ``last position``, for logs, plots and tables."""
    return POSITION_LABELS[position]


def takes_scale(kind: str) -> bool:
    """Whether ``kind`` has a scale (noise): its settings are one per scale."""
    return kind in PERTURBATIONS and PERTURBATIONS[kind].takes_scale


def paired(kind: str) -> bool:
    """Whether ``kind`` runs on a prompt and its opposite-sentiment partner (patch, restore)."""
    return kind in PERTURBATIONS and PERTURBATIONS[kind].paired


def screened(sweep: dict) -> bool:
    """Whether a sweep's heads are chosen by the screen (``heads: {screen_top: K, random: M}``)."""
    return isinstance(sweep["heads"], dict)


def sweep_jobs(
    sweep: dict, n_layers: int, n_heads: int, chosen: dict | None = None
) -> list[HeadJob]:
    """The jobs of one sweep, resolved against the model's shape. ``chosen`` ({layer: heads})
    replaces the head selection of a screened sweep."""
    for site in sweep["sites"]:
        if site not in SITES:
            raise SpecError(f"site {site!r} is not allowed; allowed: {', '.join(SITES)}")
    for position in sweep["positions"]:
        if position not in POSITIONS:
            raise SpecError(
                f"position {position!r} is not allowed; allowed: {', '.join(POSITIONS)}"
            )
    settings = []
    for kind in sweep["kinds"]:
        if kind not in PERTURBATIONS:
            raise SpecError(f"kind {kind!r} is not allowed; allowed: {', '.join(kinds())}")
        if takes_scale(kind):
            settings += [(kind, format_scale(s)) for s in sweep["scales"]]
        else:
            settings.append((kind, ""))
    layers = resolve_layers(sweep["layers"], n_layers)
    if chosen is None:
        heads = resolve_heads(sweep["heads"], n_heads)
        chosen = {layer: heads for layer in layers}
    return [
        HeadJob(site, position, kind, scale, layer, head)
        for site in sweep["sites"]
        for position in sweep["positions"]
        for layer in layers
        for head in chosen.get(layer, [])
        for kind, scale in settings
    ]


def head_jobs(perturbation: dict, n_layers: int, n_heads: int, choose=None) -> list[HeadJob]:
    """Every job the config's sweeps ask for (their union), sorted. ``choose(sweep, layers)``
    gives the heads of a screened sweep ({layer: heads}); without it those sweeps are left out
    (their heads are known once the screen ran)."""
    jobs: set[HeadJob] = set()
    for sweep in sweeps(perturbation):
        if not screened(sweep):
            jobs.update(sweep_jobs(sweep, n_layers, n_heads))
        elif choose is not None:
            layers = resolve_layers(sweep["layers"], n_layers)
            jobs.update(sweep_jobs(sweep, n_layers, n_heads, choose(sweep, layers)))
    return sorted(jobs)


@dataclass(frozen=True)
class Job:
    """One head job as it runs: the head, its perturbation (noise with its sigma resolved), and
    the settings that produced its numbers. Built from the rule's wildcards and params, written
    with the file."""

    target: HeadJob
    perturbation: Perturbation
    method: str = "fast"
    seed: int = 0
    repeats: int = 1
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def draws(self) -> int:
        return self.perturbation.draws(self.repeats)

    def describe(self) -> str:
        t = self.target
        return f"{t.site} {position_label(t.position)}, {self.perturbation.label()}, layer {t.layer} head {t.head}"

    def settings(self) -> dict:
        """The job's settings as stored with its result (columns and metadata)."""
        out = {k: v for k, v in asdict(self.target).items() if k not in ("kind", "scale")}
        out.update(self.perturbation.settings())
        out.update(method=self.method, seed=int(self.seed), repeats=int(self.draws),
                   dtype=self.dtype)  # fmt: skip
        return out


# -- how a head job is computed --------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How one head job is computed: the pass (:mod:`headperturb.model.passes`) and the
    recordings it starts from (``state``: the baseline's final state of every layer; ``program``:
    the exported last layer; ``cache``: every layer's keys and values; ``activations``: the
    residual stream entering the job's layer at every position). Every pass gives the numbers of
    ``naive``, full forward passes with the hook (the equivalence tests)."""

    name: str
    recordings: tuple[str, ...] = ()

    def cost(self, layer: int, n_layers: int, tokens: float, draws: int,
             own: float | None = None, shared: float = 1.0) -> tuple[float, float]:  # fmt: skip
        """What the job computes per prompt: (token-layers of full passes, final-token-layers).
        ``own``: a prompt's tokens after the demonstrations; ``shared``: the share of prompts
        whose edited demonstrations are computed anew (1: every prompt's, 0: once per job)."""
        depth = n_layers - layer
        own = tokens if own is None else own
        return {
            "naive": (draws * tokens * n_layers, 0.0),
            "last_layer": (0.0, float(draws)),
            "final_position": (0.0, float(draws * depth)),
            "from_layer": (draws * depth * tokens, 0.0),
            "shared_prefix": (draws * depth * (own + shared * (tokens - own)), 0.0),
            "unperturbed": (0.0, 0.0),
        }[self.name]


PASSES = ("naive", "last_layer", "final_position", "from_layer", "shared_prefix", "unperturbed")


def unchanged(job: HeadJob, n_layers: int) -> str | None:
    """Why ``job``'s edit cannot reach the logits, so that its numbers are the unperturbed
    model's exactly; None where it can."""
    if job.position in ("demonstrations", "review") and job.layer == n_layers - 1:
        return "at the last layer only the final position reaches the logits"
    if job.position == "demonstrations" and paired(job.kind):
        return (
            "the partner prompt shares the demonstrations, so its output there is the prompt's own"
        )
    return None


def plan(job: HeadJob, method: str, n_layers: int) -> Plan:
    """The pass of ``job`` under ``method`` in a model of ``n_layers`` layers:

    - ``naive`` (``method: naive``): the reference, full forward passes, no recordings;
    - ``last_layer``: at the last layer only the final position reaches the logits: one position
      per prompt from the final state (the exported program where there is one);
    - ``final_position`` (``positions: last`` below the last layer): the final token alone through
      the layers above, attending to the recorded keys and values;
    - ``shared_prefix`` (every other position below the last layer): the layers from
      ``job.layer`` up, from the recorded residual stream entering it; the demonstrations once
      per job (edited where the job edits them, once per group of prompts that get the same
      values there), then each prompt's own tokens on top of them.

    - ``unperturbed``: a job whose edit cannot reach the logits (:func:`unchanged`: a segment
      before the final position of the last layer; patching the demonstrations, which the
      partner shares) takes the baseline's logits, so its changes are exactly 0, not float noise
      that a permutation test could call significant; full forward passes give the same
      numbers within float precision.
    """
    if method == "naive":
        return Plan("naive")
    if unchanged(job, n_layers):
        return Plan("unperturbed", ("unperturbed",))
    if job.layer == n_layers - 1:
        return Plan("last_layer", ("state", "program"))
    if job.position == "last":
        return Plan("final_position", ("state", "cache"))
    return Plan("shared_prefix", ("activations",))


def priority(job: HeadJob, method: str, n_layers: int, repeats: int = 1) -> int:
    """The job's Snakemake priority, about its cost: the layers its pass runs over every token,
    times its draws, times 5 where every prompt runs its own demonstrations (noise and resample
    at ``all`` or ``demonstrations``: the default prompts' demonstrations are about 4x each
    prompt's own tokens); 0 for the final position and the last layer. The longest jobs then start
    first, so short ones fill the cores at the end. Recordings and checkpoints come before any job
    (:data:`RECORDING_PRIORITY`, :data:`CHECKPOINT_PRIORITY`)."""
    perturbation = build(job.kind, float(job.scale) if job.scale else None)
    own = job.position in ("review", "last") or perturbation.prefix_key(1) is not None
    draws = perturbation.draws(repeats)
    full, _final = plan(job, method, n_layers).cost(job.layer, n_layers, 5.0, draws, 1.0,
                                                    0.0 if own else 1.0)  # fmt: skip
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


# -- heads together: joint ablation curves ----------------------------------------------------

ORDERS = ("screen", "exact", "random")
"""How the heads of a curve are ranked: the screen's estimate of each head's contribution to the
correct-label logit difference (same kind and position), the run's exact single-head measurement
of the same setting, or a seeded random order (the control)."""

SET_MODES = ("remove", "keep", "single")
"""``remove``: the k highest-ranked heads perturbed together; ``keep``: every other head perturbed
(the k kept); ``single``: the k-th ranked head alone (for the interaction at small k)."""


@dataclass(frozen=True, order=True)
class SetJob:
    """A set of heads perturbed together: the ``k`` highest-ranked heads under ``order`` (with
    ``seed`` for the random order), removed or kept (``mode``), with one ``kind`` at ``position``
    of ``site``."""

    site: str
    position: str
    kind: str
    order: str
    seed: int
    mode: str
    k: int

    @property
    def order_name(self) -> str:
        return f"random{self.seed}" if self.order == "random" else self.order

    def path(self, results: str) -> str:
        return set_path(
            results, self.site, self.position, self.kind, self.order_name, self.mode, self.k
        )

    def ranking(self, results: str) -> str:
        """Where the ranking of its order lives."""
        return ranking_path(results, self.site, self.position, self.kind, self.order_name)

    @classmethod
    def from_wildcards(cls, site, position, kind, order, mode, k) -> SetJob:
        name, seed = parse_order(order)
        return cls(site, position, kind, name, seed, mode, int(k))

    def members(self, ranking: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (layer, head) pairs it perturbs, from every head ranked best first."""
        if self.mode == "remove":
            return sorted(ranking[: self.k])
        if self.mode == "keep":
            return sorted(ranking[self.k :])
        return [ranking[self.k - 1]]


def parse_order(order_name: str) -> tuple[str, int]:
    """``random2`` -> ``("random", 2)``; ``screen`` -> ``("screen", 0)``."""
    match = re.fullmatch(r"(screen|exact|random)(\d*)", order_name)
    if not match or (match.group(1) == "random") != bool(match.group(2)):
        raise SpecError(
            f"order {order_name!r} is not allowed; allowed: screen, exact, random<seed>"
        )
    return match.group(1), int(match.group(2) or 0)


def set_path(results: str, site, position, kind, order_name, mode, k) -> str:
    return f"{results}/sets/{site}/{position}/{kind}/{order_name}/{mode}/k{k}.parquet"


def doubling(n: int) -> list[int]:
    """1, 2, 4, ... below ``n``, and ``n``."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return [*out, n]


CURVE_DEFAULTS = {"positions": ["last"], "sites": ["o_proj_input"], "orders": ["screen", "random"],
                  "seeds": [1, 2, 3], "modes": ["remove", "keep"], "ks": None, "singles": 0}  # fmt: skip
"""What a curve of ``perturbation.curves`` leaves out (the config schema holds the same)."""

SET_KINDS = ("zero", "mean", "patch")
"""The kinds a set of heads can be perturbed with: the deterministic ones (noise and resample
draw values; restore runs the partner, whose own heads are not the set's)."""


def curves(perturbation: dict) -> list[dict]:
    """The config's curves with every key filled (:data:`CURVE_DEFAULTS`)."""
    return [{**CURVE_DEFAULTS, **curve} for curve in perturbation.get("curves") or []]


def set_jobs(curve_list: list[dict], n_heads_total: int, measured=frozenset()) -> list[SetJob]:
    """Every set job the curves ask for (:func:`curves`), for a model of ``n_heads_total`` heads:
    per order (and seed of the random order), kind, position and site, ``remove`` for each k of
    the grid (``ks``, default 1, 2, 4, ... and every head), ``keep`` for 0 (every head removed)
    and each k of the grid below every head, and ``single`` for the ``singles`` highest-ranked
    heads of the screen and exact orders, unless the run measures every head of that setting
    alone already (``measured``: (site, position, kind) triples). Removing none and keeping all
    is the unperturbed model."""
    jobs: set[SetJob] = set()
    for curve in curve_list:
        grid = sorted(set(curve["ks"] or doubling(n_heads_total)))
        if any(not 1 <= int(k) <= n_heads_total for k in grid):
            raise SpecError(f"curves: ks {grid} must lie in 1..{n_heads_total} (the model's heads)")
        for kind in curve["kinds"]:
            if kind not in SET_KINDS:
                raise SpecError(
                    f"curves: kind {kind!r} is not allowed; allowed: {', '.join(SET_KINDS)}"
                )
            for position, site, order in product(
                curve["positions"], curve["sites"], curve["orders"]
            ):
                if position not in ("all", "last") or site not in SITES or order not in ORDERS:
                    raise SpecError(f"curves: {position}/{site}/{order}: allowed positions all, last; "
                                    f"sites {', '.join(SITES)}; orders {', '.join(ORDERS)}")  # fmt: skip
                for seed in curve["seeds"] if order == "random" else [0]:
                    base = (site, position, kind, order, int(seed))
                    for mode in curve["modes"]:
                        ks = (
                            grid
                            if mode == "remove"
                            else [0, *[k for k in grid if k < n_heads_total]]
                        )
                        jobs.update(SetJob(*base, mode, int(k)) for k in ks)
                    if order != "random" and (site, position, kind) not in measured:
                        singles = min(int(curve["singles"]), n_heads_total)
                        jobs.update(SetJob(*base, "single", r) for r in range(1, singles + 1))
    return sorted(jobs)


def ranking_path(results: str, site, position, kind, order_name) -> str:
    return f"{results}/sets/{site}/{position}/{kind}/{order_name}/ranking.parquet"

"""Which head jobs a config asks for, and where their files go: pure helpers shared by the
Snakefile and the library.

A *head job* (:class:`HeadJob`) is one perturbed head: (site, position, kind, scale, layer,
head). Its file is ``perturb/<site>/<position>/<setting>/layer<L>/head<H>.parquet`` where the
setting is the kind, with ``_scale<S>`` for kinds that take a scale (noise). The config lists
*sweeps* (``perturbation.sweeps``), each a product of layers x heads x kinds x scales x positions
x sites; a run's jobs are their union.

At run time a job travels as one :class:`Job`: the head job, the perturbation object and the
settings that produced its numbers.

Sets of heads perturbed together are :mod:`headperturb.core.sets`; how a job is computed is
:mod:`headperturb.core.plans`.

This module imports only the standard library (and the registry of perturbation kinds, which does
too), so the Snakefile uses it while building the DAG without paying for torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from headperturb.core.kinds import PERTURBATIONS, Perturbation, build, format_scale, kinds

SITES = ("o_proj_input", "o_proj_output")
"""Where a head's output is perturbed.

``o_proj_input``: the head's own output, the input of the attention output projection
(TransformerLens ``hook_z``), a slice of width ``head_dim`` per head. The default.
``o_proj_output``: a slice of the projection's *output*, as the original study hooked it. The
projection mixes all heads, so that slice is a block of residual-stream coordinates, not a head.
"""

POSITIONS = ("all", "last", "demonstrations", "review", "label_words")
"""Which positions of a prompt are perturbed: ``all`` (the original study); ``last``, the final
position, where the label is read; ``demonstrations``, the shared k-shot prefix (the tokens of
every filled demonstration and its separator, ``prefix_len`` in ``prompt_info.json``); or
``review``, the test review's own tokens (its template words and text) up to, not including,
the final position. ``demonstrations``, ``review`` and ``last`` make up ``all``. Inside the
demonstrations: ``label_words``, their label words (the verbalizer tokens, Wang et al. 2023's
"anchors"), and each single demonstration, ``demonstration_<i>`` (:func:`demonstration_index`)."""

SEGMENTS = ("demonstrations", "review", "last")
"""The positions that partition a prompt, in prompt order."""

POSITION_PATTERN = "|".join(POSITIONS) + "|demonstration_[1-9][0-9]*"
"""Every position's name, as a regular expression (the Snakefile's wildcard constraint)."""


def demonstration_index(position: str) -> int | None:
    """``i`` of the position ``demonstration_<i>``, the ``i``-th demonstration (from 1, in prompt
    order: its template words, text, label word and separator; the first also holds the prompt's
    first token); None for any other position."""
    found = re.fullmatch(r"demonstration_([1-9][0-9]*)", position)
    return int(found.group(1)) if found else None


def check_position(position: str) -> None:
    """Raise :class:`SpecError` for a position that is none."""
    if not re.fullmatch(POSITION_PATTERN, str(position)):
        raise SpecError(
            f"position {position!r} is not allowed; allowed: {', '.join(POSITIONS)}, "
            "demonstration_<i> (the i-th demonstration, from 1)"
        )


def in_prefix(position: str) -> bool:
    """Whether ``position`` lies inside the shared demonstrations (all of them, their label words
    or one of them), which every prompt and its partner share."""
    return position == "demonstrations" or within_demonstrations(position)


def within_demonstrations(position: str) -> bool:
    """Whether ``position`` is a part of the demonstrations (their label words or one of them),
    which the tokens' places in the prefix say (:class:`headperturb.data.parts.Prefix`)."""
    return position == "label_words" or demonstration_index(position) is not None


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


POSITION_LABELS = {
    "all": "all positions",
    "last": "last position",
    "demonstrations": "demonstration positions",
    "review": "review positions",
    "label_words": "label-word positions",
}


def position_label(position: str) -> str:
    """``all`` -> ``all positions``, ``last`` -> ``last position``, ``demonstration_2`` ->
    ``demonstration 2 positions``, for logs, plots and tables."""
    i = demonstration_index(position)
    if i is not None:
        return f"demonstration {i} positions"
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
        check_position(position)
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
        where = f"{t.site} {position_label(t.position)}"
        return f"{where}, {self.perturbation.label()}, layer {t.layer} head {t.head}"

    def settings(self) -> dict:
        """The job's settings as stored with its result (columns and metadata)."""
        out = {k: v for k, v in asdict(self.target).items() if k not in ("kind", "scale")}
        out.update(self.perturbation.settings())
        out.update(
            method=self.method, seed=int(self.seed), repeats=int(self.draws), dtype=self.dtype
        )
        return out

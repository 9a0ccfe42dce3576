"""Benchmark: one last-layer perturbation job at the original study's model size.

    python benchmarks/job_scale_benchmark.py [--dtype bfloat16] [--out /tmp/headperturb-1b]

Builds a Llama with Llama-3.2-1B's shapes (16 layers, 32 query heads, 8 KV heads, d_model 2048,
vocab 128256, tied embeddings) and random weights (no download), prepares it as the workflow does,
runs the baseline step on the prompts of benchmarks/configs/job-scale.yaml (which exports the last
layer), and times that setting's one last-layer job as its own process: loading the whole model
against loading the exported layer (median of 3 each). Prints a Markdown table and writes it to
benchmarks/job_scale.md.

The setting (prompts, model dtype and device, the job's perturbation, threads) is read from
benchmarks/configs/job-scale.yaml; ``--dtype`` replaces its model.dtype.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from provenance import current_commit, setting_line

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))
SETTING = REPO / "benchmarks" / "configs" / "job-scale.yaml"
CONTEXT_LENGTH = 4096  # the prompts' length limit (the model's own is 131072)


def process_seconds(code: str) -> float:
    """Wall seconds of ``python -c code`` from the repository root."""
    import subprocess
    import time

    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"benchmark process failed:\n{result.stderr[-4000:]}")
    return time.perf_counter() - start


def job_code(results: Path, model_dir: Path, target, setting: dict, program: bool) -> str:
    """The head job ``target`` (a :class:`headperturb.core.spec.HeadJob`) as its own process,
    with the perturbation, model and threads of ``setting``, as a cluster job runs it."""
    base = results / "baseline"
    model, perturbation = setting["model"], setting["perturbation"]
    fields = (target.site, target.position, target.kind, target.scale, target.layer, target.head)
    return f"""
import sys, tempfile; sys.path.insert(0, {str(REPO / "src")!r})
from headperturb.core.spec import HeadJob, Job
from headperturb.model import headjob
from headperturb.model.context import ModelSpec, PromptFiles
target = HeadJob(*{fields!r})
job = Job(target, target.perturbation({perturbation["noise_mode"]!r}),
          method={perturbation["method"]!r}, seed={perturbation["seed"]!r},
          repeats={perturbation["repeats"]!r}, device={model["device"]!r},
          dtype={model["dtype"]!r})
inputs = headjob.JobInputs(
    PromptFiles({str(results / "prompts" / "prompts.parquet")!r},
                {str(results / "prompts" / "prompt_info.json")!r}),
    state={str(base / "final_state.safetensors")!r},
    program={str(base / "last_layer") if program else None!r})
headjob.perturb(job, inputs,
                ModelSpec({str(model_dir)!r}, {model["device"]!r}, {model["dtype"]!r},
                          {setting["threads"]["perturb"]!r}),
                tempfile.mkdtemp() + "/out.parquet")
"""


def llama_1b_shapes(dtype: str):
    """A Llama with Llama-3.2-1B's shapes and random weights (seed 0)."""
    import torch
    import transformers as tf

    config = tf.LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    )
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))


def build_model(out: Path, data: str, dtype: str) -> Path:
    """The 1B-shaped model prepared under ``out/prepared`` (built once)."""
    import pandas as pd
    import transformers as tf
    from tiny_models import train_tokenizer

    from headperturb.model import loading

    model_dir = out / "prepared"
    if not (model_dir / loading.INFO_FILE).is_file():
        texts = pd.read_parquet(Path(data) / "train.parquet")["text"].sample(400, random_state=0)
        tok_dir = train_tokenizer(list(texts), out / "tokenizer")
        model = llama_1b_shapes(dtype)
        model.save_pretrained(out / "source")
        tf.AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out / "source")
        del model
        loading.prepare_model(str(out / "source"), model_dir, dtype=dtype)
    return model_dir


def run_baseline(results: Path, model_dir: Path, data: str, setting: dict) -> None:
    """The prompts of ``setting`` and the baseline step on them (which exports the last layer)."""
    from tiny_models import model_params, run_step

    from headperturb.core import files
    from headperturb.data.imdb import load_split
    from headperturb.data.prompts import build_prompts
    from headperturb.model import loading
    from headperturb.workflow import steps

    p, model = setting["prompts"], setting["model"]
    tokenizer = loading.load_tokenizer(model_dir)
    train, test = (load_split(data, s) for s in ("train", "test"))
    built = build_prompts(
        train,
        test,
        tokenizer,
        k_shot=p["k_shot"],
        n_test=p["n_test"],
        max_review_tokens=p["max_review_tokens"],
        template=p["template"],
        verbalizers=tuple(p["verbalizers"]),
        separator=p["separator"],
        seed=p["seed"],
        context_length=CONTEXT_LENGTH,
    )
    prompts = results / "prompts"
    files.write_parquet(prompts / "prompts.parquet", built.prompts)
    files.write_json(prompts / "prompt_info.json", built.info)
    base = results / "baseline"
    outputs = {
        "per_prompt": base / "per_prompt.parquet",
        "metrics": base / "metrics.json",
        "state": base / "final_state.safetensors",
        "rms": base / "head_rms.parquet",
        "program": base / "last_layer",
    }
    inputs = {
        "prompts": str(prompts / "prompts.parquet"),
        "info": str(prompts / "prompt_info.json"),
        "model": str(model_dir),
    }
    run_step(
        steps.baseline,
        input=inputs,
        output=outputs,
        threads=setting["threads"]["model"],
        params=model_params(model["device"], model["dtype"]),
    )


def main() -> None:
    setting = yaml.safe_load(SETTING.read_text())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default=setting["model"]["dtype"])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "headperturb-1b")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "imdb"))
    args = parser.parse_args()
    setting["model"].update(path=str(args.out / "source"), dtype=args.dtype)
    setting["data"]["path"] = args.data

    import torch

    from headperturb.core import spec
    from headperturb.model import loading

    model_dir = build_model(args.out, args.data, args.dtype)
    torch.set_num_threads(setting["threads"]["model"])
    results = args.out / "results"
    run_baseline(results, model_dir, args.data, setting)
    shape = loading.read_shape(model_dir)
    (target,) = spec.head_jobs(setting["perturbation"], shape["n_layers"], shape["n_heads"])
    program = results / "baseline" / "last_layer" / "program.pt2"
    times = {
        name: statistics.median(
            process_seconds(job_code(results, model_dir, target, setting, name == "program"))
            for _ in range(3)
        )
        for name in ("model", "program")
    }
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    n_prompts, threads = setting["prompts"]["n_test"], setting["threads"]["perturb"]
    lines = [
        f"Llama-3.2-1B shapes, random weights, {args.dtype}, CPU, {threads} thread per job, "
        f"{n_prompts} prompts.",
        "",
        setting_line(current_commit(), SETTING.stem),
        "",
        "| one last-layer job as its own process | reads | wall (s, median of 3) |",
        "| --- | --- | --- |",
        f"| loads the model | {weights / 1e9:.2f} GB of weights | {times['model']:.1f} |",
        f"| loads the exported last layer | {program.stat().st_size / 1e6:.0f} MB program "
        f"| {times['program']:.1f} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    (REPO / "benchmarks" / "job_scale.md").write_text(text)


if __name__ == "__main__":
    main()

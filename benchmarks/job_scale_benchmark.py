"""Benchmark: one last-layer perturbation job at the original study's model size.

    python benchmarks/job_scale_benchmark.py [--dtype bfloat16] [--out /tmp/headperturb-1b]

Builds a Llama with Llama-3.2-1B's shapes (16 layers, 32 query heads, 8 KV heads, d_model 2048,
vocab 128256, tied embeddings) and random weights (no download), prepares it as the workflow does,
runs the baseline step on 20 short prompts (which exports the last layer), and times one
last-layer job as its own process: loading the whole model against loading the exported layer
(median of 3 each). Prints a Markdown table and writes it to benchmarks/job_scale.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))


def process_seconds(code: str) -> float:
    """Wall seconds of ``python -c code`` from the repository root."""
    import subprocess
    import time

    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"benchmark process failed:\n{result.stderr[-4000:]}")
    return time.perf_counter() - start


def job_code(results: Path, model_dir: Path, layer: int, program: bool, dtype: str) -> str:
    """A last-layer head job as its own process, one thread, as a cluster job runs it."""
    base = results / "baseline"
    return f"""
import sys, tempfile; sys.path.insert(0, {str(REPO / "src")!r})
from headperturb.core.spec import HeadJob, Job
from headperturb.model import headjob
from headperturb.model.context import ModelSpec, PromptFiles
target = HeadJob("o_proj_input", "all", "noise", "2", {layer}, 0)
inputs = headjob.JobInputs(
    PromptFiles({str(results / "prompts" / "prompts.parquet")!r},
                {str(results / "prompts" / "prompt_info.json")!r}),
    state={str(base / "final_state.safetensors")!r},
    program={str(base / "last_layer") if program else None!r})
headjob.perturb(Job(target, target.perturbation(), dtype={dtype!r}), inputs,
                ModelSpec({str(model_dir)!r}, "cpu", {dtype!r}, 1),
                tempfile.mkdtemp() + "/out.parquet")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "headperturb-1b")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "imdb"))
    args = parser.parse_args()

    import pandas as pd
    import torch
    import transformers as tf
    from tiny_models import model_params, run_step, train_tokenizer

    from headperturb.core import files
    from headperturb.data.imdb import load_split
    from headperturb.data.prompts import build_prompts
    from headperturb.model import loading
    from headperturb.workflow import steps

    out = args.out
    model_dir = out / "prepared"
    if not (model_dir / loading.INFO_FILE).is_file():
        texts = pd.read_parquet(Path(args.data) / "train.parquet")["text"].sample(
            400, random_state=0
        )
        tok_dir = train_tokenizer(list(texts), out / "tokenizer")
        config = tf.LlamaConfig(
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
            tie_word_embeddings=True, rope_theta=500000.0,
        )  # fmt: skip
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
        model.save_pretrained(out / "source")
        tf.AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out / "source")
        del model
        loading.prepare_model(str(out / "source"), model_dir, dtype=args.dtype)
    torch.set_num_threads(2)
    tokenizer = loading.load_tokenizer(model_dir)
    train, test = (load_split(args.data, s) for s in ("train", "test"))
    built = build_prompts(
        train, test, tokenizer, k_shot=4, n_test=20, max_review_tokens=80,
        template="Review: {text}\nSentiment: {label}", verbalizers=(" negative", " positive"),
        separator="\n\n", seed=0, context_length=4096,
    )  # fmt: skip
    results = out / "results"
    files.write_parquet(results / "prompts" / "prompts.parquet", built.prompts)
    files.write_json(results / "prompts" / "prompt_info.json", built.info)
    base = results / "baseline"
    outputs = {"per_prompt": base / "per_prompt.parquet", "metrics": base / "metrics.json",
               "state": base / "final_state.safetensors", "rms": base / "head_rms.parquet",
               "program": base / "last_layer"}  # fmt: skip
    inputs = {"prompts": str(results / "prompts" / "prompts.parquet"),
              "info": str(results / "prompts" / "prompt_info.json"), "model": str(model_dir)}  # fmt: skip
    run_step(steps.baseline, input=inputs, output=outputs, threads=2,
             params=model_params("cpu", args.dtype))  # fmt: skip
    program = base / "last_layer" / "program.pt2"
    times = {
        name: statistics.median(
            process_seconds(job_code(results, model_dir, 15, name == "program", args.dtype))
            for _ in range(3)
        )
        for name in ("model", "program")
    }
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    lines = [
        f"Llama-3.2-1B shapes, random weights, {args.dtype}, CPU, 1 thread per job, 20 prompts.",
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

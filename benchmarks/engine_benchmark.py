"""Benchmark: the fast engine against the naive method, side by side, on the default model.

    python benchmarks/engine_benchmark.py [--data ../shared/data/imdb] [--sample 20]

Runs from the repository root, on the default config (SmolLM2-135M-Instruct, 200 prompts, 4-shot),
and prepares the model first if it is missing (not timed). It measures:

1. baseline seconds per prompt: a full-prompt forward (naive) against the engine's cached prefix,
   on the same ``--sample`` prompts;
2. one (head, scale, draw) evaluation over all prompts at the last layer: the naive full forwards
   with the hook (measured on ``--sample`` prompts, scaled to all) against the baseline's exported
   last layer, one position per prompt, all prompts in one call (median of 5);
3. one last-layer perturbation job as its own process (what Snakemake starts per head): loading
   the model against loading the exported last layer, beside a bare ``import torch``;
4. the whole default pipeline with the model already prepared (one noise draw per head, no
   ablations: the setting the targets were set for), against its baseline stage alone (both as
   Snakemake runs, wall time);
5. adding one head to a finished run (wall time of the Snakemake run).

It prints a Markdown table and writes it to benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def snakemake(config_file: Path, *args: str, cores: int) -> float:
    """Wall seconds of one Snakemake run from the repository root."""
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--cores",
        str(cores),
        "--configfile",
        str(config_file),
        *args,
    ]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(
            f"snakemake failed: {' '.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
    return elapsed


def process_seconds(code: str) -> float:
    """Wall seconds of ``python -c code`` from the repository root."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"benchmark process failed:\n{result.stderr[-4000:]}")
    return elapsed


def job_code(results: Path, model_dir: Path, layer: int, program: bool) -> str:
    """A last-layer perturbation job as its perturb_head script runs it (1 thread)."""
    base = results / "baseline"
    settings = dict(
        prompts_path=str(results / "prompts" / "prompts.parquet"),
        info_path=str(results / "prompts" / "prompt_info.json"),
        model_dir=str(model_dir),
        out_path=str(Path(tempfile.mkdtemp()) / "out.parquet"),
        activations_path=str(base / "final_state.safetensors"),
        program_dir=str(base / "last_layer") if program else None,
        site="o_proj_input", layer=layer, head=0, scale="2", repeats=1, seed=0,
        device="cpu", dtype="float32", threads=1,
    )  # fmt: skip
    return (
        f"import sys; sys.path.insert(0, {str(REPO / 'src')!r})\n"
        "from headperturb import evaluation\n"
        f"evaluation.run_perturbation(**{settings!r})\n"
    )


def write_config(base: dict, folder: Path, name: str, **perturbation) -> Path:
    config = yaml.safe_load(yaml.safe_dump(base))
    config["perturbation"].update(perturbation)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "imdb"))
    parser.add_argument("--sample", type=int, default=20, help="prompts for the naive timings")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--repeats", type=int, default=3, help="pipeline runs to take the median of"
    )
    args = parser.parse_args()

    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    base["data"]["path"] = args.data
    # the setting the targets were written for: one noise draw per head, no ablations
    base["perturbation"].update(kinds=["noise"], repeats=1)
    tmp = Path(tempfile.mkdtemp(prefix="headperturb-bench-"))
    stamp = str(os.getpid())

    # -- pipeline timings (Snakemake runs; the model is prepared first, untimed) ---------------
    base["run_name"] = f"bench-{stamp}-a"
    heads8 = write_config(base, tmp, "heads8", heads=list(range(8)))
    snakemake(heads8, "--until", "prepare_model", cores=args.cores)
    snakemake(heads8, cores=args.cores)
    all_heads = write_config(base, tmp, "all", heads="all")
    add_one_head = snakemake(all_heads, cores=args.cores)

    # whole pipeline and baseline stage alone: fresh runs, median of --repeats each
    wholes, alones = [], []
    for repeat in range(args.repeats):
        base["run_name"] = f"bench-{stamp}-full{repeat}"
        full = write_config(base, tmp, f"full{repeat}", heads="all")
        wholes.append(snakemake(full, cores=args.cores))
        alones.append(
            snakemake(full, "--forcerun", "baseline", "--until", "baseline", cores=args.cores)
        )
    whole, baseline_alone = statistics.median(wholes), statistics.median(alones)

    # -- engine against naive, in this process --------------------------------------------------
    import numpy as np
    import pandas as pd
    import torch

    from headperturb import io, models, tail
    from headperturb.engine import Engine
    from headperturb.sites import locate_sites

    results = REPO / "results" / base["run_name"]
    model_dir = REPO / "resources" / "models" / base["model"]["name"]
    layer = io.read_json(model_dir / models.INFO_FILE)["n_layers"] - 1
    jobs = {
        name: statistics.median(process_seconds(code) for _ in range(3))
        for name, code in [
            ("model", job_code(results, model_dir, layer, program=False)),
            ("program", job_code(results, model_dir, layer, program=True)),
            ("torch", "import torch"),
        ]
    }

    torch.set_num_threads(args.cores)
    model, _, _ = models.load_prepared(model_dir, device="cpu")
    prompts = pd.read_parquet(results / "prompts" / "prompts.parquet")
    info = io.read_json(results / "prompts" / "prompt_info.json")
    engine = Engine(model, info["prefix_len"], info["verbalizer_token_ids"])
    ids = [np.asarray(x) for x in prompts["input_ids"]]
    pids = prompts["prompt_id"].tolist()
    sample = ids[: args.sample]
    program, meta = tail.load(results / "baseline" / "last_layer", "cpu")
    site = locate_sites(model)[layer]

    start = time.perf_counter()
    for x in sample:
        engine.full(x)
    naive_base = (time.perf_counter() - start) / len(sample)
    start = time.perf_counter()
    engine.baseline(sample)
    fast_base = (time.perf_counter() - start) / len(sample)

    kwargs = dict(head=0, where="o_proj_input", scale=2.0, draws=1, seed=0)
    start = time.perf_counter()
    naive_out = engine.perturbed_naive(sample, pids[: len(sample)], site=site, **kwargs)
    naive_head = (time.perf_counter() - start) / len(sample) * len(ids)
    _, state = engine.baseline(ids, record=site)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fast_out = tail.perturbed(program, state, pids, meta, **kwargs)
        times.append(time.perf_counter() - start)
    fast_head = statistics.median(times)
    agree = float(np.abs(fast_out[: len(sample)] - naive_out).max())

    rows = [
        ("baseline, seconds per prompt", f"{naive_base:.3f}", f"{fast_base:.3f}",
         f"{naive_base / fast_base:.1f}x", ">= 3x"),
        (f"one (head, scale, draw) at the last layer, all {len(ids)} prompts (s)",
         f"{naive_head:.1f} (from {len(sample)} prompts)", f"{fast_head:.4f}",
         f"{naive_head / fast_head:,.0f}x", ">= 1000x"),
        ("one last-layer job as its own process (s)", f"{jobs['model']:.1f} (loads the model)",
         f"{jobs['program']:.1f} (loads the layer)", f"{jobs['model'] / jobs['program']:.1f}x",
         f"floor: import torch {jobs['torch']:.1f} s"),
        (f"whole default pipeline, model prepared (s, median of {args.repeats})", "",
         f"{whole:.1f}", f"{whole / baseline_alone:.2f} x baseline stage ({baseline_alone:.1f} s)",
         "<= 1.5x"),
        ("adding one head to a finished run (s)", "", f"{add_one_head:.1f}", "", "< 15 s"),
    ]  # fmt: skip
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {args.cores} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, device cpu, fp32. Model: "
        f"{base['model']['name']}, {len(ids)} prompts of {prompts['n_tokens'].mean():.0f} tokens "
        f"(shared prefix {info['prefix_len']}). Largest |fast - naive| logit difference on the "
        f"sample: {agree:.2e}.",
        "",
        "| measure | naive | engine | ratio | target |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {' | '.join(row)} |" for row in rows],
    ]
    runs = ", ".join(f"{w:.1f}/{a:.1f}" for w, a in zip(wholes, alones))
    lines.append(f"\nPipeline/baseline-stage runs (s): {runs}.")
    text = "\n".join(lines) + "\n"
    print(text)
    (REPO / "benchmarks" / "results.md").write_text(text)
    for folder in (REPO / "results").glob(f"bench-{stamp}-*"):
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()

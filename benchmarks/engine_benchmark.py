"""Benchmark: the fast engine against the naive method, side by side, on the default model.

    python benchmarks/engine_benchmark.py [--data ../shared/data/imdb] [--sample 20]

Runs from the repository root, on the default config (SmolLM2-135M-Instruct, 200 prompts, 4-shot),
and prepares the model first if it is missing (not timed). It measures:

1. baseline seconds per prompt: a full-prompt forward (naive) against the engine's cached prefix,
   on the same ``--sample`` prompts;
2. one (head, scale, draw) evaluation over all prompts at the last layer: the naive full forwards
   with the hook (measured on ``--sample`` prompts, scaled to all) against the engine's one-position
   pass over all prompts (median of 5);
3. the whole default pipeline with the model already prepared (one noise draw per head, no
   ablations: the setting the targets were set for), against its baseline stage alone (both as
   Snakemake runs, wall time);
4. adding one head to a finished run (wall time of the Snakemake run).

It prints a Markdown table and writes it to benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import os
import platform
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

    base["run_name"] = f"bench-{stamp}-b"
    full = write_config(base, tmp, "full", heads="all")
    whole = snakemake(full, cores=args.cores)
    baseline_alone = snakemake(
        full, "--forcerun", "baseline", "--until", "baseline", cores=args.cores
    )

    # -- engine against naive, in this process --------------------------------------------------
    import numpy as np
    import pandas as pd
    import torch

    from headperturb import io, models
    from headperturb.engine import Engine
    from headperturb.sites import locate_sites

    torch.set_num_threads(args.cores)
    results = REPO / "results" / base["run_name"]
    model, _, _ = models.load_prepared(
        REPO / "resources" / "models" / base["model"]["name"], device="cpu"
    )
    prompts = pd.read_parquet(results / "prompts" / "prompts.parquet")
    info = io.read_json(results / "prompts" / "prompt_info.json")
    engine = Engine(model, info["prefix_len"], info["verbalizer_token_ids"])
    ids = [np.asarray(x) for x in prompts["input_ids"]]
    pids = prompts["prompt_id"].tolist()
    sample = ids[: args.sample]
    site = locate_sites(model)[-1]

    start = time.perf_counter()
    for x in sample:
        engine.full(x)
    naive_base = (time.perf_counter() - start) / len(sample)
    start = time.perf_counter()
    engine.baseline(sample)
    fast_base = (time.perf_counter() - start) / len(sample)

    kwargs = dict(site=site, head=0, where="o_proj_input", scale=2.0, draws=1, seed=0)
    start = time.perf_counter()
    naive_out = engine.perturbed_naive(sample, pids[: len(sample)], **kwargs)
    naive_head = (time.perf_counter() - start) / len(sample) * len(ids)
    _, state = engine.baseline(ids, record=site)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fast_out = engine.perturbed_last(state, pids, **kwargs)
        times.append(time.perf_counter() - start)
    fast_head = statistics.median(times)
    agree = float(np.abs(fast_out[: len(sample)] - naive_out).max())

    rows = [
        ("baseline, seconds per prompt", f"{naive_base:.3f}", f"{fast_base:.3f}",
         f"{naive_base / fast_base:.1f}x", ">= 3x"),
        (f"one (head, scale, draw) at the last layer, all {len(ids)} prompts (s)",
         f"{naive_head:.1f} (from {len(sample)} prompts)", f"{fast_head:.4f}",
         f"{naive_head / fast_head:,.0f}x", ">= 1000x"),
        ("whole default pipeline, model prepared (s)", "", f"{whole:.1f}",
         f"{whole / baseline_alone:.2f} x baseline stage ({baseline_alone:.1f} s)", "<= 1.5x"),
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
    text = "\n".join(lines) + "\n"
    print(text)
    (REPO / "benchmarks" / "results.md").write_text(text)


if __name__ == "__main__":
    main()

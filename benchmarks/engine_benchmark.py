"""Benchmark: the fast passes against the naive method, and the pipeline's costs, side by side.

    python benchmarks/engine_benchmark.py [--data ../shared/data/imdb] [--parts ...]

Runs from the repository root on the default model (SmolLM2-135M-Instruct, prepared first if
missing, untimed) and writes benchmarks/results.md. Run it in an environment with the `workflow`
extra only, as a user would (a SLURM executor plugin adds seconds to every Snakemake start).
Parts (all by default):

- ``passes``: one prompt's baseline, one (head, draw) at the last layer, at the final position of
  layer 15, and at every position of layer 15: the fast pass against the naive one, in this
  process, with the largest difference of their logits;
- ``jobs``: a head job's overhead: the marginal wall time of one more last-layer head job in a
  pipeline (its computation is a few milliseconds), with the jobs in threads of the Snakemake
  process (profiles/default) and as processes of their own (as on a cluster), beside a bare
  ``import torch``;
- ``pipeline``: the previous release's default settings (every head of the last layer, noise
  only, one draw, no calibration), the whole pipeline against its baseline stage, and adding one
  head to a finished run;
- ``sweep``: the whole model at the final position (every head of every layer, noise, 5 draws, 200
  prompts), its head jobs after the recordings;
- ``default``: the whole default run (config/config.yaml), model prepared, and how well its
  screen agreed with its exact measurements;
- ``screen``: the screen of all 270 heads, one Snakemake run of the screen alone.

Each part writes its own section of benchmarks/results.md; running some parts replaces only
their sections.

Each Snakemake timing is the median of ``--repeats`` fresh runs (``sweep`` and ``default``: of
``--long-repeats``, they take many minutes each).
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

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))
PARTS = ("passes", "jobs", "pipeline", "sweep", "default", "screen")


def snakemake(config_file: Path, *args: str, cores: int) -> float:
    """Wall seconds of one Snakemake run from the repository root."""
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), "--configfile",
           str(config_file), *args]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(
            f"snakemake failed: {' '.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
    return elapsed


def write_config(
    base: dict, folder: Path, name: str, run: str | None = None, **perturbation
) -> Path:
    """``base`` with ``perturbation`` keys changed, as ``folder/name.yaml`` for the run ``run``
    (default: ``name``)."""
    config = yaml.safe_load(yaml.safe_dump(base))
    config["run_name"] = run or name
    config["perturbation"].update(perturbation)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def previous_release(base: dict) -> dict:
    """The previous release's default run, the setting the pipeline targets were written for."""
    config = yaml.safe_load(yaml.safe_dump(base))
    config["prompts"].update(candidates=1, n_dev=0)
    config["scoring"] = {"calibration": "none"}
    config["screen"] = {"enabled": False}
    config["perturbation"].update(layers=[-1], heads="all", kinds=["noise"], positions=["all"],
                                  repeats=1)  # fmt: skip
    config["perturbation"].pop("sweeps", None)
    return config


def reset(results: Path) -> None:
    """Remove a run's head jobs and what follows them; its prompts and baseline stay."""
    for name in ("perturb", "contributions.parquet", "contributions.csv", "plots", "summary.md"):
        path = results / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def timed(func, repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def passes_part(results: Path, model_dir: Path, sample: int) -> list[tuple]:
    """The fast passes against the naive one on the same prompts (this process, all cores)."""
    import numpy as np
    import torch
    from tiny_models import edit_of

    from headperturb.core import files
    from headperturb.model import loading, passes, tail
    from headperturb.model.engine import Engine
    from headperturb.model.sites import locate_sites

    model, _, _ = loading.load_prepared(model_dir, device="cpu")
    prompts = files.read_parquet(results / "prompts/prompts.parquet")
    info = files.read_json(results / "prompts/prompt_info.json")
    engine = Engine(model, info["prefix_len"], info["verbalizer_token_ids"])
    ids = [np.asarray(x) for x in prompts["input_ids"]][:sample]
    pids = prompts["prompt_id"].tolist()[:sample]
    sites = locate_sites(model)
    rows, diffs = [], []
    naive_base = timed(lambda: [passes.full(engine, x) for x in ids]) / len(ids)
    fast_base = timed(lambda: engine.score(ids)) / len(ids)
    rows.append(("baseline, seconds per prompt", naive_base, fast_base, ">= 3x"))
    recorded = engine.baseline(ids, sites)
    kv = engine.capture_cache(ids)
    program, meta = tail.load(results / "baseline/last_layer", "cpu")
    last = sites[-1]
    cases = [
        ("last layer", edit_of(model, last, 0, scale=2.0, repeats=1, seed=0),
         lambda e: tail.perturbed(program, tail.layer_state(recorded.final_state, last.layer), pids, meta, e)),
        ("final position of layer 15", edit_of(model, sites[15], 0, scale=2.0, repeats=1, seed=0, position="last"),
         lambda e: passes.final_position(engine, recorded.final_state, kv, pids, e)),
    ]  # fmt: skip
    captured = engine.capture_layer_inputs(ids, sites[15])
    cases.append(("every position of layer 15", edit_of(model, sites[15], 0, scale=2.0, repeats=1, seed=0),
                  lambda e: passes.from_layer(engine, captured, ids, pids, e)))  # fmt: skip
    for name, edit, fast in cases:
        naive_out = passes.naive(engine, ids, pids, edit)
        fast_out = fast(edit)
        diffs.append(float(np.abs(fast_out - naive_out).max()))
        naive_t = timed(lambda edit=edit: passes.naive(engine, ids, pids, edit))
        fast_t = timed(lambda fast=fast, edit=edit: fast(edit), 3)
        rows.append(
            (f"one (head, draw) at the {name}, {len(ids)} prompts (s)", naive_t, fast_t, "")
        )
    del torch
    return rows, max(diffs)


def agreement_lines(screen: Path) -> list[str]:
    """The screen's agreement with the exact measurements of a finished run, as a table."""
    import pandas as pd

    table = pd.read_csv(screen / "agreement.csv")
    lines = ["The screen against the exact measurements of the same run (correct-label logit "
             "difference; layer `all` = every layer):", "",
             "| kind | positions | layer | heads | Spearman | Pearson | signs agree | largest miss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    lines += [f"| {r.kind} | {r.position} | {r.layer} | {r.heads} | {r.spearman:.3f} | "
              f"{r.pearson:.3f} | {100 * r.sign_agreement:.0f}% | {r.largest_miss:.4f} |"
              for r in table.itertuples()]  # fmt: skip
    return [*lines, ""]


def screen_part(base: dict, tmp: Path, run: str, cores: int) -> list[str]:
    """The screen of every head of every layer, one Snakemake run of the screen alone (the run
    ``run`` has its prompts and baseline). The exact all-position sweep it replaces is priced
    in the README from the head jobs' own logs (each logs its pass's elapsed time)."""
    config = previous_release(base)
    config["screen"] = base["screen"]
    path = write_config(config, tmp, f"{run}-screen", run)
    snakemake(path, "--until", "baseline", cores=cores)  # nothing to do, unless settings moved
    screen = snakemake(path, "--forcerun", "screen", "--until", "screen", cores=cores)
    return [
        "| every head of every layer, 200 prompts | wall | target |",
        "| --- | --- | --- |",
        f"| the screen: one forward and one backward pass per prompt (one Snakemake run, "
        f"{cores} threads) | {screen:.0f} s ({screen / 60:.1f} min) | <= 6 min |",
        "",
    ]


def write_results(path: Path, head: str, sections: dict[str, list[str]]) -> str:
    """Replace the sections of ``path`` that this run measured, keep the others."""
    old: dict[str, str] = {}
    if path.exists():
        for chunk in path.read_text().split("\n## ")[1:]:
            name, _, body = chunk.partition("\n")
            old[name.strip()] = body.strip()
    new = {name: "\n".join(lines).strip() for name, lines in sections.items()}
    merged = {**old, **new}
    text = "\n\n".join(
        [head, *(f"## {name}\n\n{merged[name]}" for name in PARTS if name in merged)]
    )
    path.write_text(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "imdb"))
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--sample", type=int, default=20, help="prompts for the pass timings")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-repeats", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the runs' results folders")
    args = parser.parse_args()
    parts = args.parts.split(",")

    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    base["data"]["path"] = args.data
    tmp = Path(tempfile.mkdtemp(prefix="headperturb-bench-"))
    stamp = str(os.getpid())
    sections: dict[str, list[str]] = {}
    old = previous_release(base)
    prep = write_config(old, tmp, f"bench-{stamp}-prep")
    snakemake(prep, "--until", "baseline", cores=args.cores)  # model, prompts, baseline: untimed
    results = REPO / "results" / f"bench-{stamp}-prep"
    model_dir = REPO / "resources" / "models" / base["model"]["name"]

    head = (f"Machine: {platform.processor() or platform.machine()}, {args.cores} cores, torch "
            f"{torch.__version__}, CPU, fp32; SmolLM2-135M-Instruct, 200 prompts of about 440 "
            f"tokens.")  # fmt: skip
    try:
        if "passes" in parts:
            lines = sections["passes"] = []
            torch.set_num_threads(args.cores)
            rows, agree = passes_part(results, model_dir, args.sample)
            lines += ["| pass | naive | fast | ratio | target |", "| --- | --- | --- | --- | --- |"]
            lines += [f"| {n} | {a:.3f} | {b:.4f} | {a / b:,.1f}x | {t} |" for n, a, b, t in rows]
            lines += [
                "",
                f"Largest |fast - naive| logit difference on the sample: {agree:.2e}.",
                "",
            ]

        if "jobs" in parts:
            lines = sections["jobs"] = []
            rows = []
            run = f"bench-{stamp}-prep"  # its prompts and baseline are done: only the jobs run
            for name, profile in (("threads of the Snakemake process (default)", []),
                                  ("processes of their own (as on a cluster)", ["--workflow-profile", "none"])):  # fmt: skip
                marginal = []
                for _repeat in range(args.repeats):
                    times = {}
                    for heads in (1, 9):
                        reset(REPO / "results" / run)
                        config = write_config(
                            old, tmp, f"{run}-{heads}", run, heads=list(range(heads))
                        )
                        times[heads] = snakemake(config, *profile, cores=args.cores)
                    marginal.append((times[9] - times[1]) / 8)
                rows.append((name, statistics.median(marginal), marginal))
            torch_t = statistics.median(
                timed(lambda: subprocess.run([sys.executable, "-c", "import torch"], check=True))
                for _ in range(3))  # fmt: skip
            lines += ["| one more last-layer head job, wall (s, median of runs) | seconds | runs | target |",
                      "| --- | --- | --- | --- |"]  # fmt: skip
            lines += [f"| {n} | {m:.2f} | {', '.join(f'{x:.2f}' for x in ms)} | {'<= 0.3' if 'default' in n else ''} |"
                      for n, m, ms in rows]  # fmt: skip
            lines += [f"| a bare `import torch` in a new process | {torch_t:.2f} | | |", ""]

        if "pipeline" in parts:
            lines = sections["pipeline"] = []
            wholes, alones, adds = [], [], []
            for repeat in range(args.repeats):
                full = write_config(old, tmp, f"bench-{stamp}-full{repeat}")
                wholes.append(snakemake(full, cores=args.cores))
                alones.append(
                    snakemake(
                        full, "--forcerun", "baseline", "--until", "baseline", cores=args.cores
                    )
                )
                run = f"bench-{stamp}-prep"  # a finished run of 8 heads, then the ninth
                reset(REPO / "results" / run)
                snakemake(
                    write_config(old, tmp, f"{run}-8", run, heads=list(range(8))), cores=args.cores
                )
                adds.append(
                    snakemake(
                        write_config(old, tmp, f"{run}-9", run, heads="all"), cores=args.cores
                    )
                )
            whole, alone, add = (statistics.median(x) for x in (wholes, alones, adds))
            ratio = statistics.median(w / a for w, a in zip(wholes, alones))  # each run's own
            lines += [
                "| previous release's default settings | seconds | ratio (median of the runs' ratios) | target |",
                "| --- | --- | --- | --- |",
                f"| whole pipeline, model prepared (median of {args.repeats}) | {whole:.1f} | "
                f"{ratio:.2f} x its baseline stage (median {alone:.1f} s) | <= 1.25x |",
                f"| adding one head to a finished run (median of {args.repeats}) | {add:.1f} | | <= 8 s |",
                "",
                "Runs (whole / baseline stage = ratio / adding a head, s): "
                + "; ".join(
                    f"{w:.1f} / {a:.1f} = {w / a:.3f}x / {d:.1f}"
                    for w, a, d in zip(wholes, alones, adds)
                ),
                "",
            ]

        if "sweep" in parts:
            lines = sections["sweep"] = []
            sweeps = []
            for repeat in range(args.long_repeats):
                config = yaml.safe_load(yaml.safe_dump(old))
                config["perturbation"].update(layers="all", positions=["last"], repeats=5)
                path = write_config(config, tmp, f"bench-{stamp}-sweep{repeat}")
                snakemake(path, "--until", "capture_cache", "baseline", cores=args.cores)
                sweeps.append(snakemake(path, cores=args.cores))
            lines += [f"| whole model at the final position: 270 heads x 200 prompts x 5 noise draws | "
                      f"{statistics.median(sweeps) / 60:.1f} min (after the recordings) | <= 15 min |", ""]  # fmt: skip

        if "default" in parts:
            lines = sections["default"] = []
            runs = []
            for repeat in range(args.long_repeats):
                path = write_config(base, tmp, f"bench-{stamp}-default{repeat}")
                runs.append(snakemake(path, cores=args.cores))
            lines += [f"| the whole default run (config/config.yaml), model prepared | "
                      f"{statistics.median(runs) / 60:.1f} min | <= 20 min |", ""]  # fmt: skip
            lines += agreement_lines(REPO / "results" / f"bench-{stamp}-default0" / "screen")

        if "screen" in parts:
            sections["screen"] = screen_part(base, tmp, f"bench-{stamp}-prep", args.cores)
    finally:  # what was measured is written even when a later part fails
        print(write_results(REPO / "benchmarks" / "results.md", head, sections))
        for folder in (REPO / "results").glob(f"bench-{stamp}-*"):
            if not args.keep:
                shutil.rmtree(folder)


if __name__ == "__main__":
    main()

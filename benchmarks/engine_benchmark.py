"""Benchmark: the fast passes against the naive method, and the pipeline's costs, side by side.

    python benchmarks/engine_benchmark.py [--data ../shared/data/imdb] [--parts ...]

Runs from the repository root on SmolLM2-135M-Instruct (prepared first if missing, untimed) and
writes benchmarks/results.md. Run it in an environment with the `workflow` extra only, as a user
would (a SLURM executor plugin adds seconds to every Snakemake start).

Each part runs on a setting of its own, an explicit, complete config file in benchmarks/configs/
(:data:`SETTINGS`), never on config/config.yaml: the default may move, the settings these
figures were measured with do not. The script replaces only run_name, data.path (``--data``)
and, where said, perturbation.heads. Parts (all by default):

- ``passes`` (previous-release.yaml, its prompts): one prompt's baseline, one (head, draw) at the
  last layer, at the final position of layer 15, and at every position of layer 15: the fast
  pass against the naive one, in this process, with the largest difference of their logits;
- ``jobs`` (previous-release.yaml with 1 and with 9 heads): a head job's overhead: the marginal
  wall time of one more last-layer head job in a pipeline (its computation is a few
  milliseconds), with the jobs in threads of the Snakemake process (profiles/default) and as
  processes of their own (as on a cluster), beside a bare ``import torch``;
- ``pipeline`` (previous-release.yaml: every head of the last layer, noise only, one draw, no
  calibration): the whole pipeline against its baseline stage, and adding one head to a finished
  run (8 heads, then all 9);
- ``sweep`` (sweep.yaml): the whole model at the final position (every head of every layer,
  noise, 5 draws, 200 prompts), its head jobs after the recordings;
- ``default`` (default-run.yaml: the default run as of commit 019136c), model prepared, and how
  well its screen agreed with its exact measurements;
- ``screen`` (screen.yaml): the screen of all 270 heads, one Snakemake run of the screen alone.

Each part writes its own section of benchmarks/results.md, headed by the commit measured and the
setting's file; running some parts replaces only their sections.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from provenance import current_commit, setting_line

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))
CONFIGS = REPO / "benchmarks" / "configs"
PARTS = ("passes", "jobs", "pipeline", "sweep", "default", "screen")
SETTINGS = {
    "passes": "previous-release",
    "jobs": "previous-release",
    "pipeline": "previous-release",
    "sweep": "sweep",
    "default": "default-run",
    "screen": "screen",
}
"""Each part's setting: ``benchmarks/configs/<name>.yaml``."""

PROFILES = (
    ("threads of the Snakemake process (default)", []),
    ("processes of their own (as on a cluster)", ["--workflow-profile", "none"]),
)
"""How the ``jobs`` part runs the head jobs: a row name and Snakemake's extra arguments."""


@dataclass(frozen=True)
class Bench:
    """What every part needs: where configs go, the runs' prefix, the data, cores and repeats."""

    tmp: Path
    stamp: str
    data: str
    cores: int
    repeats: int
    long_repeats: int

    @property
    def prep(self) -> str:
        """The run of the previous release's setting whose prompts and baseline the parts reuse."""
        return f"bench-{self.stamp}-prep"

    def setting(self, part: str) -> dict:
        """The setting of ``part`` (:data:`SETTINGS`), with this benchmark's data."""
        return setting(SETTINGS[part], self.data)

    def run(self, config_file: Path, *args: str) -> float:
        return snakemake(config_file, *args, cores=self.cores)


def snakemake(config_file: Path, *args: str, cores: int) -> float:
    """Wall seconds of one Snakemake run from the repository root."""
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores)]
    cmd += ["--configfile", str(config_file), *args]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(
            f"snakemake failed: {' '.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
    return elapsed


def setting(name: str, data: str) -> dict:
    """The config of ``benchmarks/configs/<name>.yaml`` with ``data.path`` set to ``data``."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    config["data"]["path"] = data
    return config


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


def provenance(part: str, commit: str) -> list[str]:
    """The line heading a part's section: the commit measured and the setting's file."""
    return [setting_line(commit, SETTINGS[part]), ""]


def table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """A Markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


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


def passes_part(results: Path, model_dir: Path, sample: int) -> tuple[list[tuple], float]:
    """The fast passes against the naive one on the same prompts (this process, all cores)."""
    import numpy as np
    from reference import from_layer  # the whole prompt from the layer (before 0.3.0)
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
    last, middle = sites[-1], sites[15]

    def edit(site, position="all"):
        return edit_of(model, site, 0, scale=2.0, repeats=1, seed=0, position=position)

    def last_layer(e):
        state = tail.layer_state(recorded.final_state, last.layer)
        return tail.perturbed(program, state, pids, meta, e)

    def final_position(e):
        return passes.final_position(engine, recorded.final_state, kv, pids, e)

    cases = [
        ("last layer", edit(last), last_layer),
        ("final position of layer 15", edit(middle, "last"), final_position),
    ]
    captured = engine.capture_layer_inputs(ids, middle)

    def every_position(e):
        return from_layer(engine, captured, ids, pids, e)

    cases.append(("every position of layer 15", edit(middle), every_position))
    for name, case_edit, fast in cases:
        naive_out = passes.naive(engine, ids, pids, case_edit)
        fast_out = fast(case_edit)
        diffs.append(float(np.abs(fast_out - naive_out).max()))
        naive_t = timed(lambda e=case_edit: passes.naive(engine, ids, pids, e))
        fast_t = timed(lambda fast=fast, e=case_edit: fast(e), 3)
        rows.append(
            (f"one (head, draw) at the {name}, {len(ids)} prompts (s)", naive_t, fast_t, "")
        )
    return rows, max(diffs)


def passes_lines(results: Path, model_dir: Path, sample: int) -> list[str]:
    rows, agree = passes_part(results, model_dir, sample)
    body = [(n, f"{a:.3f}", f"{b:.4f}", f"{a / b:,.1f}x", t) for n, a, b, t in rows]
    lines = table(("pass", "naive", "fast", "ratio", "target"), body)
    return [*lines, "", f"Largest |fast - naive| logit difference on the sample: {agree:.2e}.", ""]


def jobs_lines(bench: Bench) -> list[str]:
    """One more last-layer head job's wall time, in threads and as processes of their own."""
    base, run, rows = bench.setting("jobs"), bench.prep, []
    for name, profile in PROFILES:
        marginal = []
        for _repeat in range(bench.repeats):
            times = {}
            for heads in (1, 9):
                reset(REPO / "results" / run)
                config = write_config(
                    base, bench.tmp, f"{run}-{heads}", run, heads=list(range(heads))
                )
                times[heads] = bench.run(config, *profile)
            marginal.append((times[9] - times[1]) / 8)
        rows.append((name, statistics.median(marginal), marginal))
    import_torch = [sys.executable, "-c", "import torch"]
    torch_t = statistics.median(
        timed(lambda: subprocess.run(import_torch, check=True)) for _ in range(3)
    )
    header = ("one more last-layer head job, wall (s, median of runs)", "seconds", "runs", "target")
    body = [
        (name, f"{m:.2f}", ", ".join(f"{x:.2f}" for x in ms), "<= 0.3" if "default" in name else "")
        for name, m, ms in rows
    ]
    body.append(("a bare `import torch` in a new process", f"{torch_t:.2f}", "", ""))
    return [*table(header, body), ""]


def pipeline_lines(bench: Bench) -> list[str]:
    """The whole pipeline against its baseline stage, and adding one head to a finished run."""
    base, run = bench.setting("pipeline"), bench.prep
    wholes, alones, adds = [], [], []
    for repeat in range(bench.repeats):
        full = write_config(base, bench.tmp, f"bench-{bench.stamp}-full{repeat}")
        wholes.append(bench.run(full))
        alones.append(bench.run(full, "--forcerun", "baseline", "--until", "baseline"))
        reset(REPO / "results" / run)  # a finished run of 8 heads, then the ninth
        bench.run(write_config(base, bench.tmp, f"{run}-8", run, heads=list(range(8))))
        adds.append(bench.run(write_config(base, bench.tmp, f"{run}-9", run, heads="all")))
    whole, alone, add = (statistics.median(x) for x in (wholes, alones, adds))
    ratio = statistics.median(w / a for w, a in zip(wholes, alones))  # each run's own
    header = (
        "previous release's default settings",
        "seconds",
        "ratio (median of the runs' ratios)",
        "target",
    )
    n = bench.repeats
    body = [
        (
            f"whole pipeline, model prepared (median of {n})",
            f"{whole:.1f}",
            f"{ratio:.2f} x its baseline stage (median {alone:.1f} s)",
            "<= 1.25x",
        ),
        (f"adding one head to a finished run (median of {n})", f"{add:.1f}", "", "<= 8 s"),
    ]
    runs = "; ".join(
        f"{w:.1f} / {a:.1f} = {w / a:.3f}x / {d:.1f}" for w, a, d in zip(wholes, alones, adds)
    )
    return [
        *table(header, body),
        "",
        f"Runs (whole / baseline stage = ratio / adding a head, s): {runs}",
        "",
    ]


def sweep_lines(bench: Bench) -> list[str]:
    """The whole model at the final position, its head jobs after the recordings."""
    sweeps = []
    for repeat in range(bench.long_repeats):
        path = write_config(bench.setting("sweep"), bench.tmp, f"bench-{bench.stamp}-sweep{repeat}")
        bench.run(path, "--until", "capture_cache", "baseline")
        sweeps.append(bench.run(path))
    minutes = statistics.median(sweeps) / 60
    what = "whole model at the final position: 270 heads x 200 prompts x 5 noise draws"
    return [f"| {what} | {minutes:.1f} min (after the recordings) | <= 15 min |", ""]


def default_lines(bench: Bench) -> list[str]:
    """The whole default run of default-run.yaml, and its screen's agreement."""
    runs = []
    for repeat in range(bench.long_repeats):
        path = write_config(
            bench.setting("default"), bench.tmp, f"bench-{bench.stamp}-default{repeat}"
        )
        runs.append(bench.run(path))
    minutes = statistics.median(runs) / 60
    what = (
        "the whole default run as of 019136c (benchmarks/configs/default-run.yaml), model prepared"
    )
    lines = [f"| {what} | {minutes:.1f} min | <= 20 min |", ""]
    return lines + agreement_lines(REPO / "results" / f"bench-{bench.stamp}-default0" / "screen")


def agreement_lines(screen: Path) -> list[str]:
    """The screen's agreement with the exact measurements of a finished run, as a table."""
    import pandas as pd

    frame = pd.read_csv(screen / "agreement.csv")
    header = (
        "kind",
        "positions",
        "layer",
        "heads",
        "Spearman",
        "Pearson",
        "signs agree",
        "largest miss",
    )
    body = [agreement_row(r) for r in frame.itertuples()]
    intro = (
        "The screen against the exact measurements of the same run (correct-label logit "
        "difference; layer `all` = every layer):"
    )
    return [intro, "", *table(header, body), ""]


def agreement_row(r) -> tuple:
    """One row of ``agreement.csv`` as the table shows it."""
    signs = f"{100 * r.sign_agreement:.0f}%"
    scores = (f"{r.spearman:.3f}", f"{r.pearson:.3f}", signs, f"{r.largest_miss:.4f}")
    return (r.kind, r.position, r.layer, r.heads, *scores)


def screen_lines(bench: Bench) -> list[str]:
    """The screen of every head of every layer, one Snakemake run of the screen alone (in the
    run :attr:`Bench.prep`, which has its prompts and baseline). The exact all-position sweep
    it replaces is priced in docs/benchmark.md from benchmarks/segments_benchmark.py."""
    run = bench.prep
    path = write_config(bench.setting("screen"), bench.tmp, f"{run}-screen", run)
    bench.run(path, "--until", "baseline")  # nothing to do, unless settings moved
    screen = bench.run(path, "--forcerun", "screen", "--until", "screen")
    what = (
        "the screen: one forward and one backward pass per prompt (one Snakemake run, "
        f"{bench.cores} threads)"
    )
    header = ("every head of every layer, 200 prompts", "wall", "target")
    return [*table(header, [(what, f"{screen:.0f} s ({screen / 60:.1f} min)", "<= 6 min")]), ""]


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


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "imdb"))
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--sample", type=int, default=20, help="prompts for the pass timings")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-repeats", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the runs' results folders")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    parts = args.parts.split(",")
    bench = Bench(
        tmp=Path(tempfile.mkdtemp(prefix="headperturb-bench-")),
        stamp=str(os.getpid()),
        data=args.data,
        cores=args.cores,
        repeats=args.repeats,
        long_repeats=args.long_repeats,
    )
    commit = current_commit()
    sections: dict[str, list[str]] = {}
    old = bench.setting("pipeline")
    prep = write_config(old, bench.tmp, bench.prep)
    bench.run(prep, "--until", "baseline")  # model, prompts, baseline: untimed
    results = REPO / "results" / bench.prep
    model_dir = REPO / "resources" / "models" / old["model"]["name"]

    head = (
        f"Machine: {platform.processor() or platform.machine()}, {args.cores} cores, torch "
        f"{torch.__version__}, CPU, fp32; SmolLM2-135M-Instruct, 200 prompts of about 440 "
        "tokens."
    )
    measure = {
        "passes": lambda: passes_lines(results, model_dir, args.sample),
        "jobs": lambda: jobs_lines(bench),
        "pipeline": lambda: pipeline_lines(bench),
        "sweep": lambda: sweep_lines(bench),
        "default": lambda: default_lines(bench),
        "screen": lambda: screen_lines(bench),
    }
    try:
        for part in (p for p in PARTS if p in parts):
            if part == "passes":
                torch.set_num_threads(args.cores)
            sections[part] = provenance(part, commit) + measure[part]()
    finally:  # what was measured is written even when a later part fails
        print(write_results(REPO / "benchmarks" / "results.md", head, sections))
        for folder in (REPO / "results").glob(f"bench-{bench.stamp}-*"):
            if not args.keep:
                shutil.rmtree(folder)


if __name__ == "__main__":
    main()

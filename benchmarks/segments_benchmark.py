"""Benchmark: a head job at every position, at the demonstrations and at the review, by the pass
that computes the demonstrations once per job (``shared_prefix``: the rows of a group four per
call, the last layer's MLP only at the read positions) against the same pass one prompt per call
with the whole last layer (release 0.3.0), the pass over each whole prompt from the layer
(``from_layer``, the path before 0.3.0) and full forward passes (``naive``), side by side on the
same prompts, one torch thread (as head jobs run).

    python benchmarks/segments_benchmark.py [--results results/bench-default] [--sample 40]

Needs the prompts of a run of benchmarks/configs/default-run.yaml (the default run as of commit
019136c, whose prompts the figures in benchmarks/segments.md were measured on) and its model
prepared in resources/models/:

    snakemake --cores all --configfile benchmarks/configs/default-run.yaml --until build_prompts

``--results`` and ``--model`` default to that run's folder and that config's model. For each
layer of ``--layers``, zero ablation of head 0: seconds per prompt of each pass (median of
``--repeats``) and their largest difference from the naive logits. The all-position sweep of
every head is priced from these per-layer times over every layer (``--all-layers``: measure
every layer instead of interpolating), with the layer recordings it needs. Writes
benchmarks/segments.md.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from provenance import current_commit, setting_line

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))  # the whole-prompt pass, now the tests' reference
SETTING = REPO / "benchmarks" / "configs" / "default-run.yaml"
"""The run whose prompts the benchmark times its passes on."""


@dataclass(frozen=True)
class Row:
    """One layer's seconds of a job over all the run's prompts, by pass; the largest logit
    difference from naive; the seconds of recording the layer's input."""

    layer: int
    naive: float  # full forward passes
    whole: float  # every position, each whole prompt from the layer (before 0.3.0)
    one: float  # every position, demonstrations once, one prompt per call (0.3.0)
    now: float  # every position, demonstrations once, four prompts per call
    demonstrations: float  # the demonstrations only, now
    review: float  # the review only, now
    diff: float
    recording: float

    def markdown(self) -> str:
        gains = f"{self.whole / self.now:.1f}x before, {self.one / self.now:.2f}x 0.3.0"
        now = f"{self.now:.1f} ({gains})"
        review = f"{self.review:.1f} ({self.review / self.whole:.2f})"
        cells = (
            *(self.layer, f"{self.naive:.0f}", f"{self.whole:.1f}", f"{self.one:.1f}", now),
            *(f"{self.demonstrations:.1f}", review, f"{self.diff:.1e}", f"{self.recording:.1f}"),
        )
        return "| " + " | ".join(str(c) for c in cells) + " |"


def timed(func, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = func()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


@contextlib.contextmanager
def whole_last_layer(passes):
    """While active, the shared-prefix pass runs the whole last layer (as release 0.3.0 did)."""
    original = passes.last_mlp_at
    passes.last_mlp_at = lambda *_a, **_k: contextlib.nullcontext()
    try:
        yield
    finally:
        passes.last_mlp_at = original


def main() -> None:
    import torch
    from reference import from_layer

    from headperturb.core import files
    from headperturb.core.kinds import build
    from headperturb.core.plans import recording_source
    from headperturb.data.parts import Prefix
    from headperturb.model import loading, passes
    from headperturb.model.engine import Engine
    from headperturb.model.hooks import Edit, site_slice
    from headperturb.model.sites import locate_sites

    setting = yaml.safe_load(SETTING.read_text())
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", default=str(REPO / "results" / setting["run_name"]))
    parser.add_argument(
        "--model", default=str(REPO / "resources" / "models" / setting["model"]["name"])
    )
    parser.add_argument("--sample", type=int, default=40, help="prompts timed per pass")
    parser.add_argument("--naive-sample", type=int, default=8, help="prompts of the naive pass")
    parser.add_argument("--layers", default="0,8,15,22,28")
    parser.add_argument("--all-layers", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks/segments.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = Path(args.results)
    model, _, _ = loading.load_prepared(args.model, device="cpu")
    prompts = files.read_parquet(results / "prompts/prompts.parquet")
    info = files.read_json(results / "prompts/prompt_info.json")
    engine = Engine(model, info["prefix_len"], info["verbalizer_token_ids"])
    every = [np.asarray(x) for x in prompts["input_ids"]]
    ids, pids = every[: args.sample], prompts["prompt_id"].tolist()[: args.sample]
    sites = locate_sites(model)
    n_layers = len(sites)
    layers = (
        list(range(n_layers - 1)) if args.all_layers else [int(x) for x in args.layers.split(",")]
    )
    zero = build("zero")
    mean_tokens = float(np.mean([len(x) for x in every]))
    own_tokens = mean_tokens - engine.prefix_len
    rows, per_layer, recording = [], {}, {}
    n_total = len(every)
    keys = {"all": 0, "demonstrations": 0, "review": "clean"}  # zero ablation's groups
    n, few = len(ids), 4
    for layer in layers:
        site = sites[layer]
        captured = engine.capture_layer_inputs(ids, site)
        cols = site_slice(model, site, 0, "o_proj_input")
        values = zero.values(seed=0, layer=layer, head=0, width=cols.stop - cols.start, repeats=1)

        def edit(position, site=site, values=values):
            prefix = Prefix(engine.prefix_len)
            return Edit(site, 0, "o_proj_input", values, zero.apply, 1, position, prefix)

        naive_ids = ids[: args.naive_sample]
        t_naive, out_naive = timed(
            lambda x=naive_ids: passes.naive(engine, x, pids, edit("all")), 1
        )
        t_whole, out_whole = timed(
            lambda c=captured: from_layer(engine, c, ids, pids, edit("all")), args.repeats
        )

        def job(position, batch_size=4, c=captured, edit=edit):
            """A job of all the run's prompts, priced from passes over ``few`` and ``n`` prompts:
            the demonstrations' pass once per job, then each prompt's own tokens."""

            def run(m):
                groups = [keys[position]] * m
                return lambda: passes.shared_prefix(
                    engine, c, ids[:m], pids[:m], edit(position), groups, batch_size=batch_size
                )

            t_few, _ = timed(run(few), args.repeats)
            t_n, out = timed(run(n), args.repeats)
            per_prompt = (t_n - t_few) / (n - few)
            return t_few - few * per_prompt + n_total * per_prompt, out

        shared = {position: job(position) for position in keys}
        with whole_last_layer(passes):  # release 0.3.0: one prompt per call, whole last layer
            t_one, out_one = job("all", batch_size=1)
        outs = (out_whole, out_one, shared["all"][1])
        diff = max(float(np.abs(out[: len(naive_ids)] - out_naive).max()) for out in outs)
        per_layer[layer] = (shared["all"][0], t_one, t_whole / n * n_total)
        start = time.perf_counter()
        engine.capture_layer_inputs(every, site)
        recording[layer] = time.perf_counter() - start
        rows.append(
            Row(
                layer=layer,
                naive=t_naive / len(naive_ids) * n_total,
                whole=t_whole / n * n_total,
                one=t_one,
                now=shared["all"][0],
                demonstrations=shared["demonstrations"][0],
                review=shared["review"][0],
                diff=diff,
                recording=recording[layer],
            )
        )
        print(rows[-1], flush=True)
    known = sorted(per_layer)

    def sweep(column: int) -> float:
        """Seconds of one thread for every head below the last layer (the last layer's jobs take
        the last-layer program: seconds in all), interpolated between the layers measured."""
        seconds = [per_layer[k][column] for k in known]
        per_head = (float(np.interp(layer, known, seconds)) for layer in range(n_layers - 1))
        return sites[0].n_heads * sum(per_head)

    # Each recording timed from the embeddings (layer L: a + b L seconds); a run's recordings
    # start from a lower one (plans.recording_source), so layer L costs a + b (L - its source).
    slope, fixed = np.polyfit(known, [recording[k] for k in known], 1)
    sources = [recording_source(layer, n_layers) or 0 for layer in range(n_layers - 1)]
    alone = sum(fixed + slope * layer for layer in range(n_layers - 1))
    records = sum(fixed + slope * (layer - src) for layer, src in enumerate(sources))
    now, one, before = sweep(0), sweep(1), sweep(2)
    share = own_tokens / mean_tokens
    lines = [
        "# A head job at every position, at the demonstrations and at the review",
        "",
        f"SmolLM2-135M-Instruct, fp32, one torch thread, zero ablation of head 0; prompts of the "
        f"run `{results.name}`: {mean_tokens:.0f} tokens on average, {engine.prefix_len} of them "
        f"the demonstrations ({own_tokens:.0f} each prompt's own, a share of {share:.2f}). Seconds "
        f"of one job over all {n_total} prompts: the shared-prefix passes priced from passes over "
        f"4 and {len(ids)} prompts (the demonstrations once, then each prompt; medians of "
        f"{args.repeats}), the whole-prompt pass from {len(ids)} prompts (median of "
        f"{args.repeats}), naive from one pass over {args.naive_sample}; the layer's recording "
        f"timed over all {n_total}.",
        "",
        setting_line(current_commit(), SETTING.stem, "prompts of a run of"),
        "",
        "| layer | naive (full forward) | every position, whole prompt from the layer (before "
        "0.3.0) | every position, demonstrations once, one prompt per call (0.3.0) | every "
        "position, now | demonstrations only, now | review only, now (share of the whole "
        "prompt's) | largest logit difference from naive | recording the layer's input |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [row.markdown() for row in rows]
    lines += [
        "",
        f"Every head of every layer at every position ({sites[0].n_heads * n_layers} jobs, "
        f"{n_total} prompts), from these per-prompt times (interpolated between the layers "
        f"measured), in minutes of one thread: now {now / 60:.0f}, 0.3.0 {one / 60:.0f}, before "
        f"0.3.0 {before / 60:.0f}; the {n_layers - 1} layer recordings {records / 60:.0f}, each "
        f"from a lower one ({alone / 60:.0f} each from the embeddings, as 0.3.0 and before "
        f"recorded them; a linear fit of the recordings' seconds in the layer). On 2 cores (two "
        f"jobs at a time) about **{(now + records) / 120:.0f} min** now with the recordings, "
        f"{(one + alone) / 120:.0f} min with 0.3.0, {(before + alone) / 120:.0f} min before.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

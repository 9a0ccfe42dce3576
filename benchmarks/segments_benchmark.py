"""Benchmark: a head job at every position, at the demonstrations and at the review, by the pass
that computes the demonstrations once per job (``shared_prefix``) against the pass over each
whole prompt from the layer (``from_layer``, the path before it) and full forward passes
(``naive``), side by side on the same prompts, one torch thread (as head jobs run).

    python benchmarks/segments_benchmark.py --results results/smollm2-imdb [--sample 40]

Needs a finished default run (its prompts; the model prepared in resources/models/). For each
layer of ``--layers``, zero ablation of head 0: seconds per prompt of each pass (median of
``--repeats``), their largest difference from the naive logits, and the all-position job's
seconds for all the run's prompts. The all-position sweep of every head is priced from these
per-layer times over every layer (``--all-layers``: measure every layer instead of
interpolating). Writes benchmarks/segments.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def timed(func, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = func()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    import torch

    from headperturb.core import files
    from headperturb.core.kinds import build
    from headperturb.model import loading, passes
    from headperturb.model.engine import Engine
    from headperturb.model.hooks import Edit, site_slice
    from headperturb.model.sites import locate_sites

    parser = argparse.ArgumentParser()
    parser.add_argument("--results", default="results/smollm2-imdb")
    parser.add_argument("--model", default="resources/models/smollm2-135m-instruct")
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
    rows, per_layer = [], {}
    for layer in layers:
        site = sites[layer]
        captured = engine.capture_layer_inputs(ids, site)
        cols = site_slice(model, site, 0, "o_proj_input")
        values = zero.values(seed=0, layer=layer, head=0, width=cols.stop - cols.start, repeats=1)

        def edit(position, site=site, values=values):
            return Edit(site, 0, "o_proj_input", values, "set", 1, position, engine.prefix_len)

        naive_ids = ids[: args.naive_sample]
        t_naive, out_naive = timed(
            lambda x=naive_ids: passes.naive(engine, x, pids, edit("all")), 1
        )
        t_whole, out_whole = timed(lambda c=captured: passes.from_layer(engine, c, ids, pids, edit("all")),
                                   args.repeats)  # fmt: skip
        keys = {
            "all": [0] * len(ids),
            "demonstrations": [0] * len(ids),
            "review": ["clean"] * len(ids),
        }
        shared = {}
        for position in ("all", "demonstrations", "review"):
            shared[position] = timed(lambda p=position, c=captured, k=keys: passes.shared_prefix(
                engine, c, ids, pids, edit(p), k[p]), args.repeats)  # fmt: skip
        diff = max(float(np.abs(out_whole[: len(naive_ids)] - out_naive).max()),
                   float(np.abs(shared["all"][1][: len(naive_ids)] - out_naive).max()))  # fmt: skip
        n = len(ids)
        per_layer[layer] = shared["all"][0] / n
        rows.append((layer, t_naive / len(naive_ids), t_whole / n, shared["all"][0] / n,
                     shared["demonstrations"][0] / n, shared["review"][0] / n, diff))  # fmt: skip
        print(rows[-1], flush=True)
    n_total = len(every)
    known = sorted(per_layer)
    estimate = 0.0
    for layer in range(n_layers - 1):  # the last layer's jobs take the last-layer program: ~0
        seconds = float(np.interp(layer, known, [per_layer[k] for k in known]))
        estimate += sites[0].n_heads * seconds * n_total
    lines = [
        "# A head job at every position, at the demonstrations and at the review",
        "",
        f"SmolLM2-135M-Instruct, fp32, one torch thread, zero ablation of head 0; prompts of the "
        f"run `{results.name}`: {mean_tokens:.0f} tokens on average, {engine.prefix_len} of them "
        f"the demonstrations ({own_tokens:.0f} each prompt's own). Seconds per prompt (median of "
        f"{args.repeats} passes over {len(ids)} prompts; naive: one pass over {args.naive_sample}).",
        "",
        "| layer | naive (full forward) | every position, whole prompt from the layer (before) | "
        "every position, demonstrations once | demonstrations only | review only | "
        "largest logit difference from naive |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} ({r[2] / r[3]:.1f}x) | {r[4]:.3f} | "
              f"{r[5]:.3f} ({r[5] / r[2]:.2f} of the whole prompt's) | {r[6]:.1e} |" for r in rows]  # fmt: skip
    before = sum(sites[0].n_heads * float(np.interp(lay, known, [r[2] for r in rows])) * n_total
                 for lay in range(n_layers - 1))  # fmt: skip
    lines += [
        "",
        f"Every head of every layer at every position ({sites[0].n_heads * n_layers} jobs, "
        f"{n_total} prompts), from these per-prompt times (interpolated between the layers "
        f"measured; the last layer's jobs take the last-layer program, seconds in all): "
        f"{estimate / 60:.0f} min of one thread now, {before / 60:.0f} min before; on 2 cores "
        f"(two jobs at a time) about {estimate / 120:.0f} min now, {before / 120:.0f} min before.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

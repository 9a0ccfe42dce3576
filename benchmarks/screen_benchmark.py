"""Benchmark: the screen's pass per prompt beside the passes it is priced against, side by side on
the same prompts and threads.

    python benchmarks/screen_benchmark.py [--results results/bench-default] [--sample 8]

Needs the prompts of a run of benchmarks/configs/default-run.yaml and its model prepared in
resources/models/ (``snakemake --cores all --configfile benchmarks/configs/default-run.yaml
--until pair_prompts``). Per prompt, seconds (median over the prompts of ``--sample``):

- ``screen``: the screen as the setting runs it (its positions; a partner's forward pass where
  it estimates patching): the shared prefix's forward once, each prompt's own tokens on its cache,
  one backward pass to every head's output at every position (the prefix's included) and the
  sums; split into its suffix forward, its backward and the partner's forward;
- ``cached forward``: the baseline's pass over every prompt of the run (the prefix's cache
  reused, four prompts per call);
- ``suffix forward and backward``: the same pass with a gradient that stops at the cached prefix
  (what a screen of the final position and the review alone would need);
- ``full forward`` and ``full forward and backward``: a whole prompt, no cache.

Writes benchmarks/screen.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from provenance import current_commit, setting_line

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
SETTING = REPO / "benchmarks" / "configs" / "default-run.yaml"


def per_prompt(func, prompts) -> float:
    """The median seconds of ``func(ids)`` over ``prompts``."""
    times = []
    for ids in prompts:
        start = time.perf_counter()
        func(ids)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def margin_backward(engine, sites, **inputs) -> None:
    """One forward pass of ``inputs`` and the margin's backward pass to every head's output."""
    import torch

    from headperturb.model import hooks
    from headperturb.model.cache import frozen_parameters

    seen = []
    recorders = [hooks.Hook("hook_z", s, lambda z: seen.append(z)) for s in sites]
    recorders.append(hooks.Hook("hook_embed", None, lambda out: out.requires_grad_(True)))
    with (
        torch.enable_grad(),
        frozen_parameters(engine.model),
        hooks.hooked(engine.model, *recorders),
    ):
        logits = engine.model(logits_to_keep=1, **inputs).logits
        margin = logits[0, -1, engine.token_ids[1]] - logits[0, -1, engine.token_ids[0]]
        torch.autograd.grad(margin, seen)


def full_backward(engine, sites, ids) -> None:
    """A whole prompt's forward pass and the margin's backward pass to every head's output."""
    margin_backward(engine, sites, input_ids=engine.ids(ids))


def suffix_backward(engine, sites, cache, ids) -> None:
    """One prompt's own tokens on the prefix's cache, the gradient stopping at the cache."""
    import copy

    own = {engine.cache_kw: copy.deepcopy(cache)}
    margin_backward(
        engine, sites, input_ids=engine.ids(ids[engine.prefix_len :]), use_cache=True, **own
    )


def screen_parts(engine, sites, prompts, every, partners) -> dict[str, float]:
    """The screen's forward, backward and partner forward per prompt (medians), timed inside its
    own pass (:class:`headperturb.model.gradients._Gradients`); ``partners[i]``: the index in
    ``every`` of prompt i's partner (-1: none)."""
    import torch

    from headperturb.model import gradients

    parts: dict[str, list[float]] = {"suffix forward": [], "backward": [], "partner forward": []}
    with gradients._Gradients(engine, sites) as grads:
        grads.of(prompts[0])  # the prefix's forward, once
        for i, ids in enumerate(prompts):
            start = time.perf_counter()
            margin = grads._run(ids)
            parts["suffix forward"].append(time.perf_counter() - start)
            start = time.perf_counter()
            wrt = [*grads.prefix, *grads.seen]
            torch.autograd.grad(margin, wrt, retain_graph=True, allow_unused=True)
            parts["backward"].append(time.perf_counter() - start)
            if partners is not None and partners[i] >= 0:
                start = time.perf_counter()
                grads.inputs(every[partners[i]])
                parts["partner forward"].append(time.perf_counter() - start)
    return {k: statistics.median(v) if v else 0.0 for k, v in parts.items()}


def main() -> None:
    import torch

    from headperturb.core import files
    from headperturb.model import gradients, loading
    from headperturb.model.context import prefix_of
    from headperturb.model.engine import Engine
    from headperturb.model.rows import partners_of, read_pairs
    from headperturb.model.sites import locate_sites

    setting = yaml.safe_load(SETTING.read_text())
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", default=str(REPO / "results" / setting["run_name"]))
    model_dir = REPO / "resources" / "models" / setting["model"]["name"]
    parser.add_argument("--model", default=str(model_dir))
    parser.add_argument("--sample", type=int, default=8, help="prompts timed per pass")
    parser.add_argument("--threads", type=int, default=setting["threads"]["model"])
    parser.add_argument("--out", default=str(REPO / "benchmarks/screen.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = Path(args.results)
    model, _, _ = loading.load_prepared(args.model, device="cpu")
    frame = files.read_parquet(results / "prompts/prompts.parquet")
    info = files.read_json(results / "prompts/prompt_info.json")
    engine = Engine(model, info["prefix_len"], info["verbalizer_token_ids"])
    every = [np.asarray(x) for x in frame["input_ids"]]
    ids = every[: args.sample]
    sites = locate_sites(model)
    screen = setting["screen"]
    positions = screen["positions"]
    partners = None
    if "patch" in screen["kinds"]:
        pairs = read_pairs(results / "prompts/pairs.parquet")
        partners = partners_of(pairs, frame["prompt_id"].tolist())[: len(ids)]
    prefix = prefix_of(info, ids[0], args.model, positions)
    start = time.perf_counter()
    means = gradients.head_means(engine, every, sites)
    t_means = (time.perf_counter() - start) / len(every)
    start = time.perf_counter()  # without patching: the partners of a sample lie outside it
    gradients.gradient_sums(engine, ids, sites, means, positions=positions, prefix=prefix)
    t_sums = (time.perf_counter() - start) / len(ids)
    parts = screen_parts(engine, sites, ids, every, partners)
    t_screen = t_sums + parts["partner forward"]
    start = time.perf_counter()  # every prompt: the prefix's forward shared as in a run
    engine.score(every)
    t_cached = (time.perf_counter() - start) / len(every)
    with torch.no_grad():  # the prefix as the screen holds it, without a graph
        cache = engine.prefix_cache(ids)
    t_suffix = per_prompt(lambda x: suffix_backward(engine, sites, cache, x), ids)
    with torch.inference_mode():
        t_full = per_prompt(lambda x: model(input_ids=engine.ids(x), logits_to_keep=1), ids)
    t_full_bwd = per_prompt(lambda x: full_backward(engine, sites, x), ids)
    price = t_suffix + (t_cached if partners else 0.0)
    rows = [
        ("the screen at its setting's positions, with patching", t_screen, ""),
        ("... without patching (`gradient_sums` timed whole)", t_sums, ""),
        ("... its own tokens' forward on the prefix's cache", parts["suffix forward"], ""),
        ("... its backward, through the prefix's graph", parts["backward"], ""),
        ("... the partner's forward, which patching adds", parts["partner forward"], ""),
        ("the heads' means (mean ablation's values), per prompt", t_means, ""),
        ("cached forward (the baseline's pass over every prompt, 4 per call)", t_cached, ""),
        ("cached forward and a backward that stops at the prefix", t_suffix, ""),
        ("full forward of one prompt", t_full, ""),
        ("full forward and backward of one prompt", t_full_bwd, ""),
    ]
    commit = current_commit()
    lines = [
        "# The screen beside the passes it is priced against",
        "",
        setting_line(commit, "default-run", "prompts and screen of"),
        f"{len(ids)} prompts (median seconds per prompt), {args.threads} torch threads, fp32, "
        "CPU; `python benchmarks/screen_benchmark.py`.",
        "",
        "| pass | seconds per prompt | the screen / this |",
        "| --- | --- | --- |",
        *(f"| {what} | {t:.3f} | {t_screen / t:.2f}x |" for what, t, _ in rows if t > 0),
        "",
        "The issue's price of the screen (a forward on the prefix's cache and its backward, and "
        "the partner's forward): "
        f"{price:.3f} s per prompt; the screen takes {t_screen / price:.2f}x that, and "
        f"{t_screen / t_full_bwd:.2f}x a full forward and backward of the prompt. The backward "
        "through the prefix's graph is what the demonstrations', label words' and all-position "
        "estimates need; a backward that stops at the prefix cannot give them.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""The control for patching: patch each of a finished run's strongest heads from a review of the
*same* sentiment and length instead of the opposite one. If the patch effect is the review's
sentiment, the same-sentiment patch moves (nearly) nothing.

    python benchmarks/patch_control.py [--results results/smollm2-imdb] [--top 5]

Reads the run's prompts, recordings and table (``positions: last`` patch rows); prints, per head,
the share of the opposite-review gap that patching from the opposite and from a same-sentiment
review moves, and the ROC AUC before and after.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> None:
    import numpy as np

    from headperturb.analysis import effects
    from headperturb.core import files
    from headperturb.core.kinds import Patch
    from headperturb.model import cache, passes, recordings, tail
    from headperturb.model.context import ModelSpec, PromptFiles, load_engine, prompt_ids
    from headperturb.model.hooks import Edit, site_slice

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=REPO / "results/smollm2-imdb")
    parser.add_argument(
        "--model", type=Path, default=REPO / "resources/models/smollm2-135m-instruct"
    )
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    cache.set_threads(2)
    r = args.results
    prompt_files = PromptFiles(
        str(r / "prompts/prompts.parquet"), str(r / "prompts/prompt_info.json")
    )
    engine, sites, _info, _pinfo = load_engine(
        prompt_files, ModelSpec(str(args.model), "cpu", threads=2)
    )
    ids, pids, labels = prompt_ids(prompt_files.prompts)
    state = recordings.load(r / "baseline/final_state.safetensors")
    kv = recordings.load(r / "activations/cache.safetensors")
    base = files.read_parquet(r / "baseline/per_prompt.parquet").set_index("prompt_id")["margin"]
    pairs = files.read_parquet(r / "prompts/pairs.parquet")
    index = {int(p): i for i, p in enumerate(pids)}
    opposite = [
        index[q] if q >= 0 else -1 for q in pairs.set_index("prompt_id").loc[pids, "partner_id"]
    ]
    lengths, rng = [len(x) for x in ids], np.random.default_rng(0)
    same = []
    for i in range(len(ids)):
        options = [
            j
            for j in range(len(ids))
            if j != i and labels[j] == labels[i] and lengths[j] == lengths[i]
        ]
        same.append(int(options[rng.integers(len(options))]) if options else -1)
    table = files.read_parquet(r / "contributions.parquet")
    top = table[(table["kind"] == "patch") & (table["position"] == "last")].nlargest(
        args.top, "patch_effect"
    )
    columns = ("head", "donor", "prompts", "share of the opposite-review gap moved")
    print("| " + " | ".join(columns) + " | ROC AUC before -> after |")
    print("| --- | --- | --- | --- | --- |")
    for layer, head in zip(top["layer"], top["head"]):
        site = sites[layer]
        cols = site_slice(engine.model, site, head, "o_proj_input")
        clean = tail.final_outputs(tail.layer_state(state, layer), cols, "o_proj_input")
        for name, donor in (("opposite", opposite), ("same sentiment", same)):
            rows = [i for i in range(len(ids)) if donor[i] >= 0 and opposite[i] >= 0]

            def values(r_, _p, length, rows=rows, donor=donor, clean=clean):
                return clean[donor[rows[r_]]][-length:][None]

            edit = Edit(site, head, "o_proj_input", values, Patch.apply, 1, "last")
            out = passes.final_position(
                engine, state, kv, [pids[i] for i in rows], edit, runs=rows
            )[:, 0]
            sign = np.where(labels[rows] == 1, 1.0, -1.0)
            clean_m = base.loc[[pids[i] for i in rows]].to_numpy()
            gap = np.mean(sign * (clean_m - base.loc[[pids[opposite[i]] for i in rows]].to_numpy()))
            moved = np.mean(sign * (clean_m - (out[:, 1] - out[:, 0]))) / gap
            before = effects.roc_auc(labels[rows], clean_m)
            after = effects.roc_auc(labels[rows], out[:, 1] - out[:, 0])
            print(
                f"| L{layer}H{head} | {name} | {len(rows)} | {moved:+.3f} | "
                f"{before:.3f} -> {after:.3f} |"
            )


if __name__ == "__main__":
    main()

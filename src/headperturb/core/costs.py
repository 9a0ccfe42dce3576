"""What head jobs cost: the work each does per prompt (from its :func:`headperturb.core.plans.plan`)
and the line the log shows before a run, from the per-token costs measured when the model was
prepared (:func:`headperturb.model.loading.speed`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from headperturb.core import files
from headperturb.core.kinds import build
from headperturb.core.plans import plan
from headperturb.core.spec import POSITIONS, HeadJob


def cost_preview(jobs: list[HeadJob], shape: dict, config: dict, model_info: dict | None) -> str:
    """A line for the log before a run: how many head jobs, and what they cost in CPU time, from
    the per-token costs measured when the model was prepared
    (:func:`headperturb.model.loading.speed`): a token of a full pass per layer, and a final token
    per layer, interpolated to the prompts' length."""
    pert, prompts = config["perturbation"], config["prompts"]
    n_layers, n = shape["n_layers"], prompts["n_test"]
    own = prompts["max_review_tokens"] + 8  # a review with its template words
    tokens = (prompts["k_shot"] + 1) * own
    by_position: dict[str, list[HeadJob]] = {p: [] for p in POSITIONS}
    for j in jobs:  # the single demonstrations after, in the order asked
        by_position.setdefault(j.position, []).append(j)
    counts = ", ".join(f"{len(v)} at {k} positions" for k, v in by_position.items() if v)
    text = f"{len(jobs)} head jobs ({counts})"
    if model_info is None:
        return text + "; their cost is estimated once the model is prepared"
    full = model_info.get("seconds_per_token_layer")
    final = model_info.get("seconds_per_final_token_layer")
    if not full or not final:  # prepared by a release that measured less
        return text + (
            "; the prepared model holds no per-token costs to estimate their cost "
            "from: `--forcerun prepare_model` measures them"
        )
    at = {int(k): v for k, v in final.items()}
    per_final = at[128] + (at[512] - at[128]) * (max(tokens, 128) - 128) / 384

    def seconds(selected, position=None) -> float:
        total = 0.0
        for j in selected:
            j = j if position is None else replace(j, position=position)
            kind = build(j.kind, j.scale or None)
            job_plan = plan(j, pert["method"], n_layers, repeats=pert["repeats"])
            cost = job_plan.cost(tokens, own=own, shared=_shared(kind, j.position, n))
            total += n * (cost[0] * full + cost[1] * per_final)
        return total

    text += (
        f": about {_duration(seconds(jobs))} of CPU time (measured here: {full * 1e3:.2g} ms "
        f"per token and layer of a full pass, {per_final * 1e3:.2g} ms per final token and layer)"
    )
    if by_position["all"] and pert["method"] == "fast":
        text += (
            f"; at the last position only they would take about {_duration(seconds(jobs, 'last'))}"
        )
    return text + "; fewer prompts cost proportionally less, a GPU (model.device: cuda) far less"


def prepared_info(path) -> dict | None:
    """A prepared model's description (``headperturb_model.json``, with the per-token costs the
    preview reads); None before the model is prepared."""
    return files.read_json(path) if Path(path).is_file() else None


def _shared(kind, position: str, n: int) -> float:
    """The share of prompts whose edited demonstrations a job computes anew
    (:meth:`headperturb.core.plans.Plan.cost`): once per job where every prompt gets the same
    values there, about once per prompt length (a guess of 0.3) where the values depend on the
    length (mean), for every prompt where each gets its own (noise)."""
    if position in ("review", "last"):
        return 1.0 / n
    first, second = kind.prefix_key(100), kind.prefix_key(101)
    if first is None:
        return 1.0
    return 1.0 / n if first == second else 0.3


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

"""Planted effects: a head made decisive must come out HIGH and significant, a silenced head not.

On a tiny random Llama, head 1 of the last layer is made decisive (its o_proj columns scaled up,
so its output dominates the final residual stream) and head 2 is silenced (its o_proj columns set
to zero). The task's labels are the intact model's own answers, so the baseline is right on every
prompt and the only question is which head the answers depend on. The per-head files go through
the same aggregation as the workflow's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import edit_of, head_slice

from headperturb import aggregation, io, passes, scoring, tail
from headperturb.engine import Engine
from headperturb.prompts import build_prompts
from headperturb.sites import locate_sites

DECISIVE, SILENT = 1, 2


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_llama_dir, imdb_sample):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    site = locate_sites(model)[-1]
    with torch.no_grad():
        weight = model.get_submodule(site.module_name).weight
        weight[:, head_slice(site, DECISIVE)] *= 50.0
        weight[:, head_slice(site, SILENT)] = 0.0
    train, test = imdb_sample
    built = build_prompts(
        train, test, tok, k_shot=2, n_test=60, max_review_tokens=20,
        template="Review: {text}\nSentiment: {label}", verbalizers=(" negative", " positive"),
        separator="\n\n", seed=0, context_length=1024,
    )  # fmt: skip
    engine = Engine(model, built.info["prefix_len"], built.info["verbalizer_token_ids"])
    ids = [np.asarray(x) for x in built.prompts["input_ids"]]
    pids = built.prompts["prompt_id"].tolist()
    recorded = engine.baseline(ids, locate_sites(model))
    logits, state = recorded.logits, tail.layer_state(recorded.final_state, site.layer)
    labels = (logits[:, 1] > logits[:, 0]).astype(int)  # the intact model's answers
    assert 5 <= labels.sum() <= 55, "the decisive head should give both answers"
    folder = tmp_path_factory.mktemp("planted")
    base = scoring.per_prompt(pids, labels, logits)
    base.to_parquet(folder / "baseline.parquet")
    io.write_json(folder / "metrics.json", scoring.metrics(labels, base["prediction"]))

    paths = []
    for head in (DECISIVE, SILENT):
        for kind, scale, draws in (("noise", "20", 4), ("zero", "", 1)):
            edit = edit_of(model, site, head, kind, scale=20.0, repeats=draws, seed=0)
            out = passes.last_layer(engine, state, pids, edit)
            frames = []
            for draw in range(draws):
                frame = scoring.per_prompt(pids, labels, out[:, draw])
                frame.insert(0, "draw", draw)
                frames.append(frame)
            frame = pd.concat(frames).assign(
                site="o_proj_input", position="all", kind=kind, layer=site.layer, head=head,
                scale=scale, noise_mode="absolute" if scale else "", sigma=float(scale or "nan"),
            )  # fmt: skip
            path = folder / f"{kind}_{head}.parquet"
            frame.to_parquet(path)
            paths.append(path)
    return aggregation.aggregate(
        {"baseline": folder / "metrics.json", "baseline_per_prompt": folder / "baseline.parquet", "perturbed": paths,
         "parquet": folder / "table.parquet", "csv": folder / "table.csv"},
        10.0, 5.0, {"bootstrap": 500, "permutations": 2000, "alpha": 0.05},
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["zero", "noise"])
def test_decisive_head_is_high_and_significant(planted, kind):
    row = planted[(planted["head"] == DECISIVE) & (planted["kind"] == kind)].iloc[0]
    assert row["baseline_accuracy"] == 1.0
    assert row["impact"] == "HIGH" and row["direction"] == "beneficial"
    assert row["significant"] and row["q_value"] < 0.01
    assert row["ci_low"] > 0.1  # the interval excludes zero by a wide margin
    assert row["change_logit_diff"] > 0


@pytest.mark.parametrize("kind", ["zero", "noise"])
def test_silenced_head_is_not_significant(planted, kind):
    row = planted[(planted["head"] == SILENT) & (planted["kind"] == kind)].iloc[0]
    assert row["contribution_accuracy"] == 0 and row["impact"] == "LOW"
    assert not row["significant"] and row["p_value"] == 1.0
    assert abs(row["change_logit_diff"]) < 1e-5


def test_q_values_match_a_hand_computation(planted):
    p = planted["p_value"].to_numpy()
    m = len(p)
    order = np.argsort(p)
    expected = np.empty(m)
    running = 1.0
    for rank in range(m, 0, -1):  # step-up from the largest p-value
        running = min(running, p[order[rank - 1]] * m / rank)
        expected[order[rank - 1]] = running
    np.testing.assert_allclose(planted["q_value"].to_numpy(), expected)

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
from tiny_models import edit_of, head_slice, sentiment_prompts

from headperturb.analysis import aggregation, scoring
from headperturb.core import files
from headperturb.model import passes, tail
from headperturb.model.engine import Engine
from headperturb.model.hooks import Edit, site_slice
from headperturb.model.rows import rows_for
from headperturb.model.sites import locate_sites

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
    built = sentiment_prompts(train, test, tok, k_shot=2, n_test=60, max_review_tokens=20)
    engine = Engine(model, built.info["prefix_len"], built.info["verbalizer_token_ids"])
    ids = [np.asarray(x) for x in built.prompts["input_ids"]]
    pids = built.prompts["prompt_id"].tolist()
    recorded = engine.baseline(ids, locate_sites(model))
    logits, state = recorded.logits, tail.layer_state(recorded.final_state, site.layer)
    labels = (logits[:, 1] > logits[:, 0]).astype(int)  # the intact model's answers
    assert 5 <= labels.sum() <= 55, "the decisive head should give both answers"
    folder = tmp_path_factory.mktemp("planted")
    base = scoring.per_prompt(pids, labels, logits)
    files.write_parquet(folder / "baseline.parquet", base)
    files.write_json(folder / "metrics.json", scoring.metrics(labels, base["prediction"]))

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
                site="o_proj_input",
                position="all",
                kind=kind,
                layer=site.layer,
                head=head,
                scale=scale,
                noise_mode="absolute" if scale else "",
                sigma=float(scale or "nan"),
            )
            path = folder / f"{kind}_{head}.parquet"
            files.write_parquet(path, frame)
            paths.append(path)
    return _aggregate(folder, paths)


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
    """Benjamini-Hochberg within each setting (the default family), by hand."""
    expected = np.empty(len(planted))
    for _, rows in planted.groupby(["site", "position", "kind", "scale"]).indices.items():
        p = planted["p_value"].to_numpy()[rows]
        m = len(p)
        order = np.argsort(p)
        running = 1.0
        for rank in range(m, 0, -1):  # step-up from the largest p-value
            running = min(running, p[order[rank - 1]] * m / rank)
            expected[rows[order[rank - 1]]] = running
    np.testing.assert_allclose(planted["q_value"].to_numpy(), expected)


# -- discrimination, bias and patching apart (issue 20) ------------------------------------------

CONSTANT, CARRIER = 3, 1


@pytest.fixture(scope="module")
def planted_kinds(tmp_path_factory, tiny_tokenizer_dir, imdb_sample):
    """A tiny random Qwen2 (its value projection has a bias) whose margin is exactly linear in the
    last layer's head outputs (the final norm an identity, the last MLP silenced), with two heads
    planted in the last layer: head 3 writes a constant (its KV group's values are the bias
    alone, so its output is the same for every prompt and position) along the margin's direction,
    and head 1 carries each prompt's answer (its o_proj columns write the prompt-dependent part of
    its output along that direction, scaled to dominate). The labels are the model's own answers,
    so the unperturbed model is right on every prompt; partners are prompts of the other answer
    with as many tokens. Zero ablation and patching of both heads go through the aggregation."""
    from tiny_models import build_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headperturb.core import kinds
    from headperturb.data import prompts

    folder = build_tiny_model(tmp_path_factory.mktemp("qwen2"), tiny_tokenizer_dir, "qwen2")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    site = locate_sites(model)[-1]
    train, test = imdb_sample
    built = sentiment_prompts(train, test, tok, k_shot=2, n_test=60, max_review_tokens=20)
    ids = [np.asarray(x) for x in built.prompts["input_ids"]]
    pids = built.prompts["prompt_id"].tolist()
    token_ids = built.info["verbalizer_token_ids"]
    engine = Engine(model, built.info["prefix_len"], token_ids)
    attn = model.get_submodule(site.module_name.rsplit(".", 1)[0])
    z = engine.baseline(ids, [site]).final_state[f"z.{site.layer}"][:, head_slice(site, CARRIER)]
    direction = torch.linalg.svd(z - z.mean(0), full_matrices=False).Vh[0]
    spread, centre = float((z @ direction).std()), float((z @ direction).mean())
    with torch.no_grad():
        model.model.norm = torch.nn.Identity()
        model.model.layers[-1].mlp.down_proj.weight.zero_()
        margin = model.lm_head.weight[token_ids[1]] - model.lm_head.weight[token_ids[0]]
        u = margin / margin.norm()
        weight = attn.o_proj.weight
        weight[:, head_slice(site, CARRIER)] = 10.0 * torch.outer(u, direction) / spread
        kv = slice(site.head_dim, 2 * site.head_dim)  # heads 2 and 3 share KV head 1
        attn.v_proj.weight[kv] = 0.0
        value = torch.randn(site.head_dim, generator=torch.Generator().manual_seed(0))
        attn.v_proj.bias[kv] = value
        weight[:, head_slice(site, 2)] = 0.0
        weight[:, head_slice(site, CONSTANT)] = (
            (0.5 - 10.0 * centre / spread) * torch.outer(u, value) / value.pow(2).sum()
        )
    recorded = engine.baseline(ids, [site])
    logits, state = recorded.logits, tail.layer_state(recorded.final_state, site.layer)
    labels = (logits[:, 1] > logits[:, 0]).astype(int)  # the model's own answers
    assert 15 <= labels.sum() <= 45
    folder = tmp_path_factory.mktemp("planted-kinds")
    base = scoring.per_prompt(pids, labels, logits)
    files.write_parquet(folder / "baseline.parquet", base)
    files.write_json(folder / "metrics.json", scoring.metrics(labels, base["prediction"]))
    pairs = prompts.pair_prompts(built.prompts.assign(label=labels), seed=0)
    assert (pairs["partner_id"] >= 0).sum() >= 40
    paths = []
    for head in (CONSTANT, CARRIER):
        for kind in ("zero", "patch", "restore"):
            pert = kinds.build(kind)
            rows = rows_for(pert, pids, pairs)
            cols = site_slice(model, site, head, "o_proj_input")
            clean = tail.final_outputs(state, cols, "o_proj_input")
            values = pert.values(
                seed=0,
                layer=site.layer,
                head=head,
                width=cols.stop - cols.start,
                repeats=1,
                clean=clean,
                **({"donors": rows.donors} if pert.paired else {}),
            )
            edit = Edit(site, head, "o_proj_input", values, pert.apply, 1, "all")
            run_pids = [pids[k] for k in rows.prompt]
            out = passes.last_layer(engine, tail.rows_of(state, rows.run), run_pids, edit)
            frame = scoring.per_prompt(run_pids, labels[rows.prompt], out[:, 0]).assign(draw=0)
            if pert.paired:
                frame["partner_id"] = [pids[k] for k in rows.partner]
            frame = frame.assign(
                site="o_proj_input",
                position="all",
                kind=kind,
                layer=site.layer,
                head=head,
                scale="",
                noise_mode="",
                sigma=float("nan"),
            )
            paths.append(folder / f"{kind}_{head}.parquet")
            files.write_parquet(paths[-1], frame)
    table = _aggregate(folder, paths)
    return table.set_index(["head", "kind"])


def test_a_head_that_adds_a_constant_is_bias_without_discrimination_or_patch_effect(planted_kinds):
    zero = planted_kinds.loc[(CONSTANT, "zero")]
    assert zero["baseline_auc"] == 1.0 and zero["change_auc"] == 0.0
    assert zero["ci_low_bias_shift"] == pytest.approx(zero["ci_high_bias_shift"])  # one shift
    assert abs(zero["bias_shift"]) > 0.1 and zero["contribution_accuracy"] > 0.1
    assert zero["contribution_accuracy_bias"] == pytest.approx(zero["contribution_accuracy"])
    assert zero["effect"] == "bias" and zero["impact"] == "HIGH"
    assert zero["impact_discrimination"] == "LOW"
    for kind in ("patch", "restore"):
        row = planted_kinds.loc[(CONSTANT, kind)]
        assert row["patch_effect"] == pytest.approx(0.0, abs=1e-5)
        assert row["contribution_accuracy"] == 0 and row["effect"] == "none"


def test_a_head_that_carries_the_answer_is_discrimination_with_a_large_patch_effect(planted_kinds):
    zero = planted_kinds.loc[(CARRIER, "zero")]
    assert zero["effect"] in ("discrimination", "both") and zero["change_auc"] > 0.3
    assert zero["q_value_auc"] < 0.01
    for kind in ("patch", "restore"):
        row = planted_kinds.loc[(CARRIER, kind)]
        assert row["patch_effect"] > 0.8 and row["ci_low_patch_effect"] > 0.5
        assert row["effect"] in ("discrimination", "both") and row["contribution_accuracy"] > 0.5


def _aggregate(folder, paths):
    """The table of the planted heads' files, as the aggregation rule builds it."""
    return aggregation.aggregate(
        {
            "baseline": folder / "metrics.json",
            "baseline_per_prompt": folder / "baseline.parquet",
            "perturbed": paths,
            "parquet": folder / "table.parquet",
            "csv": folder / "table.csv",
        },
        10.0,
        5.0,
        {"bootstrap": 500, "permutations": 2000, "alpha": 0.05},
    )

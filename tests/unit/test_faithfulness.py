"""MIB's faithfulness beside the curves: MIB's sizes as whole heads, f, CPR and CMD by hand,
their bootstrap intervals, and the node-level export."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from headperturb.analysis import curves, faithfulness
from headperturb.core import sets

MIB_FLOATS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)
"""MIB's percentages as its code writes them (``MIB_circuit_track/evaluation.py``)."""


def test_mibs_sizes_as_whole_heads():
    # SmolLM2-135M: 30 layers x 9 heads; 0.1 % and 0.2 % are 0.27 and 0.54 heads: none
    assert [k for _, k in sets.mib_grid(270)] == [0, 0, 1, 2, 5, 13, 27, 54, 135, 270]
    assert sets.mib_ks(270) == [1, 2, 5, 13, 27, 54, 135, 270]
    assert sets.mib_ks(1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert sets.mib_ks(8) == [1, 4, 8] and sets.mib_ks(1) == [1]
    assert [p for p, _ in sets.mib_grid(10)] == [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]
    for n in range(1, 3000):  # MIB's own int(pct * n_scored_items)
        assert [k for _, k in sets.mib_grid(n)] == [int(p * n) for p in MIB_FLOATS]
    assert sets.grid("mib", 10) == [1, 2, 4, 5, 8, 10] and sets.grid(None, 10) == [1, 2, 4, 8, 10]


def test_faithfulness_by_hand():
    assert faithfulness.faithfulness(2.0, 1.0, 3.0) == pytest.approx(0.5)
    assert faithfulness.faithfulness(4.0, 1.0, 3.0) == pytest.approx(1.5)  # beyond the model
    assert faithfulness.faithfulness(0.0, 1.0, 3.0) == pytest.approx(-0.5)
    assert np.isnan(faithfulness.faithfulness(2.0, 3.0, 3.0))  # the empty circuit is the model


PERCENT = [p for p, _ in sets.mib_grid(1000)]


def test_areas_by_hand():
    """f = 1: CPR 0.999 over the fraction (0.001 to 1), 1 over the log; CMD 0. f = the fraction
    x: the trapezoids are exact, CPR = (1 - 0.001^2) / 2 = 0.4999995, CMD = 0.999 - CPR. f linear
    in log10 of the percentage from 0 to 1: CPR and CMD over the log 1/2 each. Three sizes 1, 10,
    100 % with f 0, 1, 0.5: CPR 0.09 * 0.5 + 0.9 * 0.75 = 0.72, CMD 0.045 + 0.225 = 0.27; over
    the log (0, 1/2, 1): 0.25 + 0.375 = 0.625 and 0.25 + 0.125 = 0.375."""
    ones = faithfulness.areas(PERCENT, np.ones(10))
    assert ones["cpr"] == pytest.approx(0.999) and ones["cmd"] == pytest.approx(0.0)
    assert ones["cpr_log"] == pytest.approx(1.0) and ones["cmd_log"] == pytest.approx(0.0)
    x = np.array(PERCENT) / 100
    linear = faithfulness.areas(PERCENT, x)
    assert linear["cpr"] == pytest.approx(0.4999995)
    assert linear["cmd"] == pytest.approx(0.999 - 0.4999995)
    logs = faithfulness.areas(PERCENT, (np.log10(PERCENT) + 1) / 3)
    assert logs["cpr_log"] == pytest.approx(0.5) and logs["cmd_log"] == pytest.approx(0.5)
    three = faithfulness.areas([1, 10, 100], [0.0, 1.0, 0.5])
    assert three["cpr"] == pytest.approx(0.72) and three["cmd"] == pytest.approx(0.27)
    assert three["cpr_log"] == pytest.approx(0.625) and three["cmd_log"] == pytest.approx(0.375)
    # one row per bootstrap resample
    both = faithfulness.areas(PERCENT, np.stack([np.ones(10), x]))
    np.testing.assert_allclose(both["cpr"], [0.999, 0.4999995])
    assert np.isnan(faithfulness.areas(PERCENT, [np.nan, *[1.0] * 9])["cpr"])


def _keep(ks, logit_diff, order="screen"):
    return pd.DataFrame(
        {
            "site": "o_proj_input",
            "position": "last",
            "kind": "zero",
            "order": order,
            "mode": "keep",
            "k": ks,
            "baseline_logit_diff": 3.0,
            "logit_diff": logit_diff,
            "baseline_auc": 0.9,
            "auc": 0.7,
        }
    )


def test_f_at_mibs_sizes_from_a_keep_curve():
    """1000 heads, the empty circuit at 1, the model at 3, k kept at 1 + 2 k / 1000: f is the
    fraction of heads kept, CPR 0.4999995. 270 heads: 0.1 % and 0.2 % are the empty circuit (f =
    0); a size the run did not measure is NaN, not interpolated."""
    ks = [0, *sets.mib_ks(1000)[:-1]]
    curve = _keep(ks, [1 + 2 * k / 1000 for k in ks])
    sizes = faithfulness.mib_curve(curve, 1000, "logit_diff")
    np.testing.assert_allclose(sizes["f"], np.array(PERCENT) / 100)
    assert sizes["measured"].all()
    summary = faithfulness.curve_summary(curve, 1000, "logit_diff")
    assert summary["mib_sizes"] == 10 and summary["cpr"] == pytest.approx(0.4999995)
    assert np.isnan(summary["ci_low_cpr"])
    small = _keep([0, 1, 2, 5, 13, 27, 54], [1.0, 1.5, 2, 2, 2, 2, 2])
    sizes = faithfulness.mib_curve(small, 270, "logit_diff").set_index("percentage")
    assert sizes.loc[0.1, "k"] == 0 and sizes.loc[0.1, "f"] == 0.0
    assert sizes.loc[0.5, "f"] == pytest.approx(0.25) and sizes.loc[100, "f"] == 1.0
    assert not sizes.loc[50, "measured"] and np.isnan(sizes.loc[50, "f"])  # k = 135
    summary = faithfulness.curve_summary(small, 270, "logit_diff")
    assert summary["mib_sizes"] == 9 and np.isnan(summary["cpr"]) and np.isnan(summary["cmd"])
    no_empty = faithfulness.curve_summary(_keep([1, 2], [2.0, 2.0]), 4, "auc")
    assert no_empty["mib_sizes"] == 0  # without every head ablated there is no f


CURVE = {"site": "o_proj_input", "position": "last", "kind": "zero", "order": "screen"}


def _prompt_files(n=40, seed=0):
    """A baseline and a keep curve of 1000 heads (every one of MIB's sizes at least one head) on
    ``n`` prompts (half positive): the model's correct-label logit difference 2 (+ noise with
    ``seed``), every head ablated 0 + noise; keeping k heads gives the model's margins (f = 1 for
    the logit difference) or, with ``seed``, a random share of them per prompt, and noise."""
    rng = np.random.default_rng(seed)
    labels = np.tile([1, 0], n // 2)
    sign = np.where(labels == 1, 1.0, -1.0)
    base_ld = 2.0 + (rng.normal(0, 0.5, n) if seed else 0.0)
    base = _scored(
        pd.DataFrame({"prompt_id": np.arange(n), "label": labels, "draw": 0}), sign * base_ld
    )
    frames = []
    for k in [0, *sets.mib_ks(1000)[:-1]]:
        share = 0.0 if k == 0 else (1.0 if not seed else rng.uniform(0.2, 1.0, n))
        noise = rng.normal(0, 0.3, n) if k == 0 or seed else 0.0
        named = {**CURVE, "mode": "keep", "k": k}
        frames.append(_scored(base.assign(**named), sign * (share * base_ld + noise)))
    return base, frames


def _scored(frame: pd.DataFrame, margin) -> pd.DataFrame:
    out = frame.assign(margin=margin, calibrated_margin=margin)
    return out.assign(prediction=(out["margin"] > 0).astype(int))


def test_intervals_collapse_where_every_prompt_agrees():
    """Keeping any head restores every prompt's margin: f = 1 at every size on every resample, so
    the logit difference's CPR is 0.999 and its CMD 0 with intervals of width 0."""
    base, frames = _prompt_files()
    prompts = faithfulness.Prompts(base, frames, n_boot=200, seed=3)
    found = faithfulness.intervals(prompts.of({**CURVE, "mode": "keep"}), prompts, 1000)
    ld = found["logit_diff"]
    assert ld["ci_low_cpr"] == pytest.approx(0.999) and ld["ci_high_cpr"] == pytest.approx(0.999)
    assert ld["ci_low_cmd"] == pytest.approx(0.0) and ld["ci_high_cmd"] == pytest.approx(0.0)
    assert ld["ci_low_cpr_log"] == pytest.approx(1.0)
    assert prompts.of({**CURVE, "mode": "remove"}) == {}


def test_intervals_in_the_summary_bracket_the_estimate_and_are_seeded():
    base, frames = _prompt_files(seed=1)
    points = pd.DataFrame(
        [
            curves.point_row(f.assign(seed=0, n_heads=1000), base, n_boot=20, n_perm=20)
            for f in frames
        ]
    )
    prompts = faithfulness.Prompts(base, frames, n_boot=300, seed=5)
    summary = curves.summarize(points, 1000, prompts)
    out = summary.set_index("metric")
    for metric in ("logit_diff", "auc"):
        for m in faithfulness.MEASURES:
            row = out.loc[metric]
            assert row[f"ci_low_{m}"] <= row[m] <= row[f"ci_high_{m}"], (metric, m)
            assert row[f"ci_low_{m}"] < row[f"ci_high_{m}"]
    assert out.loc["logit_diff", "mib_sizes"] == 10
    again = curves.summarize(points, 1000, prompts)
    pd.testing.assert_frame_equal(summary, again)


def test_mib_node_json():
    ranking = pd.DataFrame(
        {"rank": [2, 1, 3], "layer": [0, 1, 0], "head": [1, 0, 0], "score": [0.5, 2.0, -1.0]}
    )
    cfg = {"n_layers": 2, "n_heads": 2, "d_model": 8, "parallel_attn_mlp": False}
    out = json.loads(faithfulness.mib_node_json(ranking, cfg))
    assert out["cfg"] == cfg and out["edges"] == {}
    assert list(out["nodes"]) == ["a1.h0", "a0.h1", "a0.h0"]  # best first
    assert out["nodes"]["a0.h0"] == {"in_graph": True, "score": -1.0}
    randoms = ranking.assign(score=np.nan)
    scores = json.loads(faithfulness.mib_node_json(randoms, cfg))["nodes"]
    assert [scores[n]["score"] for n in ("a1.h0", "a0.h1", "a0.h0")] == [1.0, 2 / 3, 1 / 3]
    # an exclusion order's unscored heads come last: below every scored head, in their order
    excluded = json.loads(faithfulness.mib_node_json(ranking.assign(score=[0.5, 2.0, np.nan]), cfg))
    assert excluded["nodes"]["a0.h0"]["score"] == -0.5
    with pytest.raises(ValueError, match=r"1 heads have no score \(e.g. a1.h0\), some ranked"):
        faithfulness.mib_node_json(ranking.assign(score=[0.5, np.nan, -1.0]), cfg)
    with pytest.raises(ValueError, match="needs d_model"):
        faithfulness.mib_node_json(ranking, {k: v for k, v in cfg.items() if k != "d_model"})
    assert faithfulness.mib_node_name(12, 3) == "a12.h3"


def test_mib_cfg_from_the_models_own_config():
    """d_model is the hidden size under each family's name; parallel attention and MLP where the
    config says so (GPT-NeoX's use_parallel_residual) or the family always has it (GPT-J)."""
    from transformers import GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig

    llama = faithfulness.mib_cfg(LlamaConfig(hidden_size=64).to_dict(), 2, 4)
    assert llama == {"n_layers": 2, "n_heads": 4, "d_model": 64, "parallel_attn_mlp": False}
    assert faithfulness.mib_cfg(GPT2Config(n_embd=32).to_dict(), 2, 4)["d_model"] == 32
    assert not faithfulness.mib_cfg(GPT2Config().to_dict(), 2, 4)["parallel_attn_mlp"]
    assert faithfulness.mib_cfg(GPTNeoXConfig().to_dict(), 2, 4)["parallel_attn_mlp"]
    neox = GPTNeoXConfig(use_parallel_residual=False).to_dict()
    assert not faithfulness.mib_cfg(neox, 2, 4)["parallel_attn_mlp"]
    assert faithfulness.mib_cfg(GPTJConfig().to_dict(), 2, 4)["parallel_attn_mlp"]
    with pytest.raises(ValueError, match="names no hidden size"):
        faithfulness.mib_cfg({"model_type": "llama"}, 2, 4)

"""Where in the prompt, end to end on a tiny random Llama (2 layers x 4 heads): every kind at the
demonstrations, the review, the last position and all positions, in the fast and the naive
method; the screen per segment; the segment map in the summary and its figure."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
from runs import snakemake, tiny_config

from headperturb.core import files

SEGMENT_POSITIONS = ["all", "demonstrations", "review", "last"]
INSIDE = ["label_words", "demonstration_2"]  # inside the demonstrations


@pytest.fixture(scope="module")
def segments_config(tiny_llama_dir, imdb_dir) -> dict:
    config = tiny_config(tiny_llama_dir, imdb_dir)
    config["run_name"] = "segments"
    config["perturbation"]["sweeps"] = [
        {
            "layers": [0],
            "heads": [0, 1],
            "kinds": ["zero", "mean", "noise", "patch"],
            "positions": SEGMENT_POSITIONS,
        },
        {"layers": [1], "heads": [0], "kinds": ["zero"], "positions": ["demonstrations", "review"]},
        {"layers": [0], "heads": [1], "kinds": ["zero", "patch"], "positions": INSIDE},
    ]
    config["screen"] = {
        "enabled": True,
        "kinds": ["zero", "patch"],
        "positions": [*SEGMENT_POSITIONS, *INSIDE],
    }
    return config


@pytest.fixture(scope="module")
def segments_run(tmp_path_factory, segments_config):
    workdir = tmp_path_factory.mktemp("segments")
    snakemake(workdir, segments_config)
    return workdir


def test_the_segment_map_is_summarised_and_drawn(segments_run):
    run = segments_run / "results/segments"
    text = (run / "summary.md").read_text()
    assert "## Where in the prompt" in text
    assert (
        "| layer | head | all positions | demonstration positions | review positions "
        "| last position | label-word positions | demonstration 2 positions |" in text
    )
    assert (run / "plots/segment_map.png").stat().st_size > 10_000
    for position in ("demonstrations", "review"):
        assert (run / f"perturb/o_proj_input/{position}/zero/layer0/head1.parquet").is_file()


def test_the_screen_is_compared_per_segment(segments_run):
    agreement = pd.read_csv(segments_run / "results/segments/screen/agreement.csv")
    assert set(SEGMENT_POSITIONS) <= set(agreement["position"])
    estimates = files.read_parquet(segments_run / "results/segments/screen/heads.parquet")
    assert set(estimates["position"]) == {*SEGMENT_POSITIONS, *INSIDE}


def test_a_segment_of_the_last_layer_takes_the_unperturbed_logits(segments_run):
    """Only the final position of the last layer reaches the logits: the job takes the
    baseline's logits, so its changes are exactly 0 (q = 1, acting nowhere), not float noise."""
    run = segments_run / "results/segments"
    base = files.read_parquet(run / "baseline/per_prompt.parquet").set_index("prompt_id")
    for position in ("demonstrations", "review"):
        path = run / f"perturb/o_proj_input/{position}/zero/layer1/head0.parquet"
        frame = files.read_parquet(path)
        margins = base.loc[frame["prompt_id"], "margin"].to_numpy()
        np.testing.assert_array_equal(frame["margin"].to_numpy(), margins)
        assert files.read_parquet_metadata(path)["engine"] == "unperturbed"
    table = files.read_parquet(run / "contributions.parquet")
    rows = table[(table["layer"] == 1) & table["position"].isin(["demonstrations", "review"])]
    rows = rows[rows["kind"] == "zero"]
    assert len(rows) == 2 and (rows["change_logit_diff"] == 0).all()
    assert (rows["q_value_logit_diff"] == 1).all() and not rows["significant"].any()


def test_each_segment_moves_the_margins_and_patched_demonstrations_do_not(segments_run):
    """From the per-prompt files: zero ablation of a first-layer head moves margins at every
    segment; patching its demonstrations from the partner (who shares them) moves none."""
    run = segments_run / "results/segments"
    base = files.read_parquet(run / "baseline/per_prompt.parquet").set_index("prompt_id")

    def shift(position, kind="zero", head=1):
        frame = files.read_parquet(
            run / f"perturb/o_proj_input/{position}/{kind}/layer0/head{head}.parquet"
        )
        return frame["margin"].to_numpy() - base.loc[frame["prompt_id"], "margin"].to_numpy()

    everything = np.abs(shift("all")).sum()
    assert everything > 0
    for position in ("demonstrations", "review", "last"):
        assert np.abs(shift(position)).sum() > 0, position
    np.testing.assert_array_equal(shift("demonstrations", "patch"), 0)  # the partner shares them
    for position in INSIDE:  # the label words and the second demonstration, from the tokenizer
        assert np.abs(shift(position)).sum() > 0, position
        np.testing.assert_array_equal(shift(position, "patch"), 0)


def test_naive_method_gives_the_same_numbers_at_every_segment(segments_run, segments_config):
    config = copy.deepcopy(segments_config)
    config["run_name"] = "segments-naive"
    config["perturbation"]["method"] = "naive"
    config["screen"]["enabled"] = False
    snakemake(segments_run, config)
    fast_dir, naive_dir = segments_run / "results/segments", segments_run / "results/segments-naive"
    names = sorted(p.relative_to(fast_dir) for p in (fast_dir / "perturb").rglob("*.parquet"))
    assert len(names) == 2 * 4 * 4 + 2 + 2 * 2
    for name in names:
        fast, naive = pd.read_parquet(fast_dir / name), pd.read_parquet(naive_dir / name)
        np.testing.assert_allclose(fast["margin"], naive["margin"], atol=1e-4, err_msg=str(name))

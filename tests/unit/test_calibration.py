"""The decision rule and the choice of demonstrations (headperturb.data.calibration), chosen on
development reviews from train: against hand computations, and blind to the test labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from tiny_models import model_params, run_step

from headperturb.core import files
from headperturb.data import calibration as cal
from headperturb.data.prompts import select_reviews
from headperturb.model import loading
from headperturb.workflow import steps


def test_threshold_maximises_development_accuracy_nearest_the_median():
    margins = np.array([-2.0, -1.0, 0.5, 1.0, 3.0, 4.0])
    labels = np.array([0, 0, 0, 1, 1, 1])
    t = cal.fit_threshold(margins, labels)
    assert t == pytest.approx(0.75)  # between 0.5 and 1.0: every review right
    assert (cal.Calibration("threshold", t).predict(margins) == labels).all()
    # two equally good cuts, -0.5 and 2.0 (each one review wrong): the one nearest the median
    # margin, 0.5
    assert cal.fit_threshold([-1.0, 0.0, 1.0, 3.0], [0, 1, 0, 1]) == pytest.approx(-0.5)
    with pytest.raises(cal.CalibrationError, match="needs development reviews"):
        cal.fit_threshold([], [])


def test_contextual_subtracts_the_mean_content_free_margin_and_none_nothing():
    fitted = cal.fit("contextual", content_free_margins=[0.5, 1.5, -0.5])
    assert fitted.offset == pytest.approx(0.5) and fitted.content_free_margin == pytest.approx(0.5)
    assert fitted.predict([0.4, 0.6]).tolist() == [0, 1]
    assert cal.fit("none").offset == 0.0 and cal.fit("none").predict([0.1, -0.1]).tolist() == [1, 0]
    with pytest.raises(cal.CalibrationError, match="allowed: none, threshold, contextual"):
        cal.fit("platt")


def test_development_scores_and_the_choice():
    scores = cal.dev_scores(cal.Calibration("threshold", 0.0), [-1.0, 1.0, 2.0, -3.0], [0, 1, 0, 0])
    assert scores["dev_accuracy"] == 0.75 and scores["dev_share_positive"] == 0.5
    assert scores["dev_auc"] == pytest.approx(2 / 3)
    rows = [
        {"candidate": 0, "dev_accuracy": 0.7},
        {"candidate": 1, "dev_accuracy": 0.8},
        {"candidate": 2, "dev_accuracy": 0.8},
    ]
    assert cal.choose(rows) == 1  # the first among equals


def test_development_reviews_are_train_reviews_apart_from_every_demonstration(imdb_sample):
    train, test = imdb_sample
    reviews = select_reviews(train, test, k_shot=4, n_test=20, seed=3, candidates=5, n_dev=40)
    demos = reviews[reviews["role"] == "candidate"]
    dev = reviews[reviews["role"] == "dev"]
    assert len(demos) == 20 and demos["source_row"].is_unique  # disjoint candidate sets
    assert not set(dev["source_row"]) & set(demos["source_row"])
    assert set(dev["source_row"]) <= set(train["row"])  # from train, never test
    assert dev["label"].value_counts().to_dict() == {0: 20, 1: 20}
    one = select_reviews(train, test, k_shot=4, n_test=20, seed=3)
    pd.testing.assert_frame_equal(  # candidate 0 and the test reviews as with one candidate
        one[one["role"] == "test"].reset_index(drop=True),
        reviews[reviews["role"] == "test"].reset_index(drop=True),
    )
    first = demos[demos["candidate"] == 0]["source_row"].tolist()
    assert one[one["role"] == "candidate"]["source_row"].tolist() == first


@pytest.mark.parametrize("method", ["threshold", "contextual"])
def test_no_choice_depends_on_test_labels(tmp_path, tiny_llama_dir, imdb_sample, method):
    """The same run with the test labels permuted: the demonstrations, the development scores
    and the calibration are identical (the test set differs: it is drawn by label counts)."""
    train, test = imdb_sample
    model_dir = tmp_path / "model"
    loading.prepare_model(str(tiny_llama_dir), model_dir)
    settings = {
        "k_shot": 2,
        "n_test": 10,
        "seed": 0,
        "candidates": 3,
        "n_dev": 12,
        "max_review_tokens": 15,
        "template": "Review: {text}\nSentiment: {label}",
        "separator": "\n\n",
        "verbalizers": [" negative", " positive"],
    }
    shuffled = test.assign(label=np.random.default_rng(1).permutation(test["label"].to_numpy()))
    chosen = []
    for name, test_split in (("original", test), ("permuted", shuffled)):
        data = tmp_path / name
        data.mkdir()
        train.drop(columns="row").to_parquet(data / "train.parquet")
        test_split.drop(columns="row").to_parquet(data / "test.parquet")
        run_step(
            steps.select_reviews,
            output={"reviews": data / "reviews.parquet"},
            params={"data": {"path": str(data), "hub_dataset": ""}, "prompts": settings},
        )
        out = {k: data / f"{k}.out" for k in ("prompts", "demonstrations", "info", "selection")}
        run_step(
            steps.build_prompts,
            input={"reviews": data / "reviews.parquet", "model": str(model_dir)},
            output=out,
            params={**model_params(), "prompts": settings, "calibration": method},
        )
        info = files.read_json(out["info"])
        chosen.append(
            (files.read_parquet(out["demonstrations"]), info["calibration"], info["selection"])
        )
    pd.testing.assert_frame_equal(chosen[0][0], chosen[1][0])
    assert chosen[0][1] == chosen[1][1] and chosen[0][2] == chosen[1][2]
    assert len(chosen[0][2]) == 3 and chosen[0][1]["method"] == method

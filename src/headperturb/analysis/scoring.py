"""From the two verbalizer logits to predictions, and the task metrics.

A prompt's *margin* is ``logit(positive) - logit(negative)`` at the last position. The decision
rule subtracts the run's calibration offset (0 for the original study's rule, see
:mod:`headperturb.data.calibration`): the prediction is positive (1) when ``margin - offset > 0``
and negative (0) otherwise. The offset is estimated once on the unperturbed model and applied
unchanged to every perturbation.

The metrics are a registry, :data:`METRICS`: each computes its value for many prompt weightings at
once (the bootstrap of :mod:`headperturb.analysis.stats` reweights prompts), and a plain evaluation
is the weighting of all ones. A new metric is one function registered here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

PER_PROMPT_COLUMNS = [
    "prompt_id",
    "label",
    "logit_negative",
    "logit_positive",
    "margin",
    "calibrated_margin",
    "prediction",
    "correct",
]


class NumericsError(FloatingPointError):
    """Logits that cannot be a measurement: not finite, or collapsed to one value."""


@dataclass(frozen=True)
class Metric:
    """``compute(weights (B, n), labels (n,), predictions (n,)) -> (B,)``; ``label`` names it in
    tables and plots."""

    label: str
    compute: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _accuracy(weights: np.ndarray, labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    return weights @ (preds == labels).astype(float) / weights.sum(axis=1)


def _macro_f1(weights: np.ndarray, labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """Macro-F1 over the two classes (the F1 of a class without true or predicted members is 0,
    as scikit-learn's ``zero_division=0``)."""
    pos, lab = preds == 1, labels == 1
    tp1, fp1 = weights @ (pos & lab), weights @ (pos & ~lab)
    fn1, tp0 = weights @ (~pos & lab), weights @ (~pos & ~lab)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1_1 = np.where(2 * tp1 + fp1 + fn1 > 0, 2 * tp1 / (2 * tp1 + fp1 + fn1), 0.0)
        f1_0 = np.where(2 * tp0 + fn1 + fp1 > 0, 2 * tp0 / (2 * tp0 + fn1 + fp1), 0.0)
    return (f1_0 + f1_1) / 2


METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", _accuracy),
    "f1": Metric("macro-F1", _macro_f1),
}
"""The task metrics, in table order; the first decides the impact categories."""


def interval_columns(metric: str) -> tuple[str, str]:
    """The run table's columns of the 95% interval of a metric's contribution: ``ci_low`` and
    ``ci_high`` for accuracy (the categories' metric), ``ci_low_<metric>`` otherwise."""
    return (
        ("ci_low", "ci_high") if metric == "accuracy" else (f"ci_low_{metric}", f"ci_high_{metric}")
    )


def metrics(labels, predictions) -> dict[str, float]:
    """Every metric of :data:`METRICS` on one set of predictions, and the number of prompts."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    ones = np.ones((1, len(labels)))
    out = {name: float(m.compute(ones, labels, predictions)[0]) for name, m in METRICS.items()}
    out["n_prompts"] = int(len(labels))
    return out


def check_logits(
    logits: np.ndarray, prompt_ids, what: str = "", context_free: bool = False
) -> None:
    """Raise :class:`NumericsError` for logits that cannot be a measurement: any that are not
    finite (the message names the prompts), or a collapse: every prompt's two logits equal, or
    every prompt given the same logits (a perturbation that overwhelmed the model's numerics).
    ``context_free``: the same logits for every prompt are a result, not a collapse (a set that
    ablates every head at the final position leaves it nothing to read the prompt with)."""
    where = f" ({what})" if what else ""
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        ids = np.asarray(prompt_ids)[bad].tolist()
        raise NumericsError(f"NaN or infinite logits{where} for prompt id(s) {ids[:20]}")
    if len(logits) > 1 and np.all(logits[:, 0] == logits[:, 1]):
        raise NumericsError(
            f"the two verbalizer logits are equal for every prompt{where}: the scores carry no "
            "information (lower the noise scale, or check the model and verbalizers)"
        )
    if len(logits) > 1 and np.all(logits == logits[0]) and not context_free:
        raise NumericsError(
            f"every prompt got the same logits {logits[0].tolist()}{where}: the perturbation "
            "overwhelmed the model's numerics (lower the noise scale or use model.dtype: float32)"
        )


def per_prompt_columns(
    prompt_ids, labels, logits, offset: float = 0.0, what: str = "", context_free: bool = False
):
    """One row per prompt as a dict of numpy columns (:data:`PER_PROMPT_COLUMNS`) from the (n, 2)
    logits of the negative and positive verbalizers; ``offset`` is the calibration's."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise ValueError(f"logits must have shape (n, 2), got {logits.shape}")
    check_logits(logits, prompt_ids, what, context_free)
    labels = np.asarray(labels, dtype=np.int64)
    margin = logits[:, 1] - logits[:, 0]
    calibrated = margin - float(offset)
    prediction = (calibrated > 0).astype(np.int64)
    return {
        "prompt_id": np.asarray(prompt_ids, dtype=np.int64),
        "label": labels,
        "logit_negative": logits[:, 0],
        "logit_positive": logits[:, 1],
        "margin": margin,
        "calibrated_margin": calibrated,
        "prediction": prediction,
        "correct": prediction == labels,
    }


def per_prompt(prompt_ids, labels, logits, offset: float = 0.0, what: str = ""):
    """:func:`per_prompt_columns` as a DataFrame."""
    import pandas as pd

    return pd.DataFrame(per_prompt_columns(prompt_ids, labels, logits, offset, what))

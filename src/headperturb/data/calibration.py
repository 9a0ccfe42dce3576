"""The decision rule, and the demonstrations, chosen on development reviews from train.

Scores are margins, ``logit(positive) - logit(negative)``. A calibration is one number, the
*offset* subtracted from every margin before its sign is read (:mod:`headperturb.analysis.scoring`):

- ``none``: offset 0, the original study's rule (positive when the margin is > 0);
- ``threshold``: the offset that maximises accuracy on the development reviews;
- ``contextual``: the mean margin of content-free inputs (``N/A``, an empty review, ``[MASK]``)
  put through the same demonstrations (Zhao et al. 2021, "Calibrate Before Use").

It is estimated once, on the unperturbed model, and applied unchanged to the baseline and every
perturbation: a head that shifts the model's bias is a finding, not something to calibrate away.
With several candidate demonstration sets, each is calibrated and scored on the development
reviews and the best one is used (:func:`choose`). No test review takes part in any choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("none", "threshold", "contextual")
CONTENT_FREE = ("N/A", "", "[MASK]")


class CalibrationError(ValueError):
    """A calibration that cannot be estimated from what it was given."""


def fit_threshold(margins, labels) -> float:
    """The offset ``t`` that maximises the accuracy of ``margin - t > 0`` on these reviews: the
    middle of a best interval between sorted margins; among equally good ones, the one nearest the
    median margin."""
    m = np.sort(np.asarray(margins, dtype=float))
    labels = np.asarray(labels)
    if len(m) == 0:
        raise CalibrationError("a threshold needs development reviews (prompts.n_dev > 0)")
    cuts = np.concatenate([[m[0] - 1.0], (m[:-1] + m[1:]) / 2, [m[-1] + 1.0]])
    margins = np.asarray(margins, dtype=float)
    accuracy = np.array([((margins - t > 0).astype(int) == labels).mean() for t in cuts])
    best = cuts[accuracy >= accuracy.max() - 1e-12]
    return float(best[np.argmin(np.abs(best - np.median(margins)))])


@dataclass(frozen=True)
class Calibration:
    """A fitted decision rule: ``method`` and the ``offset`` subtracted from every margin."""

    method: str
    offset: float = 0.0
    content_free_margin: float | None = None

    def predict(self, margins) -> np.ndarray:
        return (np.asarray(margins, dtype=float) - self.offset > 0).astype(np.int64)

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "offset": float(self.offset),
            "content_free_margin": self.content_free_margin,
        }


def fit(method: str, dev_margins=None, dev_labels=None, content_free_margins=None) -> Calibration:
    """The calibration of ``method`` from development margins and labels (``threshold``) or the
    margins of the content-free inputs (``contextual``)."""
    if method == "none":
        return Calibration("none")
    if method == "threshold":
        return Calibration("threshold", fit_threshold(dev_margins, dev_labels))
    if method == "contextual":
        if content_free_margins is None or len(content_free_margins) == 0:
            raise CalibrationError("contextual calibration needs the content-free inputs' margins")
        mean = float(np.mean(content_free_margins))
        return Calibration("contextual", mean, mean)
    raise CalibrationError(f"calibration {method!r} is not allowed; allowed: {', '.join(METHODS)}")


def dev_scores(calibration: Calibration, margins, labels) -> dict:
    """Accuracy, share predicted positive and ROC AUC of a candidate on the development reviews."""
    labels = np.asarray(labels)
    pred = calibration.predict(margins)
    out = {
        "dev_accuracy": float((pred == labels).mean()) if len(labels) else float("nan"),
        "dev_share_positive": float(pred.mean()) if len(labels) else float("nan"),
    }
    if len(set(labels.tolist())) == 2:
        from sklearn.metrics import roc_auc_score

        out["dev_auc"] = float(roc_auc_score(labels, margins))
    return out


def choose(rows: list[dict]) -> int:
    """The candidate with the best development accuracy (the first among equals)."""
    scores = [r.get("dev_accuracy", float("nan")) for r in rows]
    if any(np.isnan(scores)):
        return int(rows[0]["candidate"])
    return int(rows[int(np.argmax(scores))]["candidate"])

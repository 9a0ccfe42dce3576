"""From the two verbalizer logits to predictions, accuracy and F1.

A prompt's *margin* is ``logit(positive) - logit(negative)`` at the last position; the prediction is
positive (1) when the margin is > 0 and negative (0) otherwise.
"""

from __future__ import annotations

import numpy as np

PER_PROMPT_COLUMNS = [
    "prompt_id",
    "label",
    "logit_negative",
    "logit_positive",
    "margin",
    "prediction",
    "correct",
]


class NumericsError(FloatingPointError):
    """Logits that are NaN or infinite."""


def per_prompt(prompt_ids, labels, logits: np.ndarray):
    """One row per prompt (a DataFrame of :data:`PER_PROMPT_COLUMNS`) from the (n, 2) logits of the
    negative and positive verbalizers."""
    import pandas as pd

    return pd.DataFrame(per_prompt_columns(prompt_ids, labels, logits))


def per_prompt_columns(prompt_ids, labels, logits: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`per_prompt` as a dict of numpy columns (no pandas: light jobs write it directly)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise ValueError(f"logits must have shape (n, 2), got {logits.shape}")
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        ids = np.asarray(prompt_ids)[bad].tolist()
        raise NumericsError(f"NaN or infinite logits for prompt id(s) {ids[:20]}")
    labels = np.asarray(labels, dtype=np.int64)
    margin = logits[:, 1] - logits[:, 0]
    prediction = (margin > 0).astype(np.int64)
    return {
        "prompt_id": np.asarray(prompt_ids, dtype=np.int64),
        "label": labels,
        "logit_negative": logits[:, 0],
        "logit_positive": logits[:, 1],
        "margin": margin,
        "prediction": prediction,
        "correct": prediction == labels,
    }


def metrics(labels, predictions) -> dict[str, float]:
    """Accuracy and macro-F1 over the two classes (scikit-learn; F1 of an absent class is 0)."""
    from sklearn.metrics import accuracy_score, f1_score

    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1": float(f1_score(labels, predictions, average="macro", labels=[0, 1], zero_division=0)),
        "n_prompts": int(len(labels)),
    }

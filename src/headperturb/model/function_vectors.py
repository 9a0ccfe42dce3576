"""The function-vector score of every head (Todd et al. 2024): how much of the task its mean
output carries into prompts whose demonstrations no longer show it.

The demonstrations' label words are shuffled (one seeded permutation that changes them, each
label word the tokens it has in the prompt; every prompt shares the demonstrations, so every
prompt gets the same shuffle): the corrupted prompts (:func:`shuffled_labels`). Each head's
final-position output averaged over the clean prompts (the baseline's final state) is patched
into the corrupted prompts' final position, and the score is the gain of the correct-label
logit difference over the corrupted prompts unpatched, per prompt (Todd et al.'s average
indirect effect, on the logit difference rather than the label's probability).

Exact and cheap: the corrupted prompts are run once (their final state and keys and values
recorded), then each head's edit runs the final token alone through the layers above it
(:func:`headperturb.model.final_token.final_position`).
"""

from __future__ import annotations

import logging

import numpy as np

from headperturb.analysis.stats import correct_logit_diff
from headperturb.core.kinds import build
from headperturb.data.parts import LABEL_WORDS
from headperturb.model.engine import Engine
from headperturb.model.final_token import final_position
from headperturb.model.hooks import Edit

log = logging.getLogger("headperturb")


class FunctionVectorError(ValueError):
    """Demonstrations whose labels cannot be shuffled."""


def _label_spans(parts: np.ndarray, prefix_len: int) -> list[tuple[int, int]]:
    """The demonstrations' label words as (start, stop) token spans of the prefix."""
    is_label = np.asarray(parts[:prefix_len]) == LABEL_WORDS
    edges = np.flatnonzero(np.diff(np.concatenate([[0], is_label.astype(int), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def shuffled_labels(ids: list, parts: np.ndarray, prefix_len: int, seed: int):
    """(the prompts with their demonstrations' label words permuted, their shared prefix's
    length): one seeded permutation of the label words (each a span of tokens, ``parts`` the
    first prompt's), drawn until the sequence of labels changes."""
    first = [int(t) for t in ids[0]]
    spans = _label_spans(parts, prefix_len)
    words = [tuple(first[a:b]) for a, b in spans]
    if len(set(words)) < 2:
        raise FunctionVectorError(
            "the demonstrations all have one label: there is nothing to shuffle for the "
            "function-vector score (set anatomy.function_vectors: false, or use k_shot >= 2)"
        )
    rng = np.random.default_rng([int(seed), 31])
    shuffled = words
    while shuffled == words:
        shuffled = [words[i] for i in rng.permutation(len(words))]
    prefix, at = [], 0
    for (start, stop), word in zip(spans, shuffled):
        prefix += first[at:start] + list(word)
        at = stop
    prefix += first[at:prefix_len]
    corrupted = [np.asarray(prefix + [int(t) for t in x[prefix_len:]], dtype=np.int64) for x in ids]
    return corrupted, len(prefix)


def scores(engine, sites, clean_state: dict, corrupted: tuple, labels, progress=None) -> np.ndarray:
    """(n_prompts, n_layers, n_heads): per corrupted prompt (``corrupted``: the prompts and their
    prefix's length, :func:`shuffled_labels`), the gain of the correct-label logit difference
    when a head's final-position output is its mean over the clean prompts."""
    corrupted, prefix_len = corrupted
    engine = Engine(engine.model, prefix_len, engine.token_ids)
    prompt_ids = list(range(len(corrupted)))
    recorded = engine.baseline(corrupted, sites, keys_values=True)  # one pass records both
    kv = recorded.keys_values
    before = correct_logit_diff(labels, _margin(recorded.logits))
    log.info(
        "the prompts with shuffled labels: mean correct-label logit difference %.3f (the clean "
        "prompts': the baseline's)",
        float(before.mean()),
    )
    replace = build("mean").apply  # the head's columns set to the values
    out = np.empty((len(corrupted), len(sites), sites[0].n_heads))
    for j, site in enumerate(sites):
        z = clean_state[f"z.{site.layer}"].double()
        z = z.reshape(z.shape[0], site.n_heads, site.head_dim).mean(0)
        for head in range(site.n_heads):
            mean = z[head].float().view(1, 1, -1)
            edit = Edit(site, head, "o_proj_input", lambda *_, v=mean: v, replace, 1, "last")
            logits = final_position(engine, recorded.final_state, kv, prompt_ids, edit)[:, 0]
            out[:, j, head] = correct_logit_diff(labels, _margin(logits)) - before
        if progress is not None:
            progress.update(1)
    return out


def _margin(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    return logits[..., 1] - logits[..., 0]

"""The parts of a prompt, token by token: where a head looks (:mod:`headperturb.model.attention`).

A prompt is the shared prefix (the demonstrations, each ``template`` with its review and label
word, each followed by the separator) and the query (the template around the test review, cut
before the label). Every token belongs to one of :data:`PARTS`:

- ``first``: the prompt's first token (where heads that have nothing to do park their
  attention: the attention sink);
- ``demonstrations``: the demonstrations' review texts;
- ``label_words``: the demonstrations' label words (the verbalizer tokens; Wang et al. 2023's
  "anchors");
- ``template``: the template's words and the separators, in the prefix and before the test review;
- ``review``: the test review's text;
- ``final_template``: the template after the test review (``"\\nSentiment:"``), the final position
  among them.

A token is given the part of most of its characters (a label word's when it has any of one; a
tie goes to the text over the template), the prompt's first token ``first``. The parts come from
the prompt's text and the tokenizer's character offsets; the token ids must be those the run
stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

PARTS = ("first", "demonstrations", "label_words", "template", "review", "final_template")
FIRST, DEMONSTRATIONS, LABEL_WORDS, TEMPLATE, REVIEW, FINAL_TEMPLATE = range(len(PARTS))


class PartsError(ValueError):
    """A prompt whose parts cannot be told from its text and tokens."""


def _pieces(template: str, verbalizer: str) -> tuple[str, str, str]:
    """(before the text, between text and label, after the label), as the prompts are built
    (:class:`headperturb.data.prompts.Template`)."""
    at_text, at_label = template.index("{text}"), template.index("{label}")
    between = template[at_text + len("{text}") : at_label]
    if verbalizer[:1].isspace():
        between = between.rstrip(" ")
    return template[:at_text], between, template[at_label + len("{label}") :]


def _examples(prefix: str, template: str, separator: str, verbalizers):
    """The demonstrations of ``prefix`` in order, as regular-expression matches (groups ``text``
    and ``label``; each match runs through its separator)."""
    before, between, after = _pieces(template, verbalizers[0])
    words = "|".join(re.escape(v) for v in sorted(verbalizers, key=len, reverse=True))
    example = re.compile(
        re.escape(before)
        + "(?P<text>.*?)"
        + re.escape(between)
        + f"(?P<label>{words})"
        + re.escape(after + separator),
        re.DOTALL,
    )
    found, at = [], 0
    while at < len(prefix):
        match = example.match(prefix, at)
        if match is None:
            raise PartsError(
                f"the prompts' prefix does not read as demonstrations of the template "
                f"{template!r} from character {at}: {prefix[at : at + 60]!r}"
            )
        found.append(match)
        at = match.end()
    return found


def prefix_chars(prefix: str, template: str, separator: str, verbalizers) -> np.ndarray:
    """(len(prefix),) the part of each character of the demonstrations' prefix."""
    chars = np.full(len(prefix), TEMPLATE, dtype=np.int8)
    for found in _examples(prefix, template, separator, verbalizers):
        chars[found.start("text") : found.end("text")] = DEMONSTRATIONS
        chars[found.start("label") : found.end("label")] = LABEL_WORDS
    return chars


def query_chars(query: str, review: str, template: str, verbalizer: str) -> np.ndarray:
    """(len(query),) the part of each character of a query (the template around the review)."""
    before, between, _ = _pieces(template, verbalizer)
    if query != before + review + between:
        raise PartsError(f"a query is not the template around its review: {query[:60]!r}")
    chars = np.full(len(query), TEMPLATE, dtype=np.int8)
    chars[len(before) : len(before) + len(review)] = REVIEW
    chars[len(before) + len(review) :] = FINAL_TEMPLATE
    return chars


def token_parts(chars: np.ndarray, offsets) -> np.ndarray:
    """(n_tokens,) each token's part from its characters' parts: a label word's where it has
    one, else the part of most of its characters, a tie going to the text over the template (the
    template's for a token of no characters)."""
    out = np.full(len(offsets), TEMPLATE, dtype=np.int8)
    for i, (start, end) in enumerate(offsets):
        if end <= start:
            continue
        counts = np.bincount(chars[start:end], minlength=len(PARTS)).astype(float)
        counts[TEMPLATE] -= 0.5  # a tie goes to the text: " T" of "Review: This" is the review's
        out[i] = LABEL_WORDS if counts[LABEL_WORDS] else int(np.argmax(counts))
    return out


def _encoded(tokenizer, text: str, special: bool, stored, what: str):
    encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != [int(t) for t in stored]:
        raise PartsError(
            f"the tokenizer does not give the run's token ids for {what}: the prompts were built "
            "with another tokenizer (rerun the prompts: snakemake --cores all --forcerun "
            "build_prompts)"
        )
    return encoded["offset_mapping"]


def prompt_parts(info: dict, prompts, tokenizer) -> list[np.ndarray]:
    """Per prompt (the rows of ``prompts.parquet``: ``review``, ``prompt``, ``input_ids``), each
    token's part (:data:`PARTS`), from ``prompt_info.json``'s prefix, template, separator and
    verbalizers and the tokenizer's offsets."""
    prefix, template = info["prefix_text"], info["template"]
    verbalizers, n_prefix = info["verbalizers"], int(info["prefix_len"])
    first_ids = prompts["input_ids"].iloc[0][:n_prefix]
    offsets = _encoded(tokenizer, prefix, True, first_ids, "the demonstrations")
    prefix_part = token_parts(
        prefix_chars(prefix, template, info["separator"], verbalizers), offsets
    )
    out = []
    for review, prompt, ids in zip(prompts["review"], prompts["prompt"], prompts["input_ids"]):
        query = prompt[len(prefix) :]
        offsets = _encoded(tokenizer, query, False, ids[n_prefix:], "a test review's query")
        chars = query_chars(query, review, template, verbalizers[0])
        parts = np.concatenate([prefix_part, token_parts(chars, offsets)])
        parts[0] = FIRST
        out.append(parts)
    return out


@dataclass(frozen=True)
class Prefix:
    """Where things lie in the shared demonstrations (the first ``length`` tokens of every
    prompt): the token positions of their label words, and each demonstration's ``[start,
    stop)`` (the demonstrations tile the prefix, in order). What the positions ``label_words``
    and ``demonstration_<i>`` edit (:func:`headperturb.model.hooks.segment`)."""

    length: int = 0
    label_words: tuple[int, ...] = ()
    demonstrations: tuple[tuple[int, int], ...] = ()


def prefix_layout(info: dict, first_ids, tokenizer) -> Prefix:
    """The run's :class:`Prefix`, from ``prompt_info.json`` (``info``), a prompt's token ids
    (``first_ids``: the prefix is every prompt's first ``prefix_len``) and the tokenizer's
    offsets. A token belongs to the demonstration its first character is in (the prompt's first
    token to the first); it is a label word where :func:`token_parts` says so."""
    prefix, n_prefix = info["prefix_text"], int(info["prefix_len"])
    offsets = _encoded(tokenizer, prefix, True, first_ids[:n_prefix], "the demonstrations")
    template, verbalizers = info["template"], info["verbalizers"]
    parts = token_parts(prefix_chars(prefix, template, info["separator"], verbalizers), offsets)
    ends = [m.end() for m in _examples(prefix, template, info["separator"], verbalizers)]
    if not ends:  # no demonstrations (k_shot: 0)
        return Prefix(n_prefix)
    starts = np.array([start for start, _end in offsets])
    which = np.minimum(np.searchsorted(ends, starts, side="right"), len(ends) - 1)
    spans = []
    for i in range(len(ends)):
        at = np.flatnonzero(which == i)
        if not len(at):
            raise PartsError(f"demonstration {i + 1} of the prefix has no token of its own")
        spans.append((int(at[0]), int(at[-1]) + 1))
    labels = tuple(int(t) for t in np.flatnonzero(parts == LABEL_WORDS))
    return Prefix(n_prefix, labels, tuple(spans))

"""k-shot prompt construction.

Every prompt is the same shared prefix (the k demonstrations, balanced and interleaved by label:
negative, positive, negative, ...) followed by one test review:

    <demo 1>SEP<demo 2>SEP ... <demo k>SEP<query>

where a demonstration is the template with its label word filled in and the query is the template
cut just before ``{label}``. The prompt's token ids are the prefix's ids followed by the query's
ids, each tokenized on its own, so every prompt begins with exactly the same ids and the prefix can
be computed once and cached. The label is read from the next-token logits of the first token of
each verbalizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .data import clean_text

LABEL_NAMES = ("negative", "positive")  # index = label id


class PromptError(ValueError):
    """The prompt settings cannot be satisfied by the data, the template or the tokenizer."""


@dataclass(frozen=True)
class Template:
    """A template with ``{text}`` and ``{label}`` placeholders, ``{label}`` after ``{text}``."""

    template: str

    def __post_init__(self):
        for key in ("{text}", "{label}"):
            if self.template.count(key) != 1:
                raise PromptError(
                    f"template {self.template!r} must contain {key} exactly once "
                    "(placeholders: {text} and {label})"
                )
        if self.template.index("{text}") > self.template.index("{label}"):
            raise PromptError(f"template {self.template!r}: {{label}} must come after {{text}}")

    def _before(self, text: str, verbalizer: str) -> str:
        before = self.template[: self.template.index("{label}")].replace("{text}", text)
        # the verbalizer carries its own leading space (" positive"), so the query ends at "Sentiment:"
        return before.rstrip(" ") if verbalizer[:1].isspace() else before

    def query(self, text: str, verbalizer: str) -> str:
        return self._before(text, verbalizer)

    def example(self, text: str, verbalizer: str) -> str:
        after = self.template[self.template.index("{label}") + len("{label}") :]
        return self._before(text, verbalizer) + verbalizer + after


def select_balanced(
    frame: pd.DataFrame, n: int, seed: int, what: str, interleave: bool = False
) -> pd.DataFrame:
    """``n`` rows, half of each label (the extra one positive when ``n`` is odd), seeded.

    The rows come shuffled, or with ``interleave`` in the order negative, positive, negative, ...
    (used for the demonstrations: a random order can end on a run of one label, and small models
    then answer that label for everything).
    """
    if n < 1:
        raise PromptError(f"{what}: the number of reviews must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    wanted = {0: n // 2, 1: n - n // 2}
    parts = []
    for label, count in wanted.items():
        pool = frame.index[frame["label"] == label]
        if count > len(pool):
            raise PromptError(
                f"{what}: asked for {count} reviews with label {label} ({LABEL_NAMES[label]}); "
                f"the split offers {len(pool)}"
            )
        parts.append(rng.choice(pool, size=count, replace=False))
    if interleave:
        order = [part[i] for i in range(max(map(len, parts))) for part in parts if i < len(part)]
        chosen = np.asarray(order)
    else:
        chosen = np.concatenate(parts)
        rng.shuffle(chosen)
    return frame.loc[chosen].reset_index(drop=True)


def truncate_tokens(text: str, tokenizer, max_tokens: int) -> str:
    """``text`` cut to at most ``max_tokens`` tokens (decoded back to text, stripped)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens]).strip()


def verbalizer_token_ids(tokenizer, verbalizers: tuple[str, str]) -> list[int]:
    """The first token id of each verbalizer; they must differ."""
    ids = []
    for word in verbalizers:
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise PromptError(f"verbalizer {word!r} tokenizes to nothing")
        ids.append(int(tokens[0]))
    if ids[0] == ids[1]:
        raise PromptError(
            f"verbalizers {verbalizers[0]!r} and {verbalizers[1]!r} start with the same token "
            f"({ids[0]}): the label could not be read from the next-token logits; choose words "
            "whose first tokens differ"
        )
    return ids


@dataclass
class PromptSet:
    prompts: pd.DataFrame  # one row per test prompt
    demonstrations: pd.DataFrame  # one row per demonstration, in prompt order
    info: dict  # prefix, verbalizers and their token ids


def build_prompts(
    train: pd.DataFrame,
    test: pd.DataFrame,
    tokenizer,
    *,
    k_shot: int,
    n_test: int,
    max_review_tokens: int,
    template: str,
    verbalizers: tuple[str, str],
    separator: str,
    seed: int,
    context_length: int | None,
) -> PromptSet:
    """Build the k-shot prompts. See the module docstring for their layout."""
    tpl = Template(template)
    verbalizers = tuple(verbalizers)
    token_ids = verbalizer_token_ids(tokenizer, verbalizers)
    if verbalizers[0][:1].isspace() != verbalizers[1][:1].isspace():
        raise PromptError(
            f"verbalizers {verbalizers!r}: both or neither must start with white space"
        )
    if max_review_tokens < 1:
        raise PromptError(f"max_review_tokens must be >= 1, got {max_review_tokens}")

    def prepare(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        frame["text"] = [
            truncate_tokens(clean_text(t), tokenizer, max_review_tokens) for t in frame["text"]
        ]
        return frame

    demos = (
        prepare(select_balanced(train, k_shot, seed, "k_shot demonstrations", interleave=True))
        if k_shot
        else train.iloc[:0].assign(text=[])
    )
    queries = prepare(select_balanced(test, n_test, seed + 1, "n_test reviews from test"))

    prefix_text = "".join(
        tpl.example(t, verbalizers[int(lab)]) + separator
        for t, lab in zip(demos["text"], demos["label"])
    )
    prefix_ids = tokenizer(prefix_text, add_special_tokens=True)["input_ids"]
    rows = []
    for i, (text, label, row) in enumerate(zip(queries["text"], queries["label"], queries["row"])):
        query = tpl.query(text, verbalizers[0])  # never the true label's word: no leakage
        ids = list(prefix_ids) + tokenizer(query, add_special_tokens=False)["input_ids"]
        rows.append(
            {
                "prompt_id": i,
                "source_row": int(row),
                "label": int(label),
                "review": text,
                "prompt": prefix_text + query,
                "input_ids": ids,
                "n_tokens": len(ids),
            }
        )
    prompts = pd.DataFrame(rows)
    longest = int(prompts["n_tokens"].max())
    if context_length is not None and longest + 1 > context_length:
        raise PromptError(
            f"the longest prompt has {longest} tokens; the model's context is {context_length}: "
            "lower prompts.k_shot or prompts.max_review_tokens"
        )
    demonstrations = pd.DataFrame(
        {
            "position": range(len(demos)),
            "source_row": demos["row"].astype("int64").to_numpy(),
            "label": demos["label"].astype("int64").to_numpy(),
            "review": demos["text"].to_numpy(),
        }
    )
    info = {
        "prefix_text": prefix_text,
        "prefix_len": len(prefix_ids),
        "verbalizers": list(verbalizers),
        "verbalizer_token_ids": token_ids,
        "label_names": list(LABEL_NAMES),
        "max_tokens": longest,
        "mean_tokens": float(prompts["n_tokens"].mean()),
    }
    return PromptSet(prompts, demonstrations, info)

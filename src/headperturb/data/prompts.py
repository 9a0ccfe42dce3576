"""k-shot prompt construction: which reviews a run uses, and their token ids.

:func:`select_reviews` picks the reviews (candidate demonstration sets and development reviews
from train, test reviews from test) and :func:`tokenize_prompts` turns them into prompts. Every
prompt is the same shared prefix (the k demonstrations, balanced and interleaved by label:
negative, positive, negative, ...) followed by one test review:

    <demo 1>SEP<demo 2>SEP ... <demo k>SEP<query>

where a demonstration is the template with its label word filled in and the query is the template
cut just before ``{label}``. The prompt's token ids are the prefix's ids followed by the query's
ids, each tokenized on its own, so every prompt begins with exactly the same ids and the prefix can
be computed once and cached. The label is read from the next-token logits of the first token of
each verbalizer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from headperturb.data.imdb import clean_text

LABEL_NAMES = ("negative", "positive")  # index = label id


class PromptError(ValueError):
    """The prompt settings cannot be satisfied by the data, the template or the tokenizer."""


@dataclass(frozen=True)
class Template:
    """A template with ``{text}`` and ``{label}`` placeholders, ``{label}`` after ``{text}``."""

    template: str

    def __post_init__(self):
        from headperturb.core.checks import check_template
        from headperturb.core.spec import SpecError

        try:
            check_template(self.template)
        except SpecError as exc:
            raise PromptError(str(exc)) from None

    def _before(self, text: str, verbalizer: str) -> str:
        before = self.template[: self.template.index("{label}")].replace("{text}", text)
        # the verbalizer carries its own leading space (" positive"), so the query ends at
        # "Sentiment:"
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


def _seed(seed: int, *parts) -> int:
    """A seed derived from ``seed`` and ``parts`` (independent streams for each role)."""
    key = "|".join([str(int(seed)), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def select_reviews(
    train: pd.DataFrame,
    test: pd.DataFrame,
    *,
    k_shot: int,
    n_test: int,
    seed: int,
    candidates: int = 1,
    n_dev: int = 0,
) -> pd.DataFrame:
    """Which reviews a run uses, with their role: ``candidates`` disjoint sets of ``k_shot``
    demonstrations from train (balanced, interleaved by label), ``n_dev`` development reviews from
    the rest of train (balanced, disjoint from every candidate), ``n_test`` test reviews
    (balanced). Test labels never influence a choice: test reviews are drawn apart, by label
    counts only. Candidate 0 and the test reviews are the same as with one candidate.

    Columns: role, candidate (-1 unless a demonstration), position, source_row, label, text.
    """
    parts, pool = [], train
    for c in range(candidates):
        what = f"k_shot demonstrations (candidate {c + 1} of {candidates})"
        demos = pool.iloc[:0]
        if k_shot:
            demo_seed = seed if c == 0 else _seed(seed, "candidate", c)
            demos = select_balanced(pool, k_shot, demo_seed, what, interleave=True)
        parts.append(demos.assign(role="candidate", candidate=c, position=range(len(demos))))
        pool = pool[~pool["row"].isin(demos["row"])]
    if n_dev:
        what = "n_dev development reviews from train (apart from the candidates)"
        dev = select_balanced(pool, n_dev, _seed(seed, "dev"), what)
        parts.append(dev.assign(role="dev", candidate=-1, position=range(n_dev)))
    queries = select_balanced(test, n_test, seed + 1, "n_test reviews from test")
    parts.append(queries.assign(role="test", candidate=-1, position=range(n_test)))
    frame = pd.concat(parts, ignore_index=True)
    frame = frame.rename(columns={"row": "source_row"})
    frame["text"] = [clean_text(t) for t in frame["text"]]
    columns = ["role", "candidate", "position", "source_row", "label", "text"]
    return frame[columns].astype({"candidate": "int64", "position": "int64", "label": "int64"})


@dataclass
class PromptSet:
    """A run's prompts: each candidate's shared prefix, and the queries of every role.

    ``prefixes`` has one row per candidate (candidate, prefix_text, prefix_ids); ``queries`` one
    row per dev or test review (role, prompt_id, source_row, label, review, query, query_ids);
    ``demonstrations`` one row per demonstration of every candidate.
    """

    prefixes: pd.DataFrame
    queries: pd.DataFrame
    demonstrations: pd.DataFrame
    info: dict

    def prompts(self, candidate: int = 0, role: str = "test") -> pd.DataFrame:
        """The prompts of ``role`` with ``candidate``'s demonstrations: one row per review with
        its prompt text, token ids and length."""
        prefix = self.prefixes.loc[self.prefixes["candidate"] == candidate].iloc[0]
        rows = self.queries[self.queries["role"] == role].reset_index(drop=True)
        ids = [list(prefix["prefix_ids"]) + list(q) for q in rows["query_ids"]]
        return pd.DataFrame(
            {
                "prompt_id": rows["prompt_id"],
                "source_row": rows["source_row"],
                "label": rows["label"],
                "review": rows["review"],
                "prompt": [prefix["prefix_text"] + q for q in rows["query"]],
                "input_ids": ids,
                "n_tokens": [len(x) for x in ids],
            }
        )

    def demonstrations_of(self, candidate: int) -> pd.DataFrame:
        demos = self.demonstrations[self.demonstrations["candidate"] == candidate]
        return demos.drop(columns=["candidate"]).reset_index(drop=True)

    def prefix_len(self, candidate: int) -> int:
        return len(self.prefixes.loc[self.prefixes["candidate"] == candidate, "prefix_ids"].iloc[0])


def tokenize_prompts(
    reviews: pd.DataFrame,
    tokenizer,
    *,
    max_review_tokens: int,
    template: str,
    verbalizers: tuple[str, str],
    separator: str,
    context_length: int | None,
) -> PromptSet:
    """The prompts of the reviews of :func:`select_reviews`. See the module docstring for their
    layout."""
    tpl = Template(template)
    verbalizers = tuple(verbalizers)
    token_ids = verbalizer_token_ids(tokenizer, verbalizers)
    _check(reviews, verbalizers, max_review_tokens)
    reviews = reviews.assign(
        text=[truncate_tokens(t, tokenizer, max_review_tokens) for t in reviews["text"]]
    )
    demos = reviews[reviews["role"] == "candidate"]
    prefixes = [
        _prefix(demos[demos["candidate"] == c], int(c), tpl, verbalizers, separator, tokenizer)
        for c in sorted(demos["candidate"].unique()) or [0]
    ]
    queries = _queries(reviews[reviews["role"] != "candidate"], tpl, verbalizers[0], tokenizer)
    longest = max(len(p["prefix_ids"]) for p in prefixes) + max(map(len, queries["query_ids"]))
    if context_length is not None and longest + 1 > context_length:
        raise PromptError(
            f"the longest prompt has {longest} tokens; the model's context is {context_length}: "
            "lower prompts.k_shot or prompts.max_review_tokens"
        )
    demonstrations = pd.DataFrame(
        {
            "candidate": demos["candidate"].to_numpy(),
            "position": demos["position"].to_numpy(),
            "source_row": demos["source_row"].to_numpy(),
            "label": demos["label"].to_numpy(),
            "review": demos["text"].to_numpy(),
        }
    )
    info = {
        "verbalizers": list(verbalizers),
        "verbalizer_token_ids": token_ids,
        "label_names": list(LABEL_NAMES),
        "template": template,
        "separator": separator,
    }
    return PromptSet(pd.DataFrame(prefixes), queries, demonstrations, info)


def _check(reviews: pd.DataFrame, verbalizers: tuple[str, str], max_review_tokens: int) -> None:
    """Raise :class:`PromptError` for verbalizers of which one starts with white space and the
    other not, a review length below one token, or a review that is not text."""
    if verbalizers[0][:1].isspace() != verbalizers[1][:1].isspace():
        raise PromptError(
            f"verbalizers {verbalizers!r}: both or neither must start with white space"
        )
    if max_review_tokens < 1:
        raise PromptError(f"max_review_tokens must be >= 1, got {max_review_tokens}")
    for text in reviews["text"]:
        if not isinstance(text, str):
            raise PromptError(f"a review is {type(text).__name__}, not text: {text!r}")


def _prefix(demos, candidate: int, tpl: Template, verbalizers, separator: str, tokenizer) -> dict:
    """One candidate's shared prefix: its demonstrations in order, each labelled and followed by
    the separator, as text and token ids."""
    rows = demos.sort_values("position")
    text = "".join(
        tpl.example(t, verbalizers[int(lab)]) + separator
        for t, lab in zip(rows["text"], rows["label"])
    )
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return {"candidate": candidate, "prefix_text": text, "prefix_ids": ids}


def _queries(reviews: pd.DataFrame, tpl: Template, verbalizer: str, tokenizer) -> pd.DataFrame:
    """The dev and test reviews' queries: the template cut before the label, as text and token
    ids (``verbalizer`` decides only whether the query ends before a space)."""
    reviews = reviews.reset_index(drop=True)
    texts = [tpl.query(t, verbalizer) for t in reviews["text"]]  # never the label's word
    return pd.DataFrame(
        {
            "role": reviews["role"],
            "prompt_id": reviews["position"],
            "source_row": reviews["source_row"],
            "label": reviews["label"],
            "review": reviews["text"],
            "query": texts,
            "query_ids": [tokenizer(q, add_special_tokens=False)["input_ids"] for q in texts],
        }
    )


def content_free_queries(tokenizer, template: str, verbalizers, inputs) -> list[list[int]]:
    """The token ids of the queries with content-free texts (contextual calibration)."""
    tpl = Template(template)
    return [
        tokenizer(tpl.query(t, verbalizers[0]), add_special_tokens=False)["input_ids"]
        for t in inputs
    ]


def prompt_info(prompt_set: PromptSet, candidate: int, prompts: pd.DataFrame, **extra) -> dict:
    """The run's ``prompt_info.json``: the chosen prefix, the verbalizers and their token ids,
    prompt lengths, and ``extra`` (the calibration, the choice of demonstrations)."""
    prefix = prompt_set.prefixes.loc[prompt_set.prefixes["candidate"] == candidate].iloc[0]
    return {
        **prompt_set.info,
        "candidate": int(candidate),
        "prefix_text": prefix["prefix_text"],
        "prefix_len": len(prefix["prefix_ids"]),
        "max_tokens": int(prompts["n_tokens"].max()),
        "mean_tokens": float(prompts["n_tokens"].mean()),
        **extra,
    }


def check_pairs(pairs: pd.DataFrame, n_test: int) -> None:
    """Patching needs prompts with a partner: one line when none of the ``n_test`` has one."""
    if (pairs["partner_id"] >= 0).any():
        return
    raise PromptError(
        f"none of the {n_test} test prompts has an opposite-sentiment prompt of the same length, "
        "so patching (the kinds patch and restore) has no prompt to run on: raise prompts.n_test "
        "(more reviews share a length) or lower prompts.max_review_tokens (more reviews are cut "
        "to the same length)"
    )


def pair_prompts(prompts: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Each test prompt's opposite-sentiment partner, for patching (:mod:`headperturb.core.kinds`,
    ``patch`` and ``restore``): another prompt of the run with the other label and exactly as many
    tokens, so that the two share the demonstrations and align token for token; drawn with a seed
    of its own per prompt (independently: a prompt may be the partner of several, or of none).
    A prompt no prompt of the other label matches in length gets partner -1 and takes no part in
    patching. No label takes part in the choice but in choosing the partner's label.

    Columns: prompt_id, label, n_tokens, partner_id (-1: none), candidates (how many prompts
    qualified)."""
    frame = prompts[["prompt_id", "label", "n_tokens"]].reset_index(drop=True)
    pool: dict[tuple[int, int], list[int]] = {}
    for pid, label, n in frame.itertuples(index=False):
        pool.setdefault((int(label), int(n)), []).append(int(pid))
    partners, counts = [], []
    for pid, label, n in frame.itertuples(index=False):
        options = sorted(pool.get((1 - int(label), int(n)), []))
        counts.append(len(options))
        if not options:
            partners.append(-1)
            continue
        rng = np.random.default_rng(_seed(seed, "partner", int(pid)))
        partners.append(options[int(rng.integers(len(options)))])
    return frame.assign(
        partner_id=np.asarray(partners, dtype=np.int64),
        candidates=np.asarray(counts, dtype=np.int64),
    )


def build_prompts(train, test, tokenizer, context_length: int | None = None, **settings):
    """One candidate's prompts in one call (tests and quick trials): the reviews of
    :func:`select_reviews` (``k_shot``, ``n_test``, ``seed``), tokenized by
    :func:`tokenize_prompts` (``max_review_tokens``, ``template``, ``verbalizers``,
    ``separator``), with candidate 0's demonstrations. Returns an object with ``prompts``,
    ``demonstrations`` and ``info`` (the run's prompt_info)."""
    picks = {k: settings.pop(k) for k in ("k_shot", "n_test", "seed")}
    reviews = select_reviews(train, test, **picks)
    built = tokenize_prompts(reviews, tokenizer, context_length=context_length, **settings)
    prompts = built.prompts(0)
    return _Built(prompts, built.demonstrations_of(0), prompt_info(built, 0, prompts))


@dataclass
class _Built:
    prompts: pd.DataFrame
    demonstrations: pd.DataFrame
    info: dict

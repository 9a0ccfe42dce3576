"""The parts of a prompt and the anatomy tables (headperturb.data.parts,
headperturb.analysis.anatomy), against hand computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from headperturb.analysis import anatomy
from headperturb.data import parts as P

TEMPLATE = "Review: {text}\nSentiment: {label}"
VERBALIZERS = [" negative", " positive"]


def test_each_character_of_the_prefix_and_the_query_has_its_part():
    prefix = "Review: bad\nSentiment: negative\n\nReview: good\nSentiment: positive\n\n"
    chars = P.prefix_chars(prefix, TEMPLATE, "\n\n", VERBALIZERS)
    spelled = "".join("TDLtRF"[c] for c in chars)

    def demonstration(n_text: int) -> str:  # "Review: ", its text, "\nSentiment:", label, "\n\n"
        return "t" * 8 + "D" * n_text + "t" * 11 + "L" * 9 + "tt"

    assert spelled == demonstration(3) + demonstration(4)
    query = "Review: so so\nSentiment:"
    chars = P.query_chars(query, "so so", TEMPLATE, " negative")
    assert "".join("TDLtRF"[c] for c in chars) == "t" * 8 + "R" * 5 + "F" * 11
    with pytest.raises(P.PartsError, match="template"):
        P.prefix_chars("Review: bad\nSentiment: neutral\n\n", TEMPLATE, "\n\n", VERBALIZERS)


def test_a_token_takes_the_part_of_most_of_its_characters_a_label_word_first():
    chars = np.array([P.TEMPLATE] * 3 + [P.REVIEW] * 4 + [P.LABEL_WORDS] + [P.TEMPLATE] * 2)
    offsets = [(0, 0), (0, 3), (2, 7), (6, 9), (9, 10)]
    found = P.token_parts(chars, offsets).tolist()
    assert found == [P.TEMPLATE, P.TEMPLATE, P.REVIEW, P.LABEL_WORDS, P.TEMPLATE]


def test_the_parts_of_built_prompts_spell_their_label_words_and_reviews(
    tiny_tokenizer_dir, imdb_sample
):
    from tiny_models import sentiment_prompts
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    built = sentiment_prompts(*imdb_sample, tok, k_shot=2, n_test=3, max_review_tokens=12)
    found = P.prompt_parts(built.info, built.prompts, tok)
    for parts, (_, row) in zip(found, built.prompts.iterrows()):
        ids = np.asarray(row["input_ids"])
        assert len(parts) == len(ids) and parts[0] == P.FIRST
        label_words = tok.decode(ids[parts == P.LABEL_WORDS])
        assert label_words.replace(" ", "") in ("negativepositive", "positivenegative")
        assert tok.decode(ids[parts == P.REVIEW]).strip() == row["review"].strip()
        assert tok.decode(ids[parts == P.FINAL_TEMPLATE]) == "\nSentiment:"


def test_the_prefix_layout_places_each_demonstration_and_its_label_word(
    tiny_tokenizer_dir, imdb_sample
):
    """The positions label_words and demonstration_<i> edit: the demonstrations tile the prefix in
    order, each decodes to its own filled template, and the label words are their verbalizers."""
    from tiny_models import sentiment_prompts
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    built = sentiment_prompts(*imdb_sample, tok, k_shot=3, n_test=2, max_review_tokens=12)
    ids = np.asarray(built.prompts["input_ids"].iloc[0])
    layout = P.prefix_layout(built.info, ids, tok)
    n = built.info["prefix_len"]
    assert layout.length == n and len(layout.demonstrations) == 3
    assert layout.demonstrations[0][0] == 0 and layout.demonstrations[-1][1] == n
    for (_, stop), (start, _) in zip(layout.demonstrations, layout.demonstrations[1:]):
        assert stop == start  # they tile the prefix
    words = []
    for start, stop in layout.demonstrations:
        text = tok.decode(ids[start:stop])
        assert text.lstrip().startswith("Review:") and text.endswith("\n\n")
        inside = [t for t in layout.label_words if start <= t < stop]
        assert len(inside) >= 1  # one label word each, as many tokens as it takes
        words.append(tok.decode(ids[inside]).strip())
        assert f"Sentiment: {words[-1]}" in text
    assert set(words) <= {"negative", "positive"}
    with pytest.raises(P.PartsError, match="another tokenizer"):
        P.prefix_layout(built.info, ids[1:], tok)


def test_the_bootstrap_interval_holds_the_mean_and_is_a_point_for_constants():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(50, 2, 3))
    mean, low, high = anatomy.bootstrap(values, 200, seed=1)
    assert np.allclose(mean, values.mean(0))
    assert (low <= mean).all() and (mean <= high).all() and (low < high).all()
    mean, low, high = anatomy.bootstrap(np.ones((5, 2)), 50, seed=1)
    assert np.allclose(low, 1) and np.allclose(high, 1)


def test_types_correlations_and_card_heads():
    row = {"previous_token": 0.5, "duplicate_token": 0.1, "induction": 0.7}
    assert anatomy.head_types(row, 0.4) == "induction, previous-token"
    assert anatomy.head_types(row, 0.8) == "none"
    heads = pd.DataFrame(
        {
            "layer": [0, 0, 1, 1],
            "head": [0, 1, 0, 1],
            "induction": [0.1, 0.2, 0.3, 0.4],
            "patch_effect": [0.0, -0.1, 0.2, 0.3],
            "zero_change_logit_diff": [0.5, 0.0, 0.1, 0.0],
            "screen_rank": [4, 3, 1, 2],
        }
    )
    table = anatomy.correlations(heads)
    rho = table.set_index(["score", "effect"]).loc[("induction", "patch_effect"), "spearman"]
    assert rho == pytest.approx(1.0)
    assert anatomy.card_heads(heads, per_list=1) == [(1, 1), (0, 0), (1, 0)]


def test_orders_by_kind_of_head_and_their_exclusion_controls():
    from headperturb.analysis.curves import Setting, ranking
    from headperturb.core.sets import parse_order

    scores = pd.DataFrame(
        {
            "layer": [0, 0, 1, 1],
            "head": [0, 1, 0, 1],
            "induction": [0.9, 0.1, 0.5, 0.0],
            "share_label_words": [0.8, 0.6, 0.1, 0.3],
            "function_vector": [0.0, 0.3, 0.2, 0.1],
        }
    )
    setting = Setting(site="o_proj_input", position="last", kind="mean")

    def order(name, exclude=1):
        ranked = ranking(name, setting, 2, 2, anatomy={"scores": scores, "exclude": exclude})
        return list(zip(ranked["layer"], ranked["head"]))

    assert order("induction") == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert order("label_attention") == [(0, 0), (0, 1), (1, 1), (1, 0)]
    assert order("function_vector") == [(0, 1), (1, 0), (1, 1), (0, 0)]
    # the top function-vector head last, then the top two
    assert order("induction_exclusive") == [(0, 0), (1, 0), (1, 1), (0, 1)]
    assert order("induction_exclusive", 2) == [(0, 0), (1, 1), (0, 1), (1, 0)]
    # the top induction head last
    assert order("function_vector_exclusive") == [(0, 1), (1, 0), (1, 1), (0, 0)]
    assert parse_order("function_vector_exclusive") == ("function_vector_exclusive", 0)

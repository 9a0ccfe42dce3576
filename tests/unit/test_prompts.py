import pandas as pd
import pytest

from headperturb.data.prompts import (
    PromptError,
    Template,
    build_prompts,
    select_balanced,
    verbalizer_token_ids,
)

TEMPLATE = "Review: {text}\nSentiment: {label}"


def test_template_example_and_query():
    tpl = Template(TEMPLATE)
    assert tpl.example("Fine film.", " positive") == "Review: Fine film.\nSentiment: positive"
    assert tpl.query("Fine film.", " positive") == "Review: Fine film.\nSentiment:"
    assert Template("{text} => {label}!").example("x", "yes") == "x => yes!"


@pytest.mark.parametrize(
    "bad", ["Review: {text}", "Sentiment: {label}", "{label} {text}", "{text}{text}{label}"]
)
def test_template_needs_both_placeholders_in_order(bad):
    with pytest.raises(PromptError, match="template"):
        Template(bad)


def test_select_balanced_is_seeded_and_balanced():
    frame = pd.DataFrame(
        {
            "text": [f"t{i}" for i in range(20)],
            "label": [i % 2 for i in range(20)],
            "row": range(20),
        }
    )
    a = select_balanced(frame, 7, seed=3, what="x")
    assert a["label"].value_counts().to_dict() == {1: 4, 0: 3}
    assert a.equals(select_balanced(frame, 7, seed=3, what="x"))
    assert not a.equals(select_balanced(frame, 7, seed=4, what="x"))
    inter = select_balanced(frame, 6, seed=3, what="x", interleave=True)
    assert inter["label"].tolist() == [0, 1, 0, 1, 0, 1]
    with pytest.raises(PromptError, match="asked for 11 reviews with label 0 .*offers 10"):
        select_balanced(frame, 22, seed=0, what="x")


def test_verbalizers_must_start_with_distinct_tokens(tiny_llama):
    _, tok = tiny_llama
    ids = verbalizer_token_ids(tok, (" negative", " positive"))
    assert ids[0] != ids[1]
    with pytest.raises(PromptError, match="start with the same token"):
        verbalizer_token_ids(tok, (" positive", " positively"))


def _build(tok, imdb_sample, **overrides):
    train, test = imdb_sample
    kwargs = dict(
        k_shot=4,
        n_test=10,
        max_review_tokens=30,
        template=TEMPLATE,
        verbalizers=(" negative", " positive"),
        separator="\n\n",
        seed=0,
        context_length=1024,
    )
    kwargs.update(overrides)
    return build_prompts(train, test, tok, **kwargs)


def test_build_prompts(tiny_llama, imdb_sample):
    _, tok = tiny_llama
    built = _build(tok, imdb_sample)
    prompts, demos, info = built.prompts, built.demonstrations, built.info
    assert len(prompts) == 10 and prompts["label"].value_counts().to_dict() == {0: 5, 1: 5}
    assert demos["label"].tolist() == [0, 1, 0, 1]  # interleaved, ending on positive
    prefix = info["prefix_len"]
    first = list(prompts["input_ids"].iloc[0][:prefix])
    assert all(list(ids[:prefix]) == first for ids in prompts["input_ids"])  # one shared prefix
    assert (prompts["n_tokens"] == prompts["input_ids"].map(len)).all()
    for text in list(prompts["review"]) + list(demos["review"]):
        assert "<br" not in text
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) <= 31  # budget (+1 for re-tokenization)
    for prompt in prompts["prompt"]:
        assert prompt.startswith(info["prefix_text"]) and prompt.endswith("\nSentiment:")
        assert prompt.count("Sentiment: positive") == 2 and prompt.count("Sentiment: negative") == 2
    assert info["verbalizer_token_ids"] == verbalizer_token_ids(tok, (" negative", " positive"))
    again = _build(tok, imdb_sample)
    assert again.prompts.equals(prompts)


def test_query_holds_the_review_and_no_label(tiny_llama, imdb_sample):
    _, tok = tiny_llama
    built = _build(tok, imdb_sample)
    for prompt, review in zip(built.prompts["prompt"], built.prompts["review"]):
        assert prompt[len(built.info["prefix_text"]) :] == f"Review: {review}\nSentiment:"


def test_context_length_and_sizes_are_checked(tiny_llama, imdb_sample):
    _, tok = tiny_llama
    with pytest.raises(PromptError, match="context is 50"):
        _build(tok, imdb_sample, context_length=50)
    with pytest.raises(PromptError, match="offers 100"):
        _build(tok, imdb_sample, n_test=202)


def test_no_partner_of_the_same_length_is_one_line_before_any_head_job():
    import pandas as pd

    from headperturb.data.prompts import PromptError, check_pairs

    check_pairs(pd.DataFrame({"prompt_id": [0, 1], "partner_id": [1, -1]}), 2)
    with pytest.raises(PromptError, match="none of the 2 test prompts.*prompts.n_test"):
        check_pairs(pd.DataFrame({"prompt_id": [0, 1], "partner_id": [-1, -1]}), 2)

"""Fixtures of the pass tests: one tiny random model of every supported family with its prompts,
baseline and recorded keys and values (built once per module that uses them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, build_tiny_model, sentiment_prompts

from headperturb.model.engine import Engine
from headperturb.model.sites import locate_sites


def setup_family(family, folder, tiny_tokenizer_dir, imdb_sample):
    """(model, engine, ids, prompt ids, baseline, logits of prompt 0) of a tiny random 4-layer
    model of ``family`` on four 2-shot prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_model(folder, tiny_tokenizer_dir, family, seed=1, n_layers=4)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    train, test = imdb_sample
    built = sentiment_prompts(train, test, tok, k_shot=2, n_test=4, max_review_tokens=15)
    engine = Engine(model, built.info["prefix_len"], built.info["verbalizer_token_ids"])
    ids = [np.asarray(x) for x in built.prompts["input_ids"]]
    recorded = engine.baseline(ids, locate_sites(model), batch_size=3)  # batches of unequal lengths
    with torch.no_grad():
        before = model(input_ids=torch.as_tensor(ids[0])[None]).logits
    return model, engine, ids, built.prompts["prompt_id"].tolist(), recorded, before


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request, tmp_path_factory, tiny_tokenizer_dir, imdb_sample):
    return setup_family(
        request.param, tmp_path_factory.mktemp(request.param), tiny_tokenizer_dir, imdb_sample
    )


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory, tiny_tokenizer_dir, imdb_sample):
    """One family's setup, for planted mechanisms whose test does not depend on the family."""
    return setup_family("llama", tmp_path_factory.mktemp("llama"), tiny_tokenizer_dir, imdb_sample)


@pytest.fixture(scope="module")
def family_cache(family_setup):
    _model, engine, ids, _pids, _recorded, _before = family_setup
    return engine.capture_cache(ids, batch_size=3)

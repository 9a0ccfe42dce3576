"""Shared fixtures: the IMDB copy beside the repository, a tiny tokenizer and tiny random models.

Nothing here downloads: tokenizers are trained on a few IMDB reviews, models are built from
transformers config classes with random weights.

The tests are grouped by level, one folder each, and marked so (``pytest -m unit``): ``unit``
(pure functions against hand computations, the library's steps), ``passes`` (the hook points,
every fast pass against the naive one, planted effects) and ``workflow`` (Snakemake end to end).
The workflow tests and the real SmolLM2 are also ``slow``: ``pytest -m "not slow"`` is the fast
subset for development; CI runs everything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from tiny_models import build_tiny_model, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
IMDB = Path(os.environ.get("HEADPERTURB_IMDB", REPO.parent / "shared" / "data" / "imdb"))


LEVELS = ("unit", "passes", "workflow")


def pytest_collection_modifyitems(items):
    for item in items:
        level = Path(str(item.fspath)).parent.name
        if level in LEVELS:
            item.add_marker(getattr(pytest.mark, level))
        if level == "workflow" or "smollm2" in item.nodeid:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def imdb_dir() -> Path:
    if not (IMDB / "train.parquet").is_file():
        pytest.fail(f"the IMDB copy is missing at {IMDB} (set HEADPERTURB_IMDB to its folder)")
    return IMDB


@pytest.fixture(scope="session")
def imdb_sample(imdb_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """200 reviews of each split, balanced, as the data loader returns them."""
    from headperturb.data.imdb import load_split

    def sample(split):
        frame = load_split(str(imdb_dir), split)
        parts = [frame[frame["label"] == label].sample(100, random_state=0) for label in (0, 1)]
        return pd.concat(parts, ignore_index=True)

    return sample("train"), sample("test")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, imdb_sample) -> Path:
    train, test = imdb_sample
    return train_tokenizer(
        list(train["text"]) + list(test["text"]), tmp_path_factory.mktemp("tiny-tokenizer")
    )


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer_dir, "llama")


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    """(model, tokenizer) of the tiny Llama: 2 layers, 4 query heads, 2 KV heads, head_dim 8."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)

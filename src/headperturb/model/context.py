"""What a step runs on: the prepared model (:class:`ModelSpec`), the run's prompts
(:class:`PromptFiles`) and what a job reads (:class:`JobInputs`), loaded into an
:class:`~headperturb.model.engine.Engine`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headperturb.core import files
from headperturb.core.spec import within_demonstrations
from headperturb.data.parts import Prefix, prefix_layout
from headperturb.model import cache


@dataclass(frozen=True)
class ModelSpec:
    """The prepared model a step runs: its folder, device, dtype, torch threads, and the
    ``model.site`` override for architectures headperturb does not know."""

    path: str
    device: str = "auto"
    dtype: str = "float32"
    threads: int = 1
    site: dict | None = None


@dataclass(frozen=True)
class PromptFiles:
    """``prompts.parquet`` and ``prompt_info.json`` of a run."""

    prompts: str
    info: str


@dataclass(frozen=True)
class JobInputs:
    """What a head or set job reads: the prompts, and what its pass starts from (the baseline's
    final state and exported last layer, a recorded layer input, the recorded keys and values;
    none for the naive method), the head RMS (relative noise), the prompts' pairs (the paired
    kinds) and the baseline's per-prompt logits (the unperturbed pass)."""

    prompts: PromptFiles
    state: str | None = None
    program: str | None = None
    activations: str | None = None
    cache: str | None = None
    rms: str | None = None
    pairs: str | None = None
    unperturbed: str | None = None


def gpu_memory_hint(func, *args, **kwargs):
    """``func(...)``, with CUDA's out-of-memory error turned into one message that says which
    settings lower memory."""
    import torch

    from headperturb.model.loading import ModelError

    try:
        return func(*args, **kwargs)
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelError(
            "out of GPU memory: lower prompts.n_test or prompts.max_review_tokens, set "
            "model.dtype: bfloat16, lower perturbation.repeats (draws run in one batch), or run "
            f"on model.device: cpu ({str(exc).splitlines()[0]})"
        ) from None


def load_engine(prompts: PromptFiles, model: ModelSpec):
    """(engine, sites, model info, prompt info) for a step's prompts: torch's threads set, the
    model loaded once per process and copied per thread
    (:func:`headperturb.model.cache.cached_model`)."""
    from headperturb.model.engine import Engine
    from headperturb.model.sites import locate_sites

    cache.set_threads(model.threads)
    net, model_info = cache.cached_model(model.path, model.device, model.dtype)
    info = files.read_json(prompts.info)
    engine = Engine(net, info["prefix_len"], info["verbalizer_token_ids"])
    return engine, locate_sites(net, model.site), model_info, info


def prefix_of(info: dict, first_ids, model_path: str, positions) -> Prefix:
    """Where the demonstrations lie in the run's prompts (:class:`Prefix`): their length, and
    for the positions inside them (``label_words``, ``demonstration_<i>``) where their tokens lie,
    from the tokenizer's offsets (:func:`headperturb.data.parts.prefix_layout`; the tokenizer is
    loaded only then)."""
    if not any(within_demonstrations(p) for p in positions):
        return Prefix(int(info["prefix_len"]))
    from headperturb.model.loading import load_tokenizer

    return prefix_layout(info, first_ids, load_tokenizer(model_path))


def prompt_ids(prompts_path) -> tuple[list[np.ndarray], list[int], np.ndarray]:
    """Every prompt's token ids, the prompt ids and the labels, in the run's order."""
    frame = files.read_parquet(prompts_path, ["prompt_id", "label", "input_ids"])
    ids = [np.asarray(x, dtype=np.int64) for x in frame["input_ids"]]
    return ids, frame["prompt_id"].tolist(), frame["label"].to_numpy()

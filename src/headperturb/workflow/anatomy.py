"""What kind of head each one is: where it looks from the final position, its type scores on
repeated random tokens, what it writes, and the table joining these with its measured effects
(:mod:`headperturb.model.attention`, :mod:`headperturb.model.writes`,
:mod:`headperturb.analysis.anatomy`)."""

from __future__ import annotations

import logging

import numpy as np

from headperturb import joblog
from headperturb.core import files
from headperturb.workflow.rulestep import model_spec, prompt_files, step

log = logging.getLogger("headperturb")


def _loaded(input, params, threads):
    """(engine, sites, provenance of the model, prompt info, tokenizer, prompts frame)."""
    from headperturb.model.context import load_engine
    from headperturb.model.loading import load_tokenizer

    prompts = prompt_files(input)
    engine, sites, model_info, info = load_engine(prompts, model_spec(input, params, threads))
    frame = files.read_parquet(prompts.prompts)
    return engine, sites, model_info, info, load_tokenizer(input.model), frame


def _meta(engine, model_info, input, settings: dict) -> dict:
    from headperturb.model import recordings

    settings = {**settings, "prompts_sha256": recordings.file_digest(input.info)}
    return recordings.provenance(model_info, str(engine.device), settings)


@step
def attention_shares(input, output, params, wildcards, threads):
    """Every head's attention from the final position, summed over the prompt's parts, per
    prompt (one pass each over the query, the prefix's keys and values shared); the mean share
    per head and part with its interval; every head's weights on a few example prompts."""
    from headperturb.analysis import anatomy
    from headperturb.data.parts import PARTS, prompt_parts
    from headperturb.model.attention import final_rows, part_shares

    engine, sites, model_info, info, tokenizer, frame = _loaded(input, params, threads)
    parts = prompt_parts(info, frame, tokenizer)
    ids = [np.asarray(x, dtype=np.int64) for x in frame["input_ids"]]
    examples = set(_example_rows(frame["label"].to_numpy(), params.examples))
    progress = joblog.Progress(len(ids), "attention from the final position", log)
    shares, kept = [], []
    for i, rows in enumerate(final_rows(engine.model, ids, int(info["prefix_len"]))):
        shares.append(part_shares(rows[[s.layer for s in sites]], parts[i], len(PARTS)))
        if i in examples:
            kept.append(_example(frame, i, rows, sites, parts[i], tokenizer))
        progress.update(1)
    stat = params.statistics
    layers = [s.layer for s in sites]
    table = anatomy.share_table(np.stack(shares), layers, int(stat["bootstrap"]), int(stat["seed"]))
    meta = _meta(engine, model_info, input, {"step": "attention_shares"})
    files.write_parquet(output.shares, table, meta)
    weights = [w for example in kept for w in example[0]]
    tokens = [t for example in kept for t in example[1]]
    files.write_parquet(output.examples, _frame(weights), meta)
    files.write_parquet(output.tokens, _frame(tokens), meta)
    top = table.sort_values("share", ascending=False).head(1).iloc[0]
    log.info(
        "attention from the final position of %d prompts; the largest mean share: layer %d head "
        "%d on %s (%.2f)",
        len(ids),
        top["layer"],
        top["head"],
        top["part"],
        top["share"],
    )


def _frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows)


def _example_rows(labels: np.ndarray, per_label: int) -> list[int]:
    """The first ``per_label`` prompts of each label, in the run's order."""
    return [int(i) for label in (0, 1) for i in np.flatnonzero(labels == label)[:per_label]]


def _example(frame, i: int, rows, sites, parts, tokenizer) -> tuple[list[dict], list[dict]]:
    """One example prompt's rows: every head's attention weights; its tokens and their parts."""
    from headperturb.data.parts import PARTS

    pid, ids = int(frame["prompt_id"].iloc[i]), frame["input_ids"].iloc[i]
    weights = [
        {
            "prompt_id": pid,
            "layer": s.layer,
            "head": h,
            "weights": rows[s.layer, h].float().tolist(),
        }
        for s in sites
        for h in range(s.n_heads)
    ]
    tokens = [
        {
            "prompt_id": pid,
            "label": int(frame["label"].iloc[i]),
            "position": j,
            "token": tokenizer.decode([int(t)]),
            "part": PARTS[int(parts[j])],
        }
        for j, t in enumerate(ids)
    ]
    return weights, tokens


@step
def head_types(input, output, params, wildcards, threads):
    """Previous-token, duplicate-token, induction and sink scores of every head on seeded
    sequences of random tokens repeated once
    (:func:`headperturb.model.attention.pattern_scores`)."""
    from headperturb.analysis import anatomy
    from headperturb.model.attention import pattern_scores, patterns, repeated_tokens

    engine, sites, model_info, _info, tokenizer, _prompts = _loaded(input, params, threads)
    settings = params.settings
    special = set(tokenizer.all_special_ids)
    vocab = [t for t in range(len(tokenizer)) if t not in special]
    start = list(tokenizer("", add_special_tokens=True)["input_ids"])
    length, count = int(settings["length"]), int(settings["sequences"])
    sequences = repeated_tokens(vocab, start, length, count, int(settings["seed"]))
    progress = joblog.Progress(count, "repeated random tokens", log)
    scores = []
    layers = [s.layer for s in sites]
    for seq in sequences:
        found = patterns(engine.model, seq)
        scores.append(pattern_scores(tuple(found[layer] for layer in layers), len(start), length))
        progress.update(1)
    stat = params.statistics
    table = anatomy.type_table(np.stack(scores), layers, int(stat["bootstrap"]), int(stat["seed"]))
    meta = _meta(engine, model_info, input, {"step": "head_types", **settings})
    files.write_parquet(output.types, table, meta)
    best = table[table["type"] == "induction"].sort_values("score").iloc[-1]
    log.info(
        "%d sequences of %d random tokens repeated once; the highest induction score: layer %d "
        "head %d (%.2f)",
        count,
        length,
        best["layer"],
        best["head"],
        best["score"],
    )


@step
def function_vectors(input, output, params, wildcards, threads):
    """Every head's function-vector score: its mean clean final-position output patched into the
    prompts with the demonstrations' labels shuffled (:mod:`headperturb.model.function_vectors`)."""
    import pandas as pd

    from headperturb.analysis import anatomy
    from headperturb.data.parts import prompt_parts
    from headperturb.model import cache, recordings
    from headperturb.model import function_vectors as fv

    engine, sites, model_info, info, tokenizer, frame = _loaded(input, params, threads)
    expect = recordings.recording(
        "baseline", input.info, model_info, layers=len(sites), n_prompts=len(frame)
    )
    state = cache.cached_tensors(input.state, None, expect)
    ids = [np.asarray(x, dtype=np.int64) for x in frame["input_ids"]]
    parts = prompt_parts(info, frame.head(1), tokenizer)[0]
    corrupted = fv.shuffled_labels(ids, parts, int(info["prefix_len"]), int(params.seed))
    progress = joblog.Progress(len(sites), "function-vector scores, layers", log)
    labels = frame["label"].to_numpy()
    gains = fv.scores(engine, sites, state, corrupted, labels, progress)
    stat = params.statistics
    mean, low, high = anatomy.bootstrap(gains, int(stat["bootstrap"]), int(stat["seed"]))
    rows = [
        {"layer": s.layer, "head": h, "function_vector": mean[j, h]}
        | {"ci_low": low[j, h], "ci_high": high[j, h]}
        for j, s in enumerate(sites)
        for h in range(s.n_heads)
    ]
    meta = _meta(engine, model_info, input, {"step": "function_vectors", "seed": params.seed})
    files.write_parquet(output.scores, pd.DataFrame(rows), meta)
    best = max(rows, key=lambda r: r["function_vector"])
    log.info(
        "function-vector scores of %d heads; the highest: layer %d head %d (%+.3f)",
        len(rows),
        best["layer"],
        best["head"],
        best["function_vector"],
    )


@step
def head_writes(input, output, params, wildcards, threads):
    """What every head writes at the final position, read at the unembedding
    (:mod:`headperturb.model.writes`)."""
    import pandas as pd

    from headperturb.model import cache, recordings, writes

    engine, sites, model_info, info, tokenizer, frame = _loaded(input, params, threads)
    expect = recordings.recording(
        "baseline", input.info, model_info, layers=len(sites), n_prompts=len(frame)
    )
    state = cache.cached_tensors(input.state, None, expect)
    labels = frame["label"].to_numpy()
    rows = writes.read_writes(engine.model, sites, state, labels, engine.token_ids, params.top)
    table = pd.DataFrame(rows)
    for column in ("promoted", "suppressed"):
        table[f"{column}_text"] = table[column].map(
            lambda ids: [tokenizer.decode([t]) for t in ids]
        )
    meta = _meta(engine, model_info, input, {"step": "head_writes", "top": params.top})
    files.write_parquet(output.writes, table, meta)
    log.info("what %d heads write at the final position, read at the unembedding", len(rows) // 2)


@step
def anatomy_table(input, output, params, wildcards, threads):
    """One row per head: where it looks, its types and what it writes beside its measured
    effects, with the rank correlations between them (:mod:`headperturb.analysis.anatomy`)."""
    from headperturb.analysis import anatomy
    from headperturb.analysis.segments import segment_map

    def read(name):
        path = getattr(input, name, None)
        return files.read_parquet(path) if path else None

    table = read("table")
    segments = segment_map(table) if table is not None else None
    heads = anatomy.head_table(
        read("shares"),
        read("types"),
        read("writes"),
        table,
        direct=read("direct"),
        screen=read("screen"),
        function_vectors=read("function_vectors"),
        segments=segments,
        threshold=params.threshold,
    )
    files.write_parquet(output.heads, heads)
    files.write_csv(output.heads_csv, heads)
    files.write_csv(output.correlations, anatomy.correlations(heads))
    log.info("%d heads: %s", len(heads), heads["types"].value_counts().to_dict())


@step
def plot_attention_map(input, output, params, wildcards, threads):
    """Where every head looks, a layers x heads map per part of the prompt."""
    from headperturb.analysis.figures.anatomy import attention_map

    attention_map(files.read_parquet(input.shares), params.run_name, output.figure)


@step
def plot_head_cards(input, output, params, wildcards, threads):
    """One figure per head the summary gives a card
    (:func:`headperturb.analysis.anatomy.card_heads`)."""
    from headperturb.analysis.anatomy import card_heads
    from headperturb.analysis.figures.anatomy import head_card

    found = {name: files.read_parquet(getattr(input, name)) for name in ANATOMY_TABLES}
    chosen = card_heads(found["heads"], params.cards)
    with files.atomic_dir(output.cards) as folder:
        for layer, head in chosen:
            head_card(found, layer, head, params.run_name, folder / f"L{layer}H{head}.png")
    log.info("%d head cards: %s", len(chosen), ", ".join(f"L{a}H{b}" for a, b in chosen))


ANATOMY_TABLES = ("heads", "shares", "types", "writes", "examples", "tokens")
"""What the head cards draw from."""

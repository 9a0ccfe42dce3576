"""The segments of a prompt (demonstrations, review, last) and the pass that computes the
demonstrations once per job: every kind, in every supported family, equals full forward passes
whose hook edits only the segment's positions; at the last layer an edit of the demonstrations or
the review changes nothing; the demonstrations are computed once per group of prompts that get
the same values there."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from reference import from_layer

from headperturb.core import kinds
from headperturb.core.spec import in_prefix
from headperturb.data.parts import Prefix
from headperturb.model import passes, tail
from headperturb.model.hooks import Edit, only_segment, segment, site_slice
from headperturb.model.rows import rows_for
from headperturb.model.sites import locate_sites

KINDS = ["noise", "zero", "mean", "resample", "patch", "restore"]


def _setup_rows(pids, kind):
    pairs = pd.DataFrame({"prompt_id": pids, "partner_id": [pids[1], pids[0], pids[3], pids[0]]})
    return rows_for(kinds.build(kind, 2.0 if kind == "noise" else None), pids, pairs)


def _edit(model, engine, ids, site, kind, position, rows):
    pert = kinds.build(kind, 2.0 if kind == "noise" else None)
    if kind == "noise":
        pert = pert.resolve()
    cols = site_slice(model, site, 1, "o_proj_input")
    clean = passes.clean_outputs(engine, ids, site, 1, "o_proj_input") if pert.needs_clean else None
    extra = {"donors": rows.donors} if pert.paired else {}
    values = pert.values(
        seed=3,
        layer=site.layer,
        head=1,
        width=cols.stop - cols.start,
        repeats=2,
        clean=clean,
        **extra,
    )
    edit = Edit(
        site, 1, "o_proj_input", values, pert.apply, pert.draws(2), position, _prefix(engine)
    )
    return edit, pert


def _prefix(engine) -> Prefix:
    """The demonstrations as two halves of the prefix, each ending with a label word (a stand-in
    for :func:`headperturb.data.parts.prefix_layout`, tested on its own)."""
    p = engine.prefix_len
    return Prefix(p, (p // 2 - 1, p - 1), ((0, p // 2), (p // 2, p)))


def _keys(pert, position, run_ids):
    if position in ("review", "last"):
        return ["clean"] * len(run_ids)
    return [pert.prefix_key(len(x)) for x in run_ids]


def _uneven(engine, ids):
    """The four prompts with one review token of prompt 2 and two of prompt 3 dropped: three
    lengths."""
    p = engine.prefix_len
    return [x if i < 2 else np.concatenate([x[:p], x[p + i - 1 :]]) for i, x in enumerate(ids)]


@pytest.fixture(scope="module")
def captured(family_setup):
    model, engine, ids, *_ = family_setup
    return engine.capture_layer_inputs(ids, locate_sites(model)[1])


@pytest.fixture(scope="module")
def uneven(family_setup):
    """The four prompts with one review token of prompt 2 and two of prompt 3 dropped, so that
    lengths differ (the from-the-end mean then mixes positions), their recorded layer-1 inputs
    and their unedited logits."""
    model, engine, ids, *_ = family_setup
    ids = _uneven(engine, ids)
    site = locate_sites(model)[1]
    unedited = engine.baseline(ids, locate_sites(model), batch_size=3).logits
    return ids, engine.capture_layer_inputs(ids, site), unedited


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "position", ["demonstrations", "review", "all", "label_words", "demonstration_2"]
)
def test_segment_fast_equals_naive(family_setup, captured, uneven, kind, position):
    """A middle layer: the demonstrations once per group, then each prompt's own tokens. Prompts
    of unequal length, except for patching (a prompt and its partner align token for token)."""
    model, engine, ids, pids, recorded, _before = family_setup
    unedited = recorded.logits
    if kind not in ("patch", "restore"):
        ids, captured, unedited = uneven
    site = locate_sites(model)[1]
    rows = _setup_rows(pids, kind)
    edit, pert = _edit(model, engine, ids, site, kind, position, rows)
    run_ids, run_pids = [ids[k] for k in rows.run], [pids[k] for k in rows.prompt]
    naive = passes.naive(engine, run_ids, run_pids, edit)
    fast = passes.shared_prefix(
        engine, captured, run_ids, run_pids, edit, _keys(pert, position, run_ids), runs=rows.run
    )
    np.testing.assert_allclose(fast, naive, atol=1e-4)
    if kind not in ("patch", "restore") or not in_prefix(position):
        # moved (float noise ~1e-8); the mean from the end at a few shared prefix positions is
        # close to each prompt's own output there (prompts one or two tokens apart in length)
        bar = 1e-7 if kind == "mean" and position in ("label_words", "demonstration_2") else 1e-6
        assert np.abs(naive - unedited[rows.run][:, None]).max() > bar
    else:  # the partner shares the demonstrations: patching them changes nothing
        np.testing.assert_allclose(naive[:, 0], unedited[rows.run], atol=1e-4)


@pytest.mark.parametrize("kind", ["noise", "zero", "mean", "patch"])
@pytest.mark.parametrize("position", ["demonstrations", "review", "label_words"])
def test_a_segment_of_the_last_layer_changes_nothing(family_setup, kind, position):
    """At the last layer only the final position reaches the logits: the last-layer pass and full
    forward passes both give the unperturbed numbers."""
    model, engine, ids, pids, recorded, _before = family_setup
    site = locate_sites(model)[-1]
    rows = _setup_rows(pids, kind)
    edit, _pert = _edit(model, engine, ids, site, kind, position, rows)
    run_ids, run_pids = [ids[k] for k in rows.run], [pids[k] for k in rows.prompt]
    naive = passes.naive(engine, run_ids, run_pids, edit)
    state = tail.rows_of(tail.layer_state(recorded.final_state, site.layer), rows.run)
    fast = passes.last_layer(engine, state, run_pids, edit)
    np.testing.assert_allclose(fast, naive, atol=1e-4)
    np.testing.assert_allclose(
        naive, np.broadcast_to(recorded.logits[rows.run][:, None], naive.shape), atol=1e-4
    )


def test_the_shared_prefix_pass_equals_the_whole_prompt_pass(family_setup, captured):
    """At every position the new pass gives what the pass over the whole prompt from the layer
    gives (today's path for sets and the benchmark's reference)."""
    model, engine, ids, pids, _recorded, _before = family_setup
    site = locate_sites(model)[1]
    rows = _setup_rows(pids, "zero")
    edit, pert = _edit(model, engine, ids, site, "zero", "all", rows)
    whole = from_layer(engine, captured, ids, pids, edit)
    shared = passes.shared_prefix(engine, captured, ids, pids, edit, _keys(pert, "all", ids))
    np.testing.assert_allclose(shared, whole, atol=1e-4)


@pytest.mark.parametrize(
    ("kind", "groups"),
    [("zero", "one"), ("mean", "lengths"), ("noise", "prompts"), ("patch", "one")],
)
def test_demonstrations_are_computed_once_per_group(llama_setup, kind, groups):
    """Zero: one pass over the demonstrations per job; mean: one per prompt length (prompts of
    three lengths here); noise: one per prompt; patching: one, unedited."""
    model, engine, ids, pids, _recorded, _before = llama_setup
    if kind != "patch":  # patching pairs prompts of equal length
        ids = _uneven(engine, ids)
    site = locate_sites(model)[1]
    captured = engine.capture_layer_inputs(ids, site)
    rows = _setup_rows(pids, kind)
    edit, pert = _edit(model, engine, ids, site, kind, "all", rows)
    run_ids, run_pids = [ids[k] for k in rows.run], [pids[k] for k in rows.prompt]
    prefix_passes = []
    layer = model.get_submodule(site.layers_path)[site.layer]
    handle = layer.register_forward_pre_hook(
        lambda _m, args, kwargs: (
            prefix_passes.append(1)
            if (args[0] if args else next(iter(kwargs.values()))).shape[1] == engine.prefix_len
            else None
        ),
        with_kwargs=True,
    )
    try:
        passes.shared_prefix(
            engine, captured, run_ids, run_pids, edit, _keys(pert, "all", run_ids), runs=rows.run
        )
    finally:
        handle.remove()
    want = {"one": 1, "lengths": 3, "prompts": len(run_ids)}[groups]
    assert len({len(x) for x in run_ids}) == (1 if kind == "patch" else 3)
    assert len(prefix_passes) == want


def test_segment_bounds_and_masks():
    prefix = Prefix(6, (2, 5), ((0, 3), (3, 6)))

    def where(position):
        return np.flatnonzero(segment(position, 10, prefix)).tolist()

    assert where("demonstrations") == [0, 1, 2, 3, 4, 5]
    assert where("review") == [6, 7, 8]
    assert where("last") == [9]
    assert where("all") == list(range(10))
    assert where("label_words") == [2, 5]
    assert where("demonstration_1") == [0, 1, 2]
    assert where("demonstration_2") == [3, 4, 5]
    with pytest.raises(ValueError, match="demonstration 3; the prompts have 2"):
        segment("demonstration_3", 10, prefix)
    with pytest.raises(ValueError, match="needs the label words placed"):
        segment("label_words", 10, Prefix(6))  # a length alone would edit nothing, silently
    with pytest.raises(ValueError, match="allowed: all, last, demonstrations, review"):
        segment("middle", 10, prefix)
    values = torch.arange(8.0).reshape(1, 4, 2)  # the last 4 positions of a 10-token prompt
    masked = only_segment(values, 10, segment("review", 10, prefix))
    assert torch.isnan(masked[0, 3]).all() and not torch.isnan(masked[0, :3]).any()
    masked = only_segment(values, 10, segment("demonstrations", 10, prefix))
    assert torch.isnan(masked).all()  # none of those positions is in the demonstrations
    masked = only_segment(
        torch.arange(20.0).reshape(1, 10, 2), 10, segment("label_words", 10, prefix)
    )
    assert (~torch.isnan(masked[0, :, 0])).nonzero().flatten().tolist() == [2, 5]


@pytest.mark.parametrize("kind", ["noise", "zero"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_rows_batched_of_any_size_equal_naive(llama_setup, kind, batch_size):
    """The rows of a group run ``batch_size`` at a time, right-padded: one at a time, a batch that
    leaves a partial one (3 of 4 rows) and one larger than the group, prompts of three lengths,
    two noise draws per prompt (rows draw-major in the batch)."""
    model, engine, ids, pids, _recorded, _before = llama_setup
    ids = _uneven(engine, ids)
    site = locate_sites(model)[1]
    captured = engine.capture_layer_inputs(ids, site)
    rows = _setup_rows(pids, kind)
    edit, _pert = _edit(model, engine, ids, site, kind, "review", rows)
    naive = passes.naive(engine, ids, pids, edit)
    fast = passes.shared_prefix(
        engine, captured, ids, pids, edit, ["clean"] * len(ids), batch_size=batch_size
    )
    assert fast.shape == (len(ids), edit.draws, 2) and edit.draws == (2 if kind == "noise" else 1)
    np.testing.assert_allclose(fast, naive, atol=1e-4)


def test_a_batch_size_below_one_is_refused(llama_setup):
    model, engine, ids, pids, _recorded, _before = llama_setup
    site = locate_sites(model)[1]
    edit, _pert = _edit(model, engine, ids, site, "zero", "all", _setup_rows(pids, "zero"))
    with pytest.raises(ValueError, match="batch_size 0 is not allowed"):
        passes.shared_prefix(engine, {"offsets": None}, ids, pids, edit, batch_size=0)


def test_the_last_mlp_runs_at_the_read_positions_only(llama_setup):
    """``last_mlp_at``: the last layer's MLP sees one position per row, the read one gets what the
    whole MLP gives there, every other position zeros; the module is back afterwards. A module
    that does not keep a position's shape (not a plain MLP) runs on every position instead."""
    from headperturb.model.surgery import AtPositions, last_mlp_at

    model = llama_setup[0]
    site = locate_sites(model)[1]
    layer = model.get_submodule(site.layers_path)[-1]
    original, seen = layer.mlp, []
    x = torch.randn(3, 5, model.config.hidden_size)
    where = torch.tensor([4, 0, 2])
    with last_mlp_at(model, site, where):
        assert isinstance(layer.mlp, AtPositions)
        handle = original.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape))
        out = layer.mlp(x)
        handle.remove()
    assert layer.mlp is original and seen == [(3, 1, model.config.hidden_size)]
    whole = original(x)
    rows = torch.arange(3)
    torch.testing.assert_close(out[rows, where], whole[rows, where])
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[rows, where] = False
    assert out[mask].abs().max() == 0 and whole[mask].abs().max() > 0

    def pooled(h):
        return h.mean(dim=1)  # mixes positions: not an MLP

    stand_in = AtPositions(pooled, where)
    torch.testing.assert_close(stand_in(x), pooled(x))


def test_a_recording_from_a_lower_recording_equals_one_from_the_embeddings(family_setup):
    """``capture_layer_inputs(start=...)``: the layers from a recorded lower layer up give the
    input of a higher layer that every layer from the embeddings gives, prompts of three
    lengths; a start at or above the layer is refused."""
    model, engine, ids, *_ = family_setup
    ids = _uneven(engine, ids)
    sites = locate_sites(model)
    direct = engine.capture_layer_inputs(ids, sites[3], batch_size=3)
    below = engine.capture_layer_inputs(ids, sites[1], batch_size=3)
    chained = engine.capture_layer_inputs(ids, sites[3], batch_size=3, start=(sites[1], below))
    assert len({len(x) for x in ids}) == 3
    for key in ("prefix", "suffix", "offsets"):
        torch.testing.assert_close(chained[key], direct[key], atol=1e-5, rtol=1e-5)
    assert (direct["suffix"] - below["suffix"]).abs().max() > 1e-3  # two layers moved it
    with pytest.raises(ValueError, match="starts from a lower layer, not 3"):
        engine.capture_layer_inputs(ids, sites[3], start=(sites[3], direct))

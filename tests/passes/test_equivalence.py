"""Every fast pass equals the reference (full forward passes with the hook) to 1e-4, for every
supported family.

Tiny random models with 4 layers, so that a middle layer has layers both below it (skipped by the
fast passes) and above it (recomputed), and the last layer takes the one-position path.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import from_layer
from tiny_models import edit_of, untouched

from headperturb.core import files
from headperturb.model import passes, tail
from headperturb.model.hooks import site_slice
from headperturb.model.rows import rows_for
from headperturb.model.sites import locate_sites


@pytest.mark.parametrize("where", ["o_proj_input", "o_proj_output"])
def test_last_layer_pass_equals_naive(family_setup, where):
    model, engine, ids, pids, recorded, before = family_setup
    site = locate_sites(model)[-1]
    np.testing.assert_allclose(
        recorded.logits, np.stack([passes.full(engine, x)[0] for x in ids]), atol=1e-4
    )
    edit = edit_of(model, site, 3, where=where)
    fast = passes.last_layer(engine, tail.layer_state(recorded.final_state, site.layer), pids, edit)
    naive = passes.naive(engine, ids, pids, edit)
    np.testing.assert_allclose(fast, naive, atol=1e-4)
    assert np.abs(fast - recorded.logits[:, None, :]).max() > 1e-3  # the noise moved something
    untouched(model, ids, before)


@pytest.mark.parametrize("layer", [0, 2])
def test_middle_layer_pass_equals_naive(family_setup, layer):
    model, engine, ids, pids, _recorded, before = family_setup
    site = locate_sites(model)[layer]
    captured = engine.capture_layer_inputs(ids, site)
    assert captured["prefix"].shape[0] == engine.prefix_len
    edit = edit_of(model, site, 1, repeats=2)
    fast = from_layer(engine, captured, ids, pids, edit)
    np.testing.assert_allclose(fast, passes.naive(engine, ids, pids, edit), atol=1e-4)
    untouched(model, ids, before)


@pytest.mark.parametrize("where", ["o_proj_input", "o_proj_output"])
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_final_position_pass_equals_naive_restricted_to_the_final_position(
    family_setup, family_cache, layer, where
):
    """positions: last at the first, a middle and the last layer: the final token alone through
    the layers above, with the recorded keys and values, against full forward passes whose hook
    edits the final position only."""
    model, engine, ids, pids, recorded, before = family_setup
    site = locate_sites(model)[layer]
    edit = edit_of(model, site, 1, where=where, position="last")
    fast = passes.final_position(
        engine, recorded.final_state, family_cache, pids, edit, rows_per_batch=5
    )
    naive = passes.naive(engine, ids, pids, edit)
    np.testing.assert_allclose(fast, naive, atol=1e-4)
    assert np.abs(naive - recorded.logits[:, None, :]).max() > 1e-4
    untouched(model, ids, before)


def test_the_baseline_records_the_keys_and_values_in_the_same_pass(family_setup, family_cache):
    """One pass for the function-vector scores' corrupted prompts: the baseline asked for the keys
    and values gives capture_cache's tensors and the baseline's own logits and final state."""
    model, engine, ids, _pids, recorded, _before = family_setup
    both = engine.baseline(ids, locate_sites(model), batch_size=3, keys_values=True)
    kv = both.keys_values
    assert sorted(kv) == sorted(family_cache)
    for key, value in family_cache.items():
        np.testing.assert_allclose(kv[key].numpy(), value.numpy(), atol=1e-5, err_msg=key)
    np.testing.assert_allclose(both.logits, recorded.logits, atol=1e-5)
    for key, value in recorded.final_state.items():
        np.testing.assert_allclose(both.final_state[key], value, atol=1e-5, err_msg=key)
    assert recorded.keys_values is None  # only when asked for


@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
@pytest.mark.parametrize("layer", [2, 3])
@pytest.mark.parametrize("position", ["all", "last"])
def test_ablations_fast_equal_naive(family_setup, family_cache, kind, layer, position):
    """Ablations through the fast passes (final state at the last layer or the final position,
    recorded layer input below it) against full forward passes."""
    model, engine, ids, pids, recorded, _before = family_setup
    site = locate_sites(model)[layer]
    cols = site_slice(model, site, 2, "o_proj_input")
    from_state = layer == 3 or position == "last"
    full_clean = passes.clean_outputs(engine, ids, site, 2, "o_proj_input")
    if position == "last":
        full_clean = [c[-1:] for c in full_clean]
    naive = passes.naive(
        engine, ids, pids, edit_of(model, site, 2, kind, clean=full_clean, position=position)
    )
    if from_state:
        clean = tail.final_outputs(
            tail.layer_state(recorded.final_state, layer), cols, "o_proj_input"
        )
    else:
        captured = engine.capture_layer_inputs(ids, site)
        clean = passes.clean_outputs(engine, ids, site, 2, "o_proj_input", captured)
    edit = edit_of(model, site, 2, kind, clean=clean, position=position)
    if layer == 3:
        fast = passes.last_layer(engine, tail.layer_state(recorded.final_state, 3), pids, edit)
    elif position == "last":
        fast = passes.final_position(engine, recorded.final_state, family_cache, pids, edit)
    else:
        fast = from_layer(engine, captured, ids, pids, edit)
    np.testing.assert_allclose(fast, naive, atol=1e-4)


@pytest.mark.parametrize("where", ["o_proj_input", "o_proj_output"])
def test_exported_last_layer_equals_naive(family_setup, where, tmp_path):
    """The program the baseline exports (saved and loaded back) gives the full forward passes'
    numbers, for noise and for a set (zero) ablation, and carries only the last layer."""
    model, engine, ids, pids, recorded, before = family_setup
    site = locate_sites(model)[-1]
    state = tail.layer_state(recorded.final_state, site.layer)
    exported = tail.export(model, site, engine.token_ids, state)
    untouched(model, ids, before)
    vocab = model.get_input_embeddings().num_embeddings
    assert all(vocab not in t.shape for t in exported.state_dict.values())
    meta = tail.describe(model, site, engine.token_ids, "cpu", "float32")
    tail.save(tmp_path / "program", exported, meta)
    program, loaded = tail.load(tmp_path / "program", "cpu")
    assert loaded == {
        **meta,
        "exported": True,
        "program_sha256": files.sha256_file(tmp_path / "program/program.pt2"),
    }
    for kind in ("noise", "zero"):
        edit = edit_of(model, site, 3, kind, where=where)
        fast = tail.perturbed(program, state, pids, loaded, edit)
        np.testing.assert_allclose(fast, passes.naive(engine, ids, pids, edit), atol=1e-4)
        if kind == "noise":
            assert np.abs(fast - recorded.logits[:, None, :]).max() > 1e-3  # it moved the logits


def test_last_layer_program_refuses_another_layer(family_setup):
    model, engine, *_ = family_setup
    with pytest.raises(ValueError, match="not the last layer"):
        with tail.last_layer(model, locate_sites(model)[1], engine.token_ids):
            pass


@pytest.mark.parametrize("kind", ["patch", "restore"])
@pytest.mark.parametrize("layer", [2, 3])
@pytest.mark.parametrize("position", ["all", "last"])
@pytest.mark.parametrize("where", ["o_proj_input", "o_proj_output"])
def test_patching_fast_equals_naive(family_setup, family_cache, kind, layer, position, where):
    """Patching from the opposite review (patch: the prompt with its partner's head output;
    restore: the partner with the prompt's) through the fast passes, against full forward passes
    with the partner's (or the prompt's) recorded head output substituted."""
    import pandas as pd

    from headperturb.core import kinds

    model, engine, ids, pids, recorded, _before = family_setup
    site = locate_sites(model)[layer]
    cols = site_slice(model, site, 1, where)
    # partners as prompts/pairs.parquet gives them (the passes do not look at the labels)
    pairs = pd.DataFrame({"prompt_id": pids, "partner_id": [pids[1], pids[0], pids[3], pids[0]]})
    assert all(len(ids[i]) == len(ids[j]) for i, j in ((0, 1), (1, 0), (2, 3), (3, 0)))
    pert = kinds.build(kind)
    rows = rows_for(pert, pids, pairs)
    assert rows.partner == [1, 0, 3, 0]
    assert rows.run == (rows.partner if kind == "restore" else [0, 1, 2, 3])

    def edit(clean):
        values = pert.values(
            seed=0,
            layer=layer,
            head=1,
            width=cols.stop - cols.start,
            repeats=1,
            clean=clean,
            donors=rows.donors,
        )
        from headperturb.model.hooks import Edit

        return Edit(site, 1, where, values, pert.apply, 1, position)

    full_clean = passes.clean_outputs(engine, ids, site, 1, where)
    if position == "last":
        full_clean = [c[-1:] for c in full_clean]
    run_ids, run_pids = [ids[k] for k in rows.run], [pids[k] for k in rows.prompt]
    naive = passes.naive(engine, run_ids, run_pids, edit(full_clean))
    if layer == 3 or position == "last":
        state = tail.layer_state(recorded.final_state, layer)
        clean = tail.final_outputs(state, cols, where)
        if layer == 3:
            fast = passes.last_layer(engine, tail.rows_of(state, rows.run), run_pids, edit(clean))
        else:
            fast = passes.final_position(
                engine, recorded.final_state, family_cache, run_pids, edit(clean), runs=rows.run
            )
    else:
        captured = engine.capture_layer_inputs(ids, site)
        clean = passes.clean_outputs(engine, ids, site, 1, where, captured)
        fast = from_layer(engine, captured, run_ids, run_pids, edit(clean), runs=rows.run)
    np.testing.assert_allclose(fast, naive, atol=1e-4)
    # the patch moved something: the prompts' logits are not their own unperturbed ones
    unperturbed = recorded.logits[rows.run][:, None, :]
    assert np.abs(naive - unperturbed).max() > 1e-5

"""Sets of heads perturbed together (joint-ablation curves): the fast passes equal full forward
passes with every member's hook, at the final position and at every position, in every supported
family; and a planted redundant pair is weak alone and strong together."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from reference import from_layer
from tiny_models import untouched

from headperturb.core import kinds
from headperturb.core.sets import SetJob
from headperturb.data.parts import Prefix
from headperturb.model import gradients, headset, passes, run
from headperturb.model.hooks import AT_SITE, site_slice
from headperturb.model.rows import rows_for
from headperturb.model.sites import locate_sites
from headperturb.model.target import build_edit

MEMBERS = [(1, 0), (2, 3), (3, 1), (1, 2)]  # three layers, two heads of the lowest


def set_edit(job, members, engine, sites, rows, state=None, means=None, clean=None):
    """The EditSet of ``job`` on ``members``, each member's clean output from the baseline's final
    state, from the heads' means (every position) or given (``clean[(layer, head)]``)."""
    if clean is not None:
        clean_of = lambda site, head, _cols: clean[(site.layer, head)]  # noqa: E731
    elif state is not None:
        clean_of = run._from_state(state, job.site)
    elif means is not None:
        clean_of = lambda site, _head, cols: [means[site.layer][:, cols]]  # noqa: E731
    else:
        clean_of = None
    return build_edit(
        headset.target(job, members),
        site_of=lambda layer: sites[layer],
        cols_of=lambda site, head: site_slice(engine.model, site, head, job.site),
        clean_of=clean_of,
        donors=rows.donors,
        prefix=Prefix(engine.prefix_len),
    )


def _rows(kind, pids):
    pairs = pd.DataFrame({"prompt_id": pids, "partner_id": [pids[1], pids[0], pids[3], pids[0]]})
    return rows_for(kinds.build(kind), pids, pairs)


def _naive(model, engine, ids, pids, job, rows):
    sites = locate_sites(model)
    clean = None
    if kinds.build(job.kind).needs_clean:
        clean = {
            (lay, h): passes.clean_outputs(engine, ids, sites[lay], h, job.site)
            for lay, h in MEMBERS
        }
        if job.position == "last":
            clean = {key: [c[-1:] for c in value] for key, value in clean.items()}
    edit = set_edit(job, MEMBERS, engine, sites, rows, clean=clean)
    return passes.naive(engine, [ids[k] for k in rows.run], [pids[k] for k in rows.prompt], edit)


@pytest.mark.parametrize("kind", ["zero", "mean", "patch"])
@pytest.mark.parametrize("where", ["o_proj_input", "o_proj_output"])
def test_set_at_the_final_position_equals_naive(family_setup, family_cache, kind, where):
    model, engine, ids, pids, recorded, before = family_setup
    job = SetJob(where, "last", kind, "random", 0, "remove", len(MEMBERS))
    rows = _rows(kind, pids)
    edit = set_edit(job, MEMBERS, engine, locate_sites(model), rows, state=recorded.final_state)
    assert edit.site.layer == 1 and len(edit.members) == len(MEMBERS)
    run_pids = [pids[k] for k in rows.prompt]
    fast = passes.final_position(
        engine, recorded.final_state, family_cache, run_pids, edit, runs=rows.run
    )
    naive = _naive(model, engine, ids, pids, job, rows)
    np.testing.assert_allclose(fast, naive, atol=1e-4)
    assert np.abs(naive[:, 0] - recorded.logits[rows.run]).max() > 1e-4  # the set moved something
    untouched(model, ids, before)


@pytest.mark.parametrize("kind", ["zero", "mean", "patch"])
@pytest.mark.parametrize("where", ["o_proj_input", "o_proj_output"])
def test_set_at_every_position_equals_naive(family_setup, kind, where):
    model, engine, ids, pids, recorded, before = family_setup
    sites = locate_sites(model)
    job = SetJob(where, "all", kind, "random", 0, "remove", len(MEMBERS))
    rows = _rows(kind, pids)
    captured = engine.capture_layer_inputs(ids, sites[1])
    run_ids, run_pids = [ids[k] for k in rows.run], [pids[k] for k in rows.prompt]
    if kind == "patch":
        by_site = {}
        for lay, h in MEMBERS:
            by_site.setdefault(sites[lay], []).append(site_slice(model, sites[lay], h, where))
        fast = passes.partner_patched(
            engine, captured, run_ids, AT_SITE[where], by_site, rows.run, rows.donors
        )
    else:
        means = gradients.head_means(engine, ids, [sites[1], sites[2], sites[3]], where=where)
        edit = set_edit(job, MEMBERS, engine, sites, rows, means=means)
        fast = from_layer(engine, captured, run_ids, run_pids, edit, runs=rows.run)
    naive = _naive(model, engine, ids, pids, job, rows)
    np.testing.assert_allclose(fast, naive, atol=1e-4)
    assert np.abs(naive[:, 0] - recorded.logits[rows.run]).max() > 1e-4
    untouched(model, ids, before)


def test_a_set_of_one_is_the_single_head_job(family_setup, family_cache):
    """The set machinery with one member gives the single-head job's numbers."""
    from tiny_models import edit_of

    model, engine, ids, pids, recorded, _before = family_setup
    sites = locate_sites(model)
    job = SetJob("o_proj_input", "last", "zero", "screen", 0, "single", 1)
    edit = set_edit(job, [(2, 3)], engine, sites, _rows("zero", pids))
    single = edit_of(model, sites[2], 3, "zero", position="last")
    np.testing.assert_allclose(
        passes.final_position(engine, recorded.final_state, family_cache, pids, edit),
        passes.final_position(engine, recorded.final_state, family_cache, pids, single),
        atol=1e-6,
    )


def test_a_redundant_pair_is_weak_alone_and_strong_together(llama_setup):
    """Plant redundancy: two heads of the last layer each switch on the same signal (a saturating
    OR of their final-position outputs, added along the margin's direction after the final norm),
    against a negative offset. Removing either alone leaves the signal on (LOW); removing both
    turns it off (HIGH), so their interaction (joint change minus the sum of the single changes)
    is large and negative: they back each other up."""
    import pandas as pd
    import torch

    from headperturb.analysis import curves, stats
    from headperturb.model import direct

    model, engine, ids, pids, _recorded, _before = llama_setup
    sites = locate_sites(model)
    pair, site = [(3, 0), (3, 1)], sites[3]
    seen = {}

    def grab(_m, args, _out):
        z = args[0][:, -1]
        seen["on"] = sum(
            z[:, site_slice(model, site, h, "o_proj_input")].norm(dim=-1) for _, h in pair
        )

    d, _ = direct.margin_direction(model, engine.token_ids)
    along = (d / d.dot(d)).float()

    def plant(
        _m, _a, out
    ):  # margin += 10 tanh(100 (|z0| + |z1|)) - 5: +5 with either head, -5 without
        return out + ((10 * torch.tanh(100 * seen["on"]) - 5)[:, None, None] * along)

    handles = [
        model.get_submodule(site.module_name).register_forward_hook(grab),
        model.get_submodule(direct.final_norm_name(model)).register_forward_hook(plant),
    ]
    labels = np.ones(len(ids), dtype=int)
    rows = _rows("zero", pids)
    try:
        clean = np.array([np.diff(passes.full(engine, x)[0])[0] for x in ids])

        def removed(members):
            job = SetJob("o_proj_input", "last", "zero", "exact", 0, "remove", len(members))
            return _margins_of(
                passes.naive(engine, ids, pids, set_edit(job, members, engine, sites, rows))
            )

        alone = [removed([head]) for head in pair]
        both = removed(pair)
    finally:
        for h in handles:
            h.remove()
    assert (clean > 0).all()  # the planted signal decides every prompt

    def accuracy_change(margins):
        return float(((clean > 0) == labels).mean() - ((margins > 0) == labels).mean())

    def change(margins):
        return pd.Series(
            stats.correct_logit_diff(labels, clean) - stats.correct_logit_diff(labels, margins),
            index=pids,
        )

    assert [stats.impact_category(100 * accuracy_change(m)) for m in alone] == ["LOW", "LOW"]
    assert stats.impact_category(100 * accuracy_change(both)) == "HIGH"
    inter = curves.interaction(change(both), [change(m) for m in alone], n_boot=200)
    assert inter["interaction_logit_diff"] < -5 and inter["ci_high_interaction_logit_diff"] < 0


def _margins_of(logits):
    return logits[:, 0, 1] - logits[:, 0, 0]

"""One pass decision: plan() chooses the pass of head jobs and set jobs alike, the plan carries its
layer, draws, recordings and cost, and run() has a runner for every pass plan() can name."""

from __future__ import annotations

import pytest

from headperturb.core import plans
from headperturb.core.sets import SetJob
from headperturb.core.spec import HeadJob

pytestmark = pytest.mark.unit


def test_set_jobs_get_their_pass_from_plan():
    def plan_of(position, kind, method="fast", lowest=7):
        job = SetJob("o_proj_input", position, kind, "screen", 0, "remove", 4)
        return plans.plan(job, method, 30, lowest=lowest)

    assert plan_of("last", "mean").name == "final_position"
    assert plan_of("last", "mean").recordings == ("state", "cache")
    assert plan_of("all", "zero").name == "shared_prefix"
    assert plan_of("all", "patch").name == "partner_patched"
    assert plan_of("all", "mean").recordings == ("activations",)
    assert plan_of("all", "mean").layer == 7  # from the lowest member's layer
    assert plan_of("all", "zero", "naive").name == "naive"
    assert plan_of("all", "zero", "naive").recordings == ()


def test_a_plan_carries_its_layer_draws_and_cost():
    noise = HeadJob("o_proj_input", "all", "noise", "2", 10, 0)
    plan = plans.plan(noise, "fast", 30, repeats=5)
    assert (plan.name, plan.layer, plan.n_layers, plan.draws) == ("shared_prefix", 10, 30, 5)
    # 20 layers from the job's up, 5 draws, 100 tokens of which 20 are the prompt's own
    assert plan.cost(100.0, own=20.0, shared=0.5) == (5 * 20 * (20 + 0.5 * 80), 0.0)
    last = plans.plan(HeadJob("o_proj_input", "last", "zero", "", 10, 0), "fast", 30)
    assert last.draws == 1 and last.cost(100.0) == (0.0, 20.0)
    naive = plans.plan(noise, "naive", 30, repeats=5)
    assert naive.cost(100.0) == (5 * 100.0 * 30, 0.0)


def test_the_unperturbed_plan_says_why():
    job = HeadJob("o_proj_input", "demonstrations", "patch", "", 3, 0)
    plan = plans.plan(job, "fast", 30)
    assert plan.name == "unperturbed" and "partner" in plan.note


def test_every_pass_has_a_runner():
    from headperturb.model.run import RUNNERS

    assert set(RUNNERS) == set(plans.PASSES)


def test_every_kind_edits_affinely():
    """The exported last layer reads keep = apply(1, 0) and add = apply(0, v) off each kind's
    edit (model.tail.edits): that is the kind's edit only where apply(z, v) = keep * z + add."""
    import torch

    from headperturb.core.kinds import PERTURBATIONS

    gen = torch.Generator().manual_seed(0)
    z, v = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    for kind, cls in PERTURBATIONS.items():
        keep, add = cls.apply(torch.ones_like(z), torch.zeros_like(v)), cls.apply(0 * z, v)
        torch.testing.assert_close(cls.apply(z, v), keep * z + add, msg=kind)
    assert torch.equal(PERTURBATIONS["noise"].apply(z, v), z + v)
    assert torch.equal(PERTURBATIONS["zero"].apply(z, v), v)

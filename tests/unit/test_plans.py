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

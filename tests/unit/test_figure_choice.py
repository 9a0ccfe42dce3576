"""Which figures a run draws (headperturb.analysis.figures.chosen), from its config alone, against
hand-written expectations."""

from __future__ import annotations

import pytest

from headperturb.analysis.figures import PLOTS, chosen

pytestmark = pytest.mark.unit

ALWAYS = ["contribution_distributions", "detailed_head_analysis"]


def _config(screen=False, direct=False, **perturbation):
    """A validated config's keys that the choice reads: one sweep of layer 0's heads, zero
    ablation at every position, unless ``perturbation`` says otherwise."""
    defaults = {"layers": [0], "heads": "all", "kinds": ["zero"], "scales": [2.0]}
    defaults |= {"positions": ["all"], "sites": ["o_proj_input"]}
    return {
        "perturbation": defaults | perturbation,
        "screen": {"enabled": screen},
        "direct_effects": {"enabled": direct},
    }


@pytest.mark.parametrize(
    ("perturbation", "expected"),
    [
        ({}, ALWAYS),
        # several layers: the heatmap
        ({"layers": "all"}, [*ALWAYS, "layer_head_heatmap"]),
        ({"layers": [0, 1]}, [*ALWAYS, "layer_head_heatmap"]),
        ({"sweeps": [{"layers": [0]}, {"layers": 1}]}, [*ALWAYS, "layer_head_heatmap"]),
        ({"layers": 3}, ALWAYS),
        ({"sweeps": [{"layers": [-1]}, {"layers": [-1]}]}, ALWAYS),
        # several noise scales: the scale plot; 2 and 2.0 are one scale, zero takes none
        ({"kinds": ["noise"], "scales": [1.0, 2.0]}, [*ALWAYS, "contribution_vs_scale"]),
        ({"kinds": ["noise"], "scales": [2, 2.0]}, ALWAYS),
        ({"kinds": ["zero", "mean"], "scales": [1.0, 2.0]}, ALWAYS),
        (
            {"sweeps": [{"kinds": ["noise"], "scales": [1.0]}, {"kinds": ["noise"]}]},
            [*ALWAYS, "contribution_vs_scale"],
        ),
        # two segments of the prompt or more: the segment map
        ({"positions": ["demonstrations", "review"]}, [*ALWAYS, "segment_map"]),
        (
            {"sweeps": [{"positions": ["last"]}, {"positions": "review"}]},
            [*ALWAYS, "segment_map"],
        ),
        ({"positions": ["all", "last"]}, ALWAYS),
        # the screen runs for a screened sweep or a curve ordered by it
        ({"heads": {"screen_top": 4, "random": 2}}, [*ALWAYS, "screen_map"]),
        ({"curves": [{"kinds": ["zero"]}]}, [*ALWAYS, "screen_map", "ablation_curves"]),
        ({"curves": [{"kinds": ["zero"], "orders": ["random"]}]}, [*ALWAYS, "ablation_curves"]),
    ],
)
def test_the_figures_a_perturbation_asks_for(perturbation, expected):
    assert chosen(_config(**perturbation)) == expected


def test_the_screen_and_direct_effects_add_their_figures():
    assert chosen(_config(screen=True)) == [*ALWAYS, "screen_map"]
    assert chosen(_config(direct=True)) == [*ALWAYS, "direct_vs_total"]


def test_every_figure_in_the_order_of_plots():
    """The shipped config's kind of run: a sweep of the last layer with noise, one of the whole
    model, a curve by the screen's order, the screen and direct effects."""
    config = _config(
        screen=True,
        direct=True,
        scales=[0.5, 2.0],
        sweeps=[
            {"layers": [-1], "positions": ["all"], "kinds": ["noise", "zero"]},
            {"layers": "all", "positions": ["last", "demonstrations"], "kinds": ["zero"]},
        ],
        curves=[{"kinds": ["mean"], "orders": ["screen", "random"]}],
    )
    assert chosen(config) == list(PLOTS)

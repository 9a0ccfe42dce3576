"""What kind of head each one is, drawn: where every head looks (a layers x heads map per part
of the prompt) and one card per head the summary names (an example prompt coloured by the head's
attention from the final position, its attention by part over every prompt, its type scores and
what it writes)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from headperturb.analysis.anatomy import TYPE_SCORES, of_head
from headperturb.analysis.figures.common import save, subplots
from headperturb.analysis.summary.anatomy import PART_NAMES, TYPE_NAMES
from headperturb.data.parts import PARTS

PART_COLOURS = {
    "first": "#000000",
    "demonstrations": "#0072B2",
    "label_words": "#D55E00",
    "template": "#999999",
    "review": "#009E73",
    "final_template": "#CC79A7",
}
"""One colour per part of the prompt, the same in every figure (Okabe-Ito)."""


def attention_map(shares: pd.DataFrame, run_name: str, out_path) -> None:
    """Per part of the prompt, a layers x heads map of every head's mean share of attention from
    the final position."""
    fig, axes = subplots(2, 3, (13, 8.5))
    fig.set_layout_engine("constrained")
    for ax, name in zip(axes.flat, PARTS):
        grid = shares[shares["part"] == name].pivot(index="layer", columns="head", values="share")
        image = ax.imshow(
            grid.to_numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto", origin="lower"
        )
        ax.set_title(f"on the {PART_NAMES[name]}")
        ax.set_xticks(range(len(grid.columns)), grid.columns, fontsize=7)
        step = max(1, len(grid.index) // 16)
        ax.set_yticks(range(0, len(grid.index), step), grid.index[::step], fontsize=7)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes, label="mean share of attention from the final position")
    fig.suptitle(
        f"Where each head looks from the final position, mean over the prompts (run {run_name})"
    )
    save(fig, out_path)


FONT = 6.5
"""The example prompt's font size (monospace: a character is 0.6 of it wide)."""


def _prompt_text(ax, weights: np.ndarray, tokens: pd.DataFrame, inches: float) -> None:
    """The example prompt, token by token, each on a background as dark as the head's attention
    on it and in its part's colour, in lines of as many characters as ``inches`` hold."""
    from matplotlib.patches import Rectangle

    width = int(inches * 72 / (0.6 * FONT))
    top = max(float(weights.max()), 1e-9)
    x = line = 0
    for (_, token), weight in zip(tokens.iterrows(), weights):
        for k, piece in enumerate(str(token["token"]).split("\n")):
            if k:
                x, line = 0, line + 1
            if x + len(piece) > width:
                x, line = 0, line + 1
            if not piece:
                continue
            shade = (1 - 0.55 * weight / top,) * 3  # grey: darker, more attention
            ax.add_patch(Rectangle((x, line), len(piece), 1, color=shade, linewidth=0))
            colour = PART_COLOURS[token["part"]]
            ax.text(x, line + 0.8, piece, fontsize=FONT, family="monospace", color=colour)
            x += len(piece)
    ax.set_xlim(0, width)
    ax.set_ylim(line + 1, 0)
    ax.set_axis_off()


def _bars(ax, rows: pd.DataFrame, labels: list[str], colours, heading: str) -> None:
    y = np.arange(len(rows))
    value = rows.iloc[:, 0].to_numpy()
    errors = np.abs(rows[["ci_low", "ci_high"]].to_numpy().T - value)
    ax.barh(y, value, xerr=errors, color=colours, capsize=2)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_title(heading)


def _writes(ax, row: pd.Series) -> None:
    """The tokens the head's contrast write (positive minus negative reviews) most promotes and
    suppresses, in logits."""
    texts = [*row["promoted_text"][:8], *row["suppressed_text"][:8][::-1]]
    values = [*row["promoted_logits"][:8], *row["suppressed_logits"][:8][::-1]]
    colours = ["#009E73" if v > 0 else "#D55E00" for v in values]
    y = np.arange(len(values))
    ax.barh(y, values, color=colours)
    ax.set_yticks(y, [repr(t) for t in texts], fontsize=7, family="monospace")
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_title(f"writes, positive minus negative reviews\n(label gap {row['label_gap']:+.3f})")
    ax.set_xlabel("logit, read at the unembedding")


def head_card(found: dict, layer: int, head: int, run_name: str, out_path) -> None:
    """One head's card (``found``: the anatomy tables, with ``examples`` and ``tokens``)."""
    fig = subplots(1, 1, (13, 9))[0]
    fig.clear()
    grid = fig.add_gridspec(2, 3, height_ratios=[1.5, 1])
    this = {
        name: of_head(found[name], layer, head)
        for name in ("shares", "types", "writes", "examples")
    }
    example = this["examples"].iloc[0]
    tokens = found["tokens"][found["tokens"]["prompt_id"] == example["prompt_id"]]
    text_ax = fig.add_subplot(grid[0, :])
    _prompt_text(text_ax, np.asarray(example["weights"]), tokens, inches=12.5)
    label = ("negative", "positive")[int(tokens["label"].iloc[0])]
    text_ax.set_title(
        f"layer {layer} head {head}: attention from the final position on an example prompt "
        f"(a {label} review; darker: more attention; colour: the part)",
        loc="left",
    )
    shares = this["shares"].set_index("part").loc[list(PARTS), ["share", "ci_low", "ci_high"]]
    names = [PART_NAMES[p] for p in PARTS]
    colours = [PART_COLOURS[p] for p in PARTS]
    _bars(fig.add_subplot(grid[1, 0]), shares, names, colours, "attention by part, every prompt")
    types = this["types"].set_index("type").loc[list(TYPE_SCORES), ["score", "ci_low", "ci_high"]]
    type_names = list(TYPE_NAMES.values())
    _bars(
        fig.add_subplot(grid[1, 1]), types, type_names, "#56B4E9", "type scores (repeated tokens)"
    )
    writes = this["writes"].set_index("write")
    _writes(fig.add_subplot(grid[1, 2]), writes.loc["contrast"])
    fig.suptitle(f"Head card: layer {layer} head {head} (run {run_name}); 95% intervals")
    fig.set_layout_engine("constrained")
    save(fig, out_path)

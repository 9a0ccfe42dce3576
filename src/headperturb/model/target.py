"""What a job perturbs (:class:`Target`: one head, or a set of heads, with one kind), the edit it
makes (:func:`build_edit`) and what its pass gives back (:class:`Result`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headperturb.core.kinds import Perturbation
from headperturb.data.parts import Prefix
from headperturb.model.hooks import Edit, EditSet


@dataclass(frozen=True)
class Target:
    """What a job perturbs: the heads ``members`` ((layer, head) pairs) at ``where`` (the site)
    and ``position``, with ``perturbation`` (seeded by ``seed``, ``repeats`` noise draws).
    ``is_set``: a set job, whose edit is an :class:`~headperturb.model.hooks.EditSet` and whose
    mean ablation at every position averages each member's output in one pass over the prompts
    (:func:`headperturb.model.gradients.head_means`). ``what`` names it in logs."""

    members: tuple[tuple[int, int], ...]
    where: str
    position: str
    perturbation: Perturbation
    seed: int = 0
    repeats: int = 1
    is_set: bool = False
    what: str = ""

    @property
    def draws(self) -> int:
        return self.perturbation.draws(self.repeats)


@dataclass
class Result:
    """The logits of one job, (rows, draws, 2), and what produced them."""

    prompt_ids: list[int]
    labels: np.ndarray
    logits: np.ndarray
    model_info: dict
    device: str
    engine: str  # "program", "model" or "unperturbed"
    partner_ids: list[int] | None = None


def build_edit(target: Target, site_of, cols_of, clean_of, donors=None, prefix=None):
    """The edit of ``target``: for each member, its site (``site_of(layer)``), its columns
    (``cols_of(site, head)``), its clean output where its kind needs it (``clean_of(site, head,
    cols)``, one tensor per prompt) and its kind's values and function. ``donors``: for a paired
    kind, whose clean output each row takes; ``prefix``: where the demonstrations lie
    (:class:`~headperturb.data.parts.Prefix`; None: none)."""
    pert = target.perturbation
    edits = []
    for layer, head in target.members:
        site = site_of(layer)
        cols = cols_of(site, head)
        clean = clean_of(site, head, cols) if pert.needs_clean else None
        extra = {"donors": donors} if pert.paired else {}
        values = pert.values(
            seed=target.seed,
            layer=layer,
            head=head,
            width=cols.stop - cols.start,
            repeats=target.repeats,
            clean=clean,
            **extra,
        )
        draws, position = target.draws, target.position
        edits.append(
            Edit(site, head, target.where, values, pert.apply, draws, position, prefix or Prefix())
        )
    return EditSet(tuple(edits)) if target.is_set else edits[0]

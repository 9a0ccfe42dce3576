"""Which recorded prompt each row of a job runs, and whose head output it takes: the one place
that turns the prompts' pairs (``prompts/pairs.parquet``: prompt_id, partner_id, -1 for none)
into indices of the run's prompts."""

from __future__ import annotations

from dataclasses import dataclass

from headperturb.core import files


@dataclass(frozen=True)
class Rows:
    """The rows a job scores, as indices into the run's prompts: the prompt each row is scored for
    (``prompt``: its id and label) and, for the paired kinds, the prompt's opposite-sentiment
    partner. Every prompt runs for itself unless the kind is paired: ``patch`` runs each paired
    prompt with its partner's head output, ``restore`` (``runs_partner``) runs the partner with
    the prompt's."""

    prompt: list[int]
    partner: list[int] | None = None
    runs_partner: bool = False

    @property
    def run(self) -> list[int]:
        """The recorded prompt each row runs."""
        return self.partner if self.runs_partner else self.prompt

    @property
    def donors(self) -> list[int] | None:
        """For a paired kind, whose clean head output each row takes."""
        if self.partner is None:
            return None
        return self.prompt if self.runs_partner else self.partner


def read_pairs(path) -> dict:
    """The pairs' ``prompt_id`` and ``partner_id`` columns."""
    return files.read_columns(path, ["prompt_id", "partner_id"])


def partner_index(pairs: dict, prompt_ids: list[int]) -> list[tuple[int, int]]:
    """(prompt's index, partner's index) in ``prompt_ids`` for every prompt of ``pairs`` that has
    a partner, in the pairs' order."""
    index = {int(pid): i for i, pid in enumerate(prompt_ids)}
    found = zip(pairs["prompt_id"], pairs["partner_id"])
    return [(index[int(p)], index[int(q)]) for p, q in found if q >= 0]


def partners_of(pairs: dict, prompt_ids: list[int]) -> list[int]:
    """For each prompt of ``prompt_ids``, in that order, its partner's index there, or -1."""
    partner = dict(partner_index(pairs, prompt_ids))
    return [partner.get(i, -1) for i in range(len(prompt_ids))]


def rows_for(pert, prompt_ids: list[int], pairs=None, where: str = "the pairs") -> Rows:
    """The :class:`Rows` of perturbation ``pert`` on the prompts ``prompt_ids`` (in recorded
    order), with ``pairs`` (prompt_id, partner_id) for a paired kind."""
    if not pert.paired:
        return Rows(list(range(len(prompt_ids))))
    if sorted(int(p) for p in prompt_ids) != sorted(int(p) for p in pairs["prompt_id"]):
        raise ValueError(f"{where} pair other prompts than the run's")
    paired = partner_index(pairs, prompt_ids)
    if not paired:
        raise ValueError(
            f"{pert.kind}: no test prompt has an opposite-sentiment partner of the same length "
            f"({where}); raise prompts.n_test, or lower prompts.max_review_tokens so that "
            "more reviews are cut to the same length"
        )
    prompt = [a for a, _ in paired]
    partner = [b for _, b in paired]
    return Rows(prompt, partner, pert.runs_partner)


def job_rows(pert, prompt_ids: list[int], pairs_path=None) -> Rows:
    """The :class:`Rows` of ``pert`` on the run's prompts, reading the pairs for a paired kind."""
    if not pert.paired:
        return rows_for(pert, prompt_ids)
    if pairs_path is None:
        raise ValueError(f"{pert.kind} needs the prompts' pairs (prompts/pairs.parquet)")
    return rows_for(pert, prompt_ids, read_pairs(pairs_path), str(pairs_path))

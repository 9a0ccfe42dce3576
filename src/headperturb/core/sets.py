"""Heads together: which sets of heads the config's joint-ablation curves ask for
(``perturbation.curves``), and where their files go.

A *set job* (:class:`SetJob`) perturbs several heads together: a point of a joint-ablation curve,
``sets/<site>/<position>/<kind>/<order>/<mode>/k<k>.parquet``, its heads the ``k``
highest-ranked under an order (``sets/.../ranking.parquet``). Pure helpers, standard library
only, for the Snakefile and the library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from itertools import product

from headperturb.core.spec import SITES, SpecError

ANATOMY_ORDERS = (
    "induction",
    "function_vector",
    "label_attention",
    "induction_exclusive",
    "function_vector_exclusive",
)
"""Orders by what kind of head each one is (:func:`headperturb.analysis.anatomy.order_scores`):
the induction score, the function-vector score, the share of the final position's attention on
the demonstrations' label words, and induction without the top function-vector heads and the
reverse (the exclusion controls)."""

ORDERS = ("screen", "exact", "random", *ANATOMY_ORDERS)
"""How the heads of a curve are ranked: the screen's estimate of each head's contribution to the
correct-label logit difference (same kind and position), the run's exact single-head measurement
of the same setting, a seeded random order (the control), or a kind of head
(:data:`ANATOMY_ORDERS`)."""

ORDER_PATTERN = "|".join(["screen", "exact", r"random\d+", *ANATOMY_ORDERS])
"""The order names of set and ranking files (a random order's holds its seed)."""

SET_MODES = ("remove", "keep", "single")
"""``remove``: the k highest-ranked heads perturbed together; ``keep``: every other head perturbed
(the k kept); ``single``: the k-th ranked head alone (for the interaction at small k)."""


@dataclass(frozen=True, order=True)
class SetJob:
    """A set of heads perturbed together: the ``k`` highest-ranked heads under ``order`` (with
    ``seed`` for the random order), removed or kept (``mode``), with one ``kind`` at ``position``
    of ``site``."""

    site: str
    position: str
    kind: str
    order: str
    seed: int
    mode: str
    k: int

    @property
    def order_name(self) -> str:
        return f"random{self.seed}" if self.order == "random" else self.order

    def path(self, results: str) -> str:
        return set_path(
            results, self.site, self.position, self.kind, self.order_name, self.mode, self.k
        )

    def ranking(self, results: str) -> str:
        """Where the ranking of its order lives."""
        return ranking_path(results, self.site, self.position, self.kind, self.order_name)

    def mib_nodes(self, results: str) -> str:
        """Where its order's head scores live as MIB's node-level circuit file."""
        return mib_path(results, self.site, self.position, self.kind, self.order_name)

    @classmethod
    def from_wildcards(cls, site, position, kind, order, mode, k) -> SetJob:
        name, seed = parse_order(order)
        return cls(site, position, kind, name, seed, mode, int(k))

    def members(self, ranking: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The (layer, head) pairs it perturbs, from every head ranked best first."""
        if self.mode == "remove":
            return sorted(ranking[: self.k])
        if self.mode == "keep":
            return sorted(ranking[self.k :])
        return [ranking[self.k - 1]]


def parse_order(order_name: str) -> tuple[str, int]:
    """``random2`` -> ``("random", 2)``; ``screen`` -> ``("screen", 0)``."""
    named = "|".join(["screen", "exact", "random", *ANATOMY_ORDERS])
    match = re.fullmatch(f"({named})(\\d*)", order_name)
    if not match or (match.group(1) == "random") != bool(match.group(2)):
        allowed = ", ".join(["screen", "exact", "random<seed>", *ANATOMY_ORDERS])
        raise SpecError(f"order {order_name!r} is not allowed; allowed: {allowed}")
    return match.group(1), int(match.group(2) or 0)


def set_path(results: str, site, position, kind, order_name, mode, k) -> str:
    return f"{results}/sets/{site}/{position}/{kind}/{order_name}/{mode}/k{k}.parquet"


def doubling(n: int) -> list[int]:
    """1, 2, 4, ... below ``n``, and ``n``."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return [*out, n]


MIB_PERCENTAGES = ("0.1", "0.2", "0.5", "1", "2", "5", "10", "20", "50", "100")
"""The circuit sizes of MIB's circuit-localization track (Mueller et al. 2025), in percent of the
scored components, as exact decimals."""


def mib_grid(n: int) -> list[tuple[float, int]]:
    """(percentage, k) of each of MIB's ten sizes for ``n`` heads: ``k = floor(percentage / 100 *
    n)``, MIB's own ``int(pct * n_scored_items)`` (``MIB_circuit_track/evaluation.py``), computed
    on exact decimals (it agrees with MIB's float product for every n up to 200,000). Sizes below
    one head are k = 0, the empty circuit, as in MIB; 100 % is every head."""
    return [(float(p), int(Fraction(p) * n // 100)) for p in MIB_PERCENTAGES]


def mib_ks(n: int) -> list[int]:
    """MIB's sizes as whole heads, distinct, sorted, from 1 (k = 0 is every head ablated, which
    every ``keep`` curve measures): for 270 heads 1, 2, 5, 13, 27, 54, 135, 270 (0.1 % and 0.2 %
    are 0 heads)."""
    return sorted({k for _, k in mib_grid(n) if k >= 1})


def grid(ks, n: int) -> list[int]:
    """A curve's k, sorted: ``ks`` as given, ``None`` for 1, 2, 4, ... and every head
    (:func:`doubling`), or ``"mib"`` for those and MIB's sizes (:func:`mib_ks`) together."""
    if not ks:  # null (or an empty list, as before)
        return doubling(n)
    if isinstance(ks, str):
        if ks != "mib":
            raise SpecError(f"curves: ks {ks!r} is not allowed; allowed: a list of k, null, mib")
        return sorted({*doubling(n), *mib_ks(n)})
    return sorted({int(k) for k in ks})


CURVE_DEFAULTS = {
    "positions": ["last"],
    "sites": ["o_proj_input"],
    "orders": ["screen", "random"],
    "seeds": [1, 2, 3],
    "modes": ["remove", "keep"],
    "ks": None,
    "singles": 0,
}
"""What a curve of ``perturbation.curves`` leaves out (the config schema holds the same)."""

SET_KINDS = ("zero", "mean", "patch")
"""The kinds a set of heads can be perturbed with: the deterministic ones (noise and resample
draw values; restore runs the partner, whose own heads are not the set's)."""


def curves(perturbation: dict) -> list[dict]:
    """The config's curves with every key filled (:data:`CURVE_DEFAULTS`)."""
    return [{**CURVE_DEFAULTS, **curve} for curve in perturbation.get("curves") or []]


def set_jobs(curve_list: list[dict], n_heads_total: int, measured=frozenset()) -> list[SetJob]:
    """Every set job the curves ask for (:func:`curves`), for a model of ``n_heads_total`` heads:
    per order (and seed of the random order), kind, position and site, ``remove`` for each k of
    the grid (``ks``, default 1, 2, 4, ... and every head; ``mib`` adds MIB's sizes,
    :func:`grid`), ``keep`` for 0 (every head removed) and each k of the grid below every head,
    and ``single`` for the ``singles`` highest-ranked heads of the screen and exact orders,
    unless the run measures every head of that setting alone already (``measured``: (site,
    position, kind) triples). Removing none and keeping all is the unperturbed model."""
    jobs: set[SetJob] = set()
    for curve in curve_list:
        ks_of_curve = grid(curve["ks"], n_heads_total)
        if any(not 1 <= k <= n_heads_total for k in ks_of_curve):
            raise SpecError(
                f"curves: ks {ks_of_curve} must lie in 1..{n_heads_total} (the model's heads)"
            )
        for kind in curve["kinds"]:
            if kind not in SET_KINDS:
                raise SpecError(
                    f"curves: kind {kind!r} is not allowed; allowed: {', '.join(SET_KINDS)}"
                )
            for position, site, order in product(
                curve["positions"], curve["sites"], curve["orders"]
            ):
                if position not in ("all", "last") or site not in SITES or order not in ORDERS:
                    raise SpecError(
                        f"curves: {position}/{site}/{order}: allowed positions all, last; "
                        f"sites {', '.join(SITES)}; orders {', '.join(ORDERS)}"
                    )
                for seed in curve["seeds"] if order == "random" else [0]:
                    base = (site, position, kind, order, int(seed))
                    for mode in curve["modes"]:
                        ks = (
                            ks_of_curve
                            if mode == "remove"
                            else [0, *[k for k in ks_of_curve if k < n_heads_total]]
                        )
                        jobs.update(SetJob(*base, mode, int(k)) for k in ks)
                    if order != "random" and (site, position, kind) not in measured:
                        singles = min(int(curve["singles"]), n_heads_total)
                        jobs.update(SetJob(*base, "single", r) for r in range(1, singles + 1))
    return sorted(jobs)


def ranking_path(results: str, site, position, kind, order_name) -> str:
    return f"{results}/sets/{site}/{position}/{kind}/{order_name}/ranking.parquet"


def mib_path(results: str, site, position, kind, order_name) -> str:
    return f"{results}/curves/mib/{site}/{position}/{kind}/{order_name}.json"

"""Claims that are checked: every number and label the README and docs/results.md state about a
run, tied to the file, row and column it comes from (``docs/claims.yaml``), and checked against
a results folder.

A claim names its ``key`` (what the sentence says), the ``file`` under the results folder (a CSV,
Parquet or JSON file), and either a ``field`` of a JSON file or the ``rows`` of a table (column
values every row must have; a list means any of them) and its ``column``; ``reduce`` (``max``,
``min``, ``count``) when the statement is about many rows (``at_least``: only the rows whose
column reaches it, to count them); and the ``value`` as written: a
number, compared at the precision it is written with (``0.852`` holds for 0.8516; quote it,
``"0.750"``, to keep a last zero; ``scale: 100`` for a percentage written as ``41``), or a text
compared as is (a label such as ``bias``).

``python -m headperturb.analysis.claims docs/claims.yaml results/smollm2-imdb`` prints each claim
that differs and exits 1 if any does. With ``--structure``, for a run of another config (CI's
run of the test config), it checks only that every file the run holds has the fields, columns and
row keys the claims name (:func:`unresolved`).
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

REDUCTIONS = ("max", "min", "count")


@dataclass(frozen=True)
class Finding:
    """One claim checked: its key, the value as written, the value the run holds, and whether
    they agree."""

    key: str
    written: object
    found: object
    holds: bool

    def line(self) -> str:
        mark = "ok" if self.holds else "DIFFERS"
        return f"{mark:8} {self.key}: written {self.written!r}, the run holds {self.found!r}"


def _table(path: Path):
    import pandas as pd

    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def _selected(frame, rows: dict):
    keep = frame.index == frame.index
    for column, wanted in rows.items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        keep &= frame[column].isin(allowed)
    return frame[keep]


def found_value(claim: dict, results: Path, read=_table):
    """The value the run holds for ``claim`` (``read``: how a table is read)."""
    path = results / claim["file"]
    if path.suffix == ".json":
        value = json.loads(path.read_text())
        for part in str(claim["field"]).split("."):
            value = value[part]
        return value
    frame = _selected(read(path), claim.get("rows", {}))
    if "at_least" in claim:  # the rows whose column reaches a value (to count them)
        frame = frame[frame[claim["column"]] >= float(claim["at_least"])]
    reduce = claim.get("reduce")
    if reduce == "count":
        return len(frame)
    if reduce not in (None, *REDUCTIONS):
        raise ValueError(f"{claim['key']}: reduce {reduce!r}; allowed: {', '.join(REDUCTIONS)}")
    values = frame[claim["column"]]
    if reduce is None:
        if len(values) != 1:
            raise ValueError(f"{claim['key']}: {len(values)} rows match {claim.get('rows')}")
        value = values.iloc[0]
    else:
        value = values.max() if reduce == "max" else values.min()
    return value.item() if hasattr(value, "item") else value


def agrees(written, found, scale: float = 1.0) -> bool:
    """Whether ``found`` is ``written`` at the precision it is written with (``written`` a number:
    within half a unit of its last digit, after multiplying ``found`` by ``scale``; else equal as
    text)."""
    number = _number(written)
    if number is None or isinstance(found, str) or found is None:
        return str(written) == str(found)
    half = Decimal(1).scaleb(number.as_tuple().exponent) / 2
    value = Decimal(str(float(found))) * Decimal(str(scale))
    return abs(value - number) <= half


def _number(written) -> Decimal | None:
    """``written`` as the number it states, with its precision (a quoted ``"0.750"`` keeps its
    last zero, which YAML's float would drop); None for a label."""
    if isinstance(written, bool):
        return None
    try:
        return Decimal(str(written))
    except ArithmeticError:
        return None


def check(claims: list[dict], results: Path) -> list[Finding]:
    """Every claim checked against the results folder ``results`` (each table read once)."""
    out, read = [], functools.cache(_table)
    for claim in claims:
        try:
            found = found_value(claim, results, read)
        except (KeyError, FileNotFoundError, ValueError) as exc:
            found = f"unreadable: {exc}"
        holds = agrees(claim["value"], found, float(claim.get("scale", 1.0)))
        out.append(Finding(claim["key"], claim["value"], found, holds))
    return out


def unresolved(claims: list[dict], results: Path) -> tuple[list[str], int]:
    """For a run of another config (the tests' run of ``config/test.yaml``): the claims whose
    file this run holds but whose JSON field, or table column or row key, it lacks (a renamed
    column or field would make the check of the default run fail), as ``key: what is missing``;
    and how many claims had their file here to be resolved. Values are not compared."""
    problems, resolved, read = [], 0, functools.cache(_table)
    for claim in claims:
        path = results / claim["file"]
        if not path.is_file():
            continue
        resolved += 1
        if path.suffix == ".json":
            value = json.loads(path.read_text())
            for part in str(claim["field"]).split("."):
                if not isinstance(value, dict) or part not in value:
                    problems.append(f"{claim['key']}: {claim['file']} has no field {part!r}")
                    break
                value = value[part]
            continue
        columns = set(read(path).columns)
        named = [*claim.get("rows", {}), *([claim["column"]] if "column" in claim else [])]
        missing = [c for c in named if c not in columns]
        if missing:
            problems.append(f"{claim['key']}: {claim['file']} has no column {', '.join(missing)}")
        if claim.get("reduce") not in (None, *REDUCTIONS):
            problems.append(f"{claim['key']}: reduce {claim['reduce']!r}")
    return problems, resolved


def main(argv: list[str] | None = None) -> int:
    import yaml

    args = sys.argv[1:] if argv is None else argv
    structure = "--structure" in args
    args = [a for a in args if a != "--structure"]
    if len(args) != 2:
        print("usage: python -m headperturb.analysis.claims [--structure] CLAIMS.yaml RESULTS")
        return 2
    claims = yaml.safe_load(Path(args[0]).read_text())["claims"]
    if structure:  # a run of another config: every file, field and column the claims name
        problems, resolved = unresolved(claims, Path(args[1]))
        for problem in problems:
            print(f"MISSING  {problem}")
        print(
            f"{resolved - len(problems)} of {resolved} claims with their file in {args[1]} resolve"
        )
        return 1 if problems or not resolved else 0
    findings = check(claims, Path(args[1]))
    for finding in findings:
        print(finding.line())
    wrong = [f for f in findings if not f.holds]
    print(f"{len(findings) - len(wrong)} of {len(findings)} claims hold in {args[1]}")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())

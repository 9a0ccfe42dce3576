"""The commands the product prints as remedies, as the user can paste them: Snakemake with the
user's own ``--snakefile``, ``--directory``, ``--configfile``, ``--config`` and ``--profile``
arguments, so that a hint given in a run of ``config/test.yaml`` does not run the default config.

The Snakemake process remembers its arguments in an environment variable
(:func:`remember`, from ``workflow/rules/common.smk``), which the steps that are processes of
their own inherit; :func:`command` builds a hint from it. Standard library only.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence

ENV = "HEADPERTURB_COMMAND"
"""The environment variable that holds the run's own arguments, quoted for a shell."""

BASE = "snakemake --cores all"

# the options a pasted command needs to run the same workflow with the same config; each maps
# to whether it takes several values (Snakemake's nargs="+" / "*")
KEPT = {
    "-s": False,
    "--snakefile": False,
    "-d": False,
    "--directory": False,
    "--configfile": True,
    "--configfiles": True,
    "-C": True,
    "--config": True,
    "--profile": False,
    "--workflow-profile": False,
}


def options(argv: Sequence[str], names: dict[str, bool]) -> list[tuple[str, list[str], bool]]:
    """The options of a command line ``argv`` (without the program) named in ``names`` (each
    mapped to whether it takes several values), in their order: ``(name, values, joined)``,
    ``joined`` for ``--name=value``, else ``--name value ...``."""
    found = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        i += 1
        if name not in names:
            continue
        if eq:
            found.append((name, [value], True))
            continue
        values = []
        while i < len(argv) and not argv[i].startswith("-") and (names[name] or not values):
            values.append(argv[i])
            i += 1
        found.append((name, values, False))
    return found


def kept_arguments(argv: Sequence[str]) -> list[str]:
    """The arguments of a Snakemake command line (without the program) that choose the
    workflow, its folder and its config, in their order; the rest (targets, ``--forcerun``,
    ``--cores``, ``-n``) is dropped."""
    kept: list[str] = []
    for name, values, joined in options(argv, KEPT):
        if values:
            kept += [f"{name}={values[0]}"] if joined else [name, *values]
    return kept


def forced(argv: Sequence[str], *targets: str) -> bool:
    """Whether the Snakemake command line ``argv`` (``sys.argv``) forces every job
    (``--forceall``) or one of ``targets`` (a rule or a file in ``--forcerun``)."""
    found = options(argv[1:], {"-F": False, "--forceall": False, "-R": True, "--forcerun": True})
    ran = {v for name, values, _ in found if name in ("-R", "--forcerun") for v in values}
    return any(name in ("-F", "--forceall") for name, _, _ in found) or bool(ran & set(targets))


def remember(argv: Sequence[str], environ=None) -> str:
    """Keep the arguments of the Snakemake command ``argv`` (``sys.argv``) that a pasted hint
    needs, for this process and the ones it starts; returns them quoted. A command line that is
    not Snakemake's (the API, a test) keeps nothing."""
    environ = os.environ if environ is None else environ
    program = os.path.basename(argv[0]) if argv else ""
    is_snakemake = "snakemake" in program or (argv and "snakemake" in os.path.dirname(argv[0]))
    quoted = shlex.join(kept_arguments(argv[1:])) if is_snakemake else ""
    environ[ENV] = quoted
    return quoted


def command(*args: str, environ=None) -> str:
    """``snakemake --cores all`` with the run's own arguments (:func:`remember`) and ``args``
    (``"--forcerun", path``), as one line to paste. ``args`` are quoted unless they hold a
    ``$(...)`` the shell is to expand."""
    environ = os.environ if environ is None else environ
    own = environ.get(ENV, "")
    extra = [a if "$(" in a else shlex.quote(a) for a in args]
    return " ".join(part for part in (BASE, own, *extra) if part)

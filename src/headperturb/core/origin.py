"""Where a prepared model came from, and whether the configured source is still that one.

``prepare_model`` records its source in the prepared folder's ``headperturb_model.json``: the
path (``source``), for a wheel the requirement and member (``pypi_wheel``), and the source's
files with their sizes, modification times and sha256 (``source_files``, :func:`source_files`).
While the DAG is built, :func:`check_prepared` compares that record with the configured source
(names, sizes and modification times: no hashing) and stops the run with one line saying what
changed and the command that prepares the model again. Standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path

from headperturb.core import files, hints
from headperturb.core.spec import SpecError

INFO_FILE = "headperturb_model.json"
"""The prepared folder's summary (:data:`headperturb.model.loading.INFO_FILE`)."""


def source_files(path: str | os.PathLike, *, hashes: bool = False) -> dict[str, dict] | None:
    """A local source's files as they are now: the file itself, or every file at the top of a
    folder (not hidden), each name mapped to ``{"size", "mtime_ns"}`` (and ``"sha256"`` with
    ``hashes``). None when ``path`` is no local file or folder (a hub id)."""
    p = Path(path)
    if p.is_file():
        found = [p]
    elif p.is_dir():
        found = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    else:
        return None
    out = {}
    for f in found:
        stat = f.stat()
        out[f.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if hashes:
            out[f.name]["sha256"] = files.sha256_file(f)
    return out


def _same_path(a: str, b: str) -> bool:
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def changes(recorded: dict[str, dict], now: dict[str, dict]) -> list[str]:
    """What differs between a source's recorded files and its files now, one phrase each."""
    out = [f"{name} is new" for name in sorted(set(now) - set(recorded))]
    out += [f"{name} is gone" for name in sorted(set(recorded) - set(now))]
    for name in sorted(set(now) & set(recorded)):
        was, is_ = recorded[name], now[name]
        if was.get("size") != is_["size"]:
            out.append(f"{name} changed size ({was.get('size')} -> {is_['size']} bytes)")
        elif was.get("mtime_ns") != is_["mtime_ns"]:
            out.append(f"{name} was modified")
    return out


def prepared_from(info: dict, path: str) -> str | None:
    """Why the model prepared with ``info`` (its ``headperturb_model.json``) is not one prepared
    from the local source ``path`` as it is now; None when it is. A folder prepared by an older
    release, which recorded no files, is compared by its path alone."""
    recorded = info.get("source")
    if recorded is None:
        return None
    if not _same_path(str(recorded), str(path)):
        return f"it was prepared from {recorded}, and model.path is now {path}"
    if info.get("source_files") is None:
        return None
    found = changes(info["source_files"], source_files(path) or {})
    if found:
        shown = "; ".join(found[:3]) + (f"; {len(found) - 3} more" if len(found) > 3 else "")
        return f"the files of model.path {path} changed since it was prepared ({shown})"
    return None


def check_prepared(model: dict, model_dir: str, forced: bool = False) -> None:
    """Stop the run, before any job, when the model prepared in ``model_dir`` did not come from
    the configured local source (another ``model.path`` under the same ``model.name``, or its
    files replaced since). A source Snakemake tracks itself (a wheel's or the hub's file, a local
    ``.gguf``: the rule's input) and a run that prepares the model again anyway (``forced``) are
    not checked."""
    path = model.get("path")
    info_file = Path(model_dir) / INFO_FILE
    if forced or not path or not Path(path).is_dir() or not info_file.is_file():
        return
    try:
        info = files.read_json(info_file)
    except OSError:
        return  # an unreadable summary: the jobs that read it say so
    why = prepared_from(info, path)
    if why:
        raise SpecError(
            f"model.name {model['name']!r}: {model_dir} does not hold this model.path's model: "
            f"{why}. Prepare it again (what used it reruns) with "
            f"`{hints.command('--forcerun', 'prepare_model')}`, or give another model its own "
            "model.name"
        )

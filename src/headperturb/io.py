"""Atomic file writes and provenance metadata.

Every file the pipeline produces is written under a temporary name in the same folder and renamed
into place only once complete, so a killed job never leaves a file that Snakemake would take as done.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

METADATA_KEY = b"headperturb"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
"""Read once, at import: reading it means setting it, which threads writing at once would race
on (one of them could leave it 0 for the rest of the process)."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; put it in place of ``path`` if the block succeeds.

    On an exception the temporary folder is removed and ``path`` is left untouched.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes 0700; give the usual permissions
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_csv(path: str | os.PathLike, rows) -> None:
    """A pandas DataFrame, or rows of equal keys, as a CSV file (written atomically; numbers to
    six significant digits)."""
    import pandas as pd

    with atomic_path(path, suffix=".csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6g")


def read_csv(path: str | os.PathLike):
    """A CSV file as a pandas DataFrame (an empty file: no rows)."""
    import pandas as pd

    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise unreadable(path, exc) from None


class UnreadableError(OSError):
    """An input file that exists but cannot be read: corrupt, truncated or not what it should be."""


def unreadable(path: str | os.PathLike, exc: BaseException) -> UnreadableError:
    """The error for an input that cannot be read: its path, the cause, and the fix."""
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UnreadableError(
        f"{path} cannot be read ({cause}): it is corrupt or incomplete. Delete it, or run "
        f"`snakemake --cores all --forcerun {path}`, and the step that writes it runs again"
    )


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_parquet(path: str | os.PathLike, frame, metadata: dict | None = None) -> None:
    """Write ``frame`` (a pandas DataFrame, a dict of equal-length columns or a list of rows) to Parquet
    atomically, with ``metadata`` as JSON.

    The metadata is stored in the file's schema under the key ``headperturb`` and must not hold
    timestamps or host names, so that reruns give byte-identical files.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(frame, dict):
        table = pa.table(frame)
    elif isinstance(frame, list):
        table = pa.Table.from_pylist(frame)
    else:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged[METADATA_KEY] = json.dumps(metadata, sort_keys=True, default=_json_default).encode()
        table = table.replace_schema_metadata(merged)
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)


def read_parquet_metadata(path: str | os.PathLike) -> dict:
    """The ``headperturb`` metadata of a Parquet file written by :func:`write_parquet`."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise unreadable(path, exc) from None
    raw = meta.get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None):
    """A Parquet file as a pandas DataFrame, or :class:`UnreadableError` naming the file."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns).to_pandas()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise unreadable(path, exc) from None


def looks_like_parquet(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts and ends with the Parquet magic bytes (a cheap check that a file
    is not truncated or foreign, without reading it)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
            handle.seek(-4, os.SEEK_END)
            return head == b"PAR1" and handle.read(4) == b"PAR1"
    except OSError:
        return False

"""Atomic file writes and provenance metadata.

Every file the pipeline produces is written under a temporary name in the same folder and renamed
into place only once complete, so a killed job never leaves a file that Snakemake would take as
done.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from headperturb.core import hints

METADATA_KEY = b"headperturb"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
"""Read once, at import: reading it means setting it, which threads writing at once would race
on (one of them could leave it 0 for the rest of the process)."""


PENDING: set[Path] = set()
"""The temporary files and folders being written now (removed by :func:`abandon`)."""

_still_wanted = None
"""A check called before a finished file is put in place (:func:`only_while`)."""


class Abandoned(RuntimeError):
    """The run that asked for a file ended before the file was finished."""


def only_while(check) -> None:
    """Put finished files in place only while ``check()`` is true (a process step: while the
    Snakemake process that started it lives,
    :func:`headperturb.workflow.lifecycle.follow_owner`)."""
    global _still_wanted
    _still_wanted = check


def abandon() -> None:
    """Remove every temporary file and folder being written (before the process exits at once)."""
    import shutil

    for tmp in list(PENDING):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def _still(path: Path) -> None:
    if _still_wanted is not None and not _still_wanted():
        raise Abandoned(f"the run that asked for {path} has ended; it is not written")


def _commit(tmp: Path, path: Path) -> None:
    _still(path)
    os.replace(tmp, path)


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
    PENDING.add(tmp_path)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        _commit(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    finally:
        PENDING.discard(tmp_path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; put it in place of ``path`` if the block succeeds.

    On an exception the temporary folder is removed and ``path`` is left untouched.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    PENDING.add(tmp)
    try:
        yield tmp
        tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes 0700; give the usual permissions
        _still(path)  # before the old folder is removed
        if path.exists():
            shutil.rmtree(path)
        _commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        PENDING.discard(tmp)


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
        f"`{hints.command('--forcerun', str(path))}`, and the step that writes it runs again"
    )


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


CHECKSUMS = "_checksums"
"""In a Parquet file's ``headperturb`` metadata: the sha256 of every column's values and of the
schema (:func:`column_digest`), and of the rest of that metadata (``metadata``). Parquet checks
its pages (:func:`write_parquet` writes their CRCs) but not its footer, where the column names,
the types and this metadata live; these digests cover what the pages' CRCs do not."""


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _canonical(array) -> bytes:
    """A column's values as bytes that are the same however pyarrow lays them out (chunks,
    dictionaries, 32- or 64-bit offsets)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks else pa.array([], array.type)
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    kind = array.type
    nulls = np.asarray(array.is_null(), dtype=bool).tobytes()
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = np.asarray(pc.list_value_length(array).fill_null(0), dtype=np.int64)
        return b"L" + nulls + lengths.tobytes() + _canonical(pc.list_flatten(array))
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        texts = [(x or "").encode() for x in array.to_pylist()]
        return b"S" + nulls + b"".join(len(t).to_bytes(8, "little") + t for t in texts)
    if pa.types.is_boolean(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind):
        values = np.asarray(array.fill_null(False if pa.types.is_boolean(kind) else 0))
        return b"N" + str(values.dtype).encode() + nulls + values.tobytes()
    return b"P" + repr(array.to_pylist()).encode()


def column_digest(name: str, array) -> str:
    return _digest(name.encode() + b"\0" + _canonical(array))


def _kind(kind) -> str:
    """A type's name as it survives a round trip through Parquet (lists' item names and 64-bit
    offsets do not)."""
    import pyarrow as pa

    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return f"list<{_kind(kind.value_type)}>"
    return str(kind).replace("large_", "")


def _schema_digest(table) -> str:
    kinds = [_kind(t) for t in table.schema.types]
    return _digest(json.dumps([table.column_names, kinds]).encode())


def _meta_digest(meta: dict) -> str:
    return _digest(json.dumps(meta, sort_keys=True, default=_json_default).encode())


def write_parquet(path: str | os.PathLike, frame, metadata: dict | None = None) -> None:
    """Write ``frame`` (a pandas DataFrame, a dict of equal-length columns or a list of rows) to
    Parquet atomically, with ``metadata`` as JSON, page checksums and :data:`CHECKSUMS`.

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
    meta = dict(metadata or {})
    columns = {name: column_digest(name, table[name]) for name in table.column_names}
    meta[CHECKSUMS] = {
        "schema": _schema_digest(table),
        "metadata": _meta_digest(metadata or {}),
        **columns,
    }
    # no pandas metadata: a byte changed there would change the frames' dtypes unchecked
    encoded = json.dumps(meta, sort_keys=True, default=_json_default).encode()
    table = table.replace_schema_metadata({METADATA_KEY: encoded})
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)  # read_parquet verifies them


def _checked_metadata(raw: bytes | None) -> tuple[dict, dict]:
    """(metadata, checksums) of a file :func:`write_parquet` wrote, the metadata checked against
    its digest."""
    meta = json.loads(raw) if raw else {}
    sums = meta.pop(CHECKSUMS, None)
    if sums is None:
        raise ValueError(
            "it carries no checksums: not written by headperturb, or its metadata is damaged"
        )
    if sums.get("metadata") != _meta_digest(meta):
        raise ValueError("its metadata does not match its checksum")
    return meta, sums


def _verified(table, raw: bytes | None, every_column: bool) -> dict:
    """The ``headperturb`` metadata of a table read from a file, after checking it and the
    columns read against :data:`CHECKSUMS` (``every_column``: all were asked for, so the schema
    must be the one written too)."""
    meta, sums = _checked_metadata(raw)
    for name in table.column_names:
        if sums.get(name) != column_digest(name, table[name]):
            raise ValueError(f"column {name!r} does not match its checksum")
    if every_column and sums.get("schema") != _schema_digest(table):
        raise ValueError("its schema does not match its checksum")
    return meta


def _read_table(path, columns=None):
    """(table, metadata) of a Parquet file with every check: the pages' CRCs and the digests."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=columns, page_checksum_verification=True)
        raw = (table.schema.metadata or {}).get(METADATA_KEY)
        if raw is None and columns is not None:  # a column subset keeps the file's metadata too
            raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
        return table, _verified(table, raw, every_column=columns is None)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise unreadable(path, exc) from None


def read_parquet_metadata(path: str | os.PathLike) -> dict:
    """The ``headperturb`` metadata of a Parquet file written by :func:`write_parquet`, checked
    against its digest."""
    import pyarrow.parquet as pq

    try:
        raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
        return _checked_metadata(raw)[0]
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise unreadable(path, exc) from None


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None):
    """A Parquet file as a pandas DataFrame, or :class:`UnreadableError` naming the file. Every
    page's CRC and every column's digest is verified (:func:`write_parquet` writes them), so a
    byte changed inside a result stops the reader instead of changing a number."""
    return _read_table(path, columns)[0].to_pandas()


def read_columns(path: str | os.PathLike, columns: list[str] | None = None) -> dict[str, list]:
    """A Parquet file's columns as lists, checked as :func:`read_parquet` checks them, without
    pandas (for the jobs that import as little as they can)."""
    return _read_table(path, columns)[0].to_pydict()


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

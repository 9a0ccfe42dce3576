"""What a long-lived process keeps between head jobs: the prepared model, the exported last layer
and recorded tensors, each loaded once.

On a workstation the head jobs run in threads of the Snakemake process (``profiles/default``:
``force-use-threads``), so a job pays for its computation, not for importing torch and loading the
model again. Entries are keyed by the file's path, modification time and size: a file rewritten by
a later step is loaded anew. Each thread gets its own copy of the model's module tree (sharing
every weight, :func:`headperturb.surgery.thread_copy`), since a pass changes that tree while it
runs. A job that is its own process (a cluster job) loads everything once, as before.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

_lock = threading.Lock()
_loading = threading.RLock()  # one load at a time: torch.export.load is not thread-safe
_store: dict[tuple, object] = {}


def _stamp(path: str | os.PathLike) -> tuple:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


def cached(kind: str, stamp_file: str | os.PathLike, load: Callable[[], object], *extra) -> object:
    """``load()`` once per (kind, file stamp, extra); a changed file replaces its old entry."""
    key = (kind, _stamp(stamp_file), *extra)
    with _loading:
        with _lock:
            if key in _store:
                return _store[key]
        value = load()
    with _lock:
        for old in [k for k in _store if k[0] == kind and k[1][0] == key[1][0] and k[1] != key[1]]:
            del _store[old]  # the same file, older contents
        return _store.setdefault(key, value)


def model(model_dir, device: str, dtype: str):
    """(model, info) for this thread: the prepared model loaded once per process, and a copy of
    its module tree per thread."""
    from . import models
    from .surgery import thread_copy

    stamp = Path(model_dir) / models.INFO_FILE
    shared = cached("model", stamp, lambda: models.load_prepared(
        model_dir, device=device, dtype=dtype, tokenizer=False), device, dtype)  # fmt: skip
    base, _, info = shared
    mine = cached("model-thread", stamp, lambda: thread_copy(base), device, dtype,
                  threading.get_ident())  # fmt: skip
    return mine, info


def tensors(path, keys: tuple[str, ...] | None = None, expect: dict | None = None) -> dict:
    """The tensors of a recording (only ``keys`` when given), loaded once per process and checked
    against the provenance ``expect`` (:func:`headperturb.tensors.load`)."""
    from . import tensors as files

    frozen = tuple(sorted((expect or {}).items()))
    load = lambda: files.load(path, list(keys) if keys else None, expect=expect)  # noqa: E731
    return cached("tensors", path, load, keys, frozen)


def program(folder, device: str, weights_sha256: str | None = None):
    """(program, meta) of an exported last layer (:func:`headperturb.tail.load`), loaded once."""
    from . import tail

    load = lambda: tail.load(folder, device, weights_sha256)  # noqa: E731
    return cached("program", Path(folder) / tail.META, load, device, weights_sha256)


def clear() -> None:
    with _lock:
        _store.clear()

"""What a process loads once and shares between the jobs that run in its threads, and the torch
settings that are per process: torch's threads (:func:`set_threads`, from a rule's ``threads``),
the prepared model (a copy of its module tree per thread, the weights shared), recordings and
the exported last layer (:func:`cached_model`, :func:`cached_tensors`, :func:`cached_program`,
keyed by file path, time and size), and parameters that keep no gradient
(:func:`frozen_parameters`, for the screen's backward pass). torch is imported where it is used,
so importing this module is cheap."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path


def set_threads(threads: int) -> None:
    """Set torch's intra-op threads from a rule's ``threads`` (torch's setting is per process)."""
    import torch

    torch.set_num_threads(max(1, int(threads)))


@contextlib.contextmanager
def frozen_parameters(model) -> Iterator[None]:
    """While active, no parameter of ``model`` asks for a gradient (a backward pass then reaches
    the activations only); restored afterwards, also on an exception. The parameters are shared by
    every thread's copy of the model, so only a step that is a process of its own (the screen)
    uses this."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


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


def cached_model(model_dir, device: str, dtype: str):
    """(model, info) for this thread: the prepared model loaded once per process, and a copy of
    its module tree per thread."""
    from headperturb.model import loading
    from headperturb.model.surgery import thread_copy

    stamp = Path(model_dir) / loading.INFO_FILE
    shared = cached(
        "model",
        stamp,
        lambda: loading.load_prepared(model_dir, device=device, dtype=dtype, tokenizer=False),
        device,
        dtype,
    )
    base, _, info = shared
    mine = cached(
        "model-thread", stamp, lambda: thread_copy(base), device, dtype, threading.get_ident()
    )
    return mine, info


def cached_tensors(path, keys: tuple[str, ...] | None = None, expect: dict | None = None) -> dict:
    """The tensors of a recording (only ``keys`` when given), loaded once per process and checked
    against the provenance ``expect`` (:func:`headperturb.model.recordings.load`)."""
    from headperturb.model import recordings

    frozen = tuple(sorted((expect or {}).items()))
    load = lambda: recordings.load(path, list(keys) if keys else None, expect=expect)  # noqa: E731
    return cached("tensors", path, load, keys, frozen)


def cached_program(folder, device: str, weights_sha256: str | None = None):
    """(program, meta) of an exported last layer (:func:`headperturb.model.tail.load`), loaded
    once."""
    from headperturb.model import tail

    load = lambda: tail.load(folder, device, weights_sha256)  # noqa: E731
    return cached("program", Path(folder) / tail.META, load, device, weights_sha256)


def clear_cache() -> None:
    with _lock:
        _store.clear()

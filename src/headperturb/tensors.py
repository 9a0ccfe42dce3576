"""Recorded tensors on disk, and the provenance every result file carries.

Tensors are safetensors files written atomically (:func:`save`); :func:`load` reads all of them or
only the keys asked for. :func:`provenance` is the metadata of a result: the step's settings and
their sha256, versions, model source and weights hash, device; no timestamps or host names, so
reruns stay byte-identical (those belong in the logs).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import __version__, io


def save(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``tensors`` (name -> tensor) to ``path`` atomically, with string ``metadata``."""
    from safetensors.torch import save_file

    meta = {k: str(v) for k, v in (metadata or {}).items()}
    with io.atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def load(path, keys=None, device: str = "cpu") -> dict:
    """The tensors of ``path`` (only ``keys`` when given: the others are never read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=device) as handle:
            names = handle.keys() if keys is None else keys
            return {k: handle.get_tensor(k) for k in names}
    except Exception as exc:  # a truncated or foreign file: say which, and how to redo it
        raise io.unreadable(path, exc) from None


def file_digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def provenance(model_info: dict, device: str, settings: dict | None = None) -> dict:
    """What produced a result file (see the module docstring)."""
    from importlib.metadata import version

    import torch

    settings = dict(settings or {})
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "settings": settings,
        "config_sha256": digest,
        "headperturb_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": version("transformers"),
        "model_source": model_info.get("source"),
        "model_weights_sha256": model_info.get("weights_sha256"),
        "model_architecture": model_info.get("architecture"),
        "device": device,
    }

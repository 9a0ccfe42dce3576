"""Recorded tensors on disk, and the provenance every result file carries.

Tensors are safetensors files written atomically (:func:`save`); :func:`load` reads all of them or
only the keys asked for. :func:`provenance` is the metadata of a result: the step's settings and
their sha256, versions, model source and weights hash, device; no timestamps or host names, so
reruns stay byte-identical (those belong in the logs).
"""

from __future__ import annotations

import hashlib
import json

from headperturb import __version__
from headperturb.core import files, hints

KEY = "headperturb"
"""The one metadata key of a recording: its provenance and checksums, as JSON."""


class RecordingError(ValueError):
    """A recording made for other prompts, another model or another layer than the job's."""


def digest(tensor) -> str:
    """The sha256 of a tensor's dtype, shape and bytes (any dtype, any device): the file's header,
    which holds the dtype and shape, is covered too."""
    import torch

    flat = tensor.detach().contiguous().cpu().reshape(-1)
    found = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    found.update(flat.view(torch.uint8).numpy().data)
    return found.hexdigest()


def save(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``tensors`` (name -> tensor) to ``path`` atomically, with ``metadata`` (JSON) and the
    sha256 of every tensor (``checksums``, which :func:`load` verifies: safetensors has none)."""
    from safetensors.torch import save_file

    data = {k: v.contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), "checksums": {k: digest(v) for k, v in data.items()}}
    # one key: safetensors writes several in an order that changes from process to process
    header = {KEY: json.dumps(meta, sort_keys=True, default=str)}
    with files.atomic_path(path, suffix=".safetensors") as tmp:
        save_file(data, str(tmp), metadata=header)


def recording(step: str, prompt_info, model_info: dict, **extra) -> dict:
    """The provenance a recording carries (and a reader expects, :func:`load`): the step that made
    it, the sha256 of the prompts' ``prompt_info.json``, the model's weights sha256 and ``extra``
    (layers, the number of prompts)."""
    return {
        "step": step,
        "prompts_sha256": file_digest(prompt_info),
        "weights_sha256": model_info.get("weights_sha256"),
        **extra,
    }


def load(path, keys=None, device: str = "cpu", expect: dict | None = None) -> dict:
    """The tensors of ``path`` (only ``keys`` when given: the others are never read), each checked
    against the sha256 recorded with it; ``expect`` (:func:`recording`) must match the file's
    provenance, or :class:`RecordingError` names the file, what differs and how to remake it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=device) as handle:
            meta = _metadata(handle)
            if expect is not None:
                check_recording(path, meta, expect)
            names = handle.keys() if keys is None else keys
            out = {k: handle.get_tensor(k) for k in names}
    except RecordingError:
        raise
    except Exception as exc:  # a truncated or foreign file: say which, and how to redo it
        raise files.unreadable(path, exc) from None
    sums = meta.get("checksums", {})
    for name, tensor in out.items():
        if name not in sums:
            raise files.unreadable(path, ValueError(f"tensor {name!r} has no checksum"))
        if digest(tensor) != sums[name]:
            raise files.unreadable(path, ValueError(f"tensor {name!r} does not match its checksum"))
    return out


def load_metadata(path) -> dict:
    """The string metadata of a safetensors file (its provenance and checksums)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return _metadata(handle)
    except Exception as exc:
        raise files.unreadable(path, exc) from None


def _metadata(handle) -> dict:
    raw = (handle.metadata() or {}).get(KEY)
    return json.loads(raw) if raw else {}


def check_recording(path, meta: dict, expect: dict) -> None:
    """Raise :class:`RecordingError` unless the recording's metadata ``meta`` holds ``expect``."""
    what = {
        "step": "was made by another step",
        "prompts_sha256": "was recorded for other prompts",
        "weights_sha256": "was recorded with other model weights",
    }
    diffs = []
    for key, want in expect.items():
        found = meta.get(key)
        if found is None:
            diffs.append(f"holds no {key} (it was written by an older release or another tool)")
        elif str(found) != str(want):
            reason = what.get(key, "was recorded for another " + key)
            diffs.append(f"{reason} ({key} {str(found)[:16]}, this job's {str(want)[:16]})")
    if diffs:
        raise RecordingError(
            f"{path} {'; '.join(diffs[:3])}: it belongs to another run or is stale. Remake it "
            f"with `{hints.command('--forcerun', str(path))}`"
        )


def file_digest(path) -> str:
    return files.sha256_file(path)


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

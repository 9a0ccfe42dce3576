"""Where each attention head's output lives in a model.

A head's own output is its slice of the *input* of the attention output projection: the projection
input has shape (batch, seq, n_heads * head_dim) and head ``h`` owns columns
``h * head_dim : (h + 1) * head_dim`` (TransformerLens calls this activation ``hook_z``). The
projection then mixes the heads: ``out = sum_h W[:, slice_h] @ z_h + b``.

Heads are *query* heads: with grouped-query attention several query heads share one key/value
head, but each query head still writes its own slice of the projection input.
"""

from __future__ import annotations

from dataclasses import dataclass

# model_type -> (path of the layer list, path of the output projection inside one layer)
FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("model.layers", "self_attn.o_proj"),
    "mistral": ("model.layers", "self_attn.o_proj"),
    "mixtral": ("model.layers", "self_attn.o_proj"),
    "qwen2": ("model.layers", "self_attn.o_proj"),
    "qwen3": ("model.layers", "self_attn.o_proj"),
    "gemma": ("model.layers", "self_attn.o_proj"),
    "gemma2": ("model.layers", "self_attn.o_proj"),
    "gemma3_text": ("model.layers", "self_attn.o_proj"),
    "phi3": ("model.layers", "self_attn.o_proj"),
    "olmo": ("model.layers", "self_attn.o_proj"),
    "olmo2": ("model.layers", "self_attn.o_proj"),
    "granite": ("model.layers", "self_attn.o_proj"),
    "gpt2": ("transformer.h", "attn.c_proj"),
    "gpt_neox": ("gpt_neox.layers", "attention.dense"),
    "opt": ("model.decoder.layers", "self_attn.out_proj"),
}

FINAL_NORMS: dict[str, str] = {
    **{
        family: "model.norm" for family, (layers, _) in FAMILIES.items() if layers == "model.layers"
    },
    "gpt2": "transformer.ln_f",
    "gpt_neox": "gpt_neox.final_layer_norm",
    "opt": "model.decoder.final_layer_norm",
}
"""model_type -> the final norm, whose input is the residual stream the unembedding reads
(``hook_resid_final``). Other models: the first of these paths the model has."""

POST_ATTENTION_NORMS: dict[str, str] = {
    "gemma2": "post_attention_layernorm",
    "gemma3_text": "post_attention_layernorm",
    "olmo2": "post_attention_layernorm",
}
"""model_type -> the norm inside a layer that the attention output passes through before it is
added to the residual stream (these families normalise each sublayer's output)."""


class SiteError(ValueError):
    """The per-head site of a model cannot be located."""


@dataclass(frozen=True)
class HeadSite:
    """The output projection of one layer's attention, whose input holds the per-head outputs."""

    layer: int
    module_name: str  # e.g. "model.layers.3.self_attn.o_proj"
    n_heads: int  # query heads
    head_dim: int
    transposed: bool  # True for GPT-2's Conv1D, whose weight is stored (in, out)
    layers_path: str = "model.layers"  # the layer list this site's layer belongs to


def n_query_heads(config) -> int:
    for key in ("num_attention_heads", "n_head", "num_heads"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise SiteError(f"{type(config).__name__} names no number of attention heads")


def head_dim(config) -> int:
    value = getattr(config, "head_dim", None)
    if isinstance(value, int) and value > 0:
        return value
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return hidden // n_query_heads(config)


def locate_sites(model, override: dict | None = None) -> list[HeadSite]:
    """The per-head site of every layer of ``model``, from its config and module tree.

    ``override`` (the config's ``model.site``) points at the site of an architecture not in
    :data:`FAMILIES`: ``{"layers": "model.layers", "proj": "self_attn.o_proj",
    "n_heads": 8, "head_dim": 64}`` (``n_heads`` and ``head_dim`` are optional).
    """
    config = model.config
    override = dict(override or {})
    model_type = getattr(config, "model_type", None)
    if override.get("layers") and override.get("proj"):
        layers_path, proj_path = override["layers"], override["proj"]
    elif model_type in FAMILIES:
        layers_path, proj_path = FAMILIES[model_type]
    else:
        raise SiteError(
            f"cannot locate the per-head site of {type(model).__name__} (model_type "
            f"{model_type!r}); supported: {', '.join(sorted(FAMILIES))}. Point at it yourself "
            "with the config keys model.site.layers (path of the layer list, e.g. "
            "'model.layers'), model.site.proj (the attention output projection inside a layer, "
            "e.g. 'self_attn.o_proj'), and optionally model.site.n_heads and model.site.head_dim"
        )
    n_heads = int(override.get("n_heads") or n_query_heads(config))
    size = int(override.get("head_dim") or head_dim(config))
    try:
        layers = model.get_submodule(layers_path)
    except AttributeError:
        raise SiteError(f"{type(model).__name__} has no module {layers_path!r}") from None
    sites = []
    for index in range(len(layers)):
        name = f"{layers_path}.{index}.{proj_path}"
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise SiteError(f"{type(model).__name__} has no module {name!r}") from None
        transposed = type(module).__name__ == "Conv1D"
        in_features = module.weight.shape[0] if transposed else module.weight.shape[1]
        if in_features != n_heads * size:
            raise SiteError(
                f"{name} takes {in_features} inputs, not n_heads * head_dim = {n_heads} * {size}"
            )
        sites.append(HeadSite(index, name, n_heads, size, transposed, layers_path))
    return sites


def final_norm_name(model) -> str | None:
    """The path of ``model``'s final norm (:data:`FINAL_NORMS`), or None where it has none that
    headperturb knows."""
    model_type = getattr(model.config, "model_type", None)
    candidates = (
        [FINAL_NORMS[model_type]]
        if model_type in FINAL_NORMS
        else sorted(set(FINAL_NORMS.values()))
    )
    for name in candidates:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if module is not None:
            return name
    return None


def post_attention_norm(model, site: HeadSite):
    """The norm the attention output of ``site``'s layer passes through before the residual add,
    or None (:data:`POST_ATTENTION_NORMS`)."""
    name = POST_ATTENTION_NORMS.get(getattr(model.config, "model_type", None))
    if name is None:
        return None
    return model.get_submodule(f"{site.layers_path}.{site.layer}.{name}")

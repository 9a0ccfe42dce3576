"""Direct effects: what a head's output does to the margin through the residual stream alone,
with every later layer left out and every norm's scale frozen at its unperturbed value.

At each prompt's final position the margin (the logit of the positive verbalizer minus the
negative one, before any logit soft-capping) is a linear function of the residual stream ``x``
entering the final norm once the norm's scale ``s(x)`` is held at the value it had in the
unperturbed pass (Elhage et al. 2021; Rushing & Nanda 2024 call the rest self-repair)::

    margin = d . (w * P x / s + b) / logits_scaling       d = W_U[positive] - W_U[negative]

(``P`` subtracts the mean for LayerNorm and is the identity for RMSNorm; ``w`` is the norm's
weight, ``1 + weight`` for Gemma's). A head's output ``z_h`` reaches ``x`` through its slice of the
output projection (and, in Gemma 2/3 and OLMo 2, the norm that the attention output passes
before the residual add, its scale frozen too), so the margin's direct-path gradient with respect
to ``z_h`` is one vector per (prompt, layer): :func:`gradients`. A perturbation's direct effect is
then its first-order formula (:meth:`headperturb.core.kinds.Perturbation.first_order`) with that
gradient, which is exact for the direct path because the path is linear: zero ablation
``-z.g``, mean ablation ``(mean - z).g``, patching ``(z_partner - z).g``.

Everything is computed from the baseline's recordings (the final state:
:mod:`headperturb.model.engine`) and the model's weights: no forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from headperturb.core import hints
from headperturb.model.sites import HeadSite, final_norm_name, post_attention_norm


class DirectEffectError(ValueError):
    """A model or recording from which direct effects cannot be computed."""


@dataclass(frozen=True)
class FrozenNorm:
    """A norm with its scale held: ``y = w * P x / s + b``, linear in ``x`` for a fixed ``s``."""

    weight: torch.Tensor  # (d,) the effective weight (``1 + weight`` for Gemma's RMSNorm)
    bias: torch.Tensor | None
    centered: bool  # LayerNorm (subtract the mean) or RMSNorm
    eps: float

    @classmethod
    def of(cls, module) -> FrozenNorm:
        name = type(module).__name__
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            w = weight.detach().float()
            w = 1.0 + w if name.startswith("Gemma") else w
        else:
            width = getattr(module, "normalized_shape", None) or getattr(
                module, "hidden_size", None
            )
            if width is None:
                raise DirectEffectError(f"cannot read the width of the norm {name}")
            w = torch.ones(int(np.prod(width)))
        bias = getattr(module, "bias", None)
        bias = bias.detach().float() if isinstance(bias, torch.Tensor) else None
        centered = isinstance(module, torch.nn.LayerNorm) or "LayerNorm" in name
        eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None) or 1e-5
        return cls(w, bias, centered, float(eps))

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 1): the norm's scale at each row of ``x`` (n, d)."""
        x = x.double()
        if self.centered:
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def apply(self, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``w * P r / s(x)`` (n, d): the frozen norm's linear part applied to ``r``."""
        r = r.double()
        if self.centered:
            r = r - r.mean(-1, keepdim=True)
        return self.weight.double() * r / self.scale(x)

    def pullback(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``P (w * u) / s(x)`` (n, d): the direction ``v`` with ``v . r = u . apply(r, x)``."""
        v = self.weight.double() * u.double() / self.scale(x)
        return v - v.mean(-1, keepdim=True) if self.centered else v


def margin_direction(model, token_ids: list[int]) -> tuple[torch.Tensor, float]:
    """``(d, c)``: the margin is ``d . y + c`` for the final norm's output ``y`` (the unembedding
    rows' difference, through OPT's output projection where there is one, over Granite's
    ``logits_scaling``; ``c`` the unembedding biases' difference)."""
    head = model.get_output_embeddings()
    negative, positive = (int(t) for t in token_ids)
    w = head.weight.detach().double()
    d = w[positive] - w[negative]
    bias = getattr(head, "bias", None)
    c = float(bias[positive] - bias[negative]) if isinstance(bias, torch.Tensor) else 0.0
    project_out = getattr(
        getattr(getattr(model, "model", None), "decoder", None), "project_out", None
    )
    if project_out is not None:  # OPT: logits = W_U project_out(y)
        d = project_out.weight.detach().double().T @ d
    scaling = float(getattr(model.config, "logits_scaling", 1.0) or 1.0)
    return d / scaling, c / scaling


def final_norm(model) -> FrozenNorm:
    name = final_norm_name(model)
    if name is None:
        raise DirectEffectError(
            f"{type(model).__name__} has no final norm headperturb knows; direct effects need one "
            "(headperturb.model.sites.FINAL_NORMS)"
        )
    return FrozenNorm.of(model.get_submodule(name))


def readout(model, token_ids: list[int], resid_final: torch.Tensor) -> torch.Tensor:
    """(n, d_model): per prompt, the direction ``u`` with ``u . dx`` the margin's change for a
    change ``dx`` of the residual stream entering the final norm, its scale frozen."""
    d, _ = margin_direction(model, token_ids)
    return final_norm(model).pullback(d.expand(resid_final.shape[0], -1), resid_final)


def predicted_margin(model, token_ids: list[int], resid_final: torch.Tensor) -> np.ndarray:
    """(n,) the margin before soft-capping, from the recorded final residual stream alone (equal to
    the model's: the decomposition's check)."""
    norm = final_norm(model)
    d, c = margin_direction(model, token_ids)
    y = norm.apply(resid_final, resid_final)
    if norm.bias is not None:
        y = y + norm.bias.double()
    return (y @ d + c).numpy()


def projection_weight(model, site: HeadSite) -> torch.Tensor:
    """(d_out, n_heads * head_dim): the output projection as ``out = W z + b``."""
    weight = model.get_submodule(site.module_name).weight.detach().double()
    return weight.T if site.transposed else weight


def gradients(
    model, sites: list[HeadSite], token_ids: list[int], state: dict
) -> dict[int, torch.Tensor]:
    """Per layer ``L``: (n, n_heads * head_dim), the margin's direct-path gradient with respect to
    the o_proj input at each prompt's final position (head ``h``'s columns are its own). ``state``
    is the baseline's final state (``resid_final``, and ``out.L`` where the attention output is
    normalised before the residual add)."""
    if "resid_final" not in state:
        raise DirectEffectError(
            "the baseline's final state has no resid_final (the residual stream entering the final "
            "norm), which direct effects need: it was recorded by an older headperturb or the "
            "model has no final norm headperturb knows; rerun the baseline "
            f"({hints.command('--forcerun', 'baseline')})"
        )
    u = readout(model, token_ids, state["resid_final"].float())
    out = {}
    for site in sites:
        v = u
        post = post_attention_norm(model, site)
        if post is not None:
            v = FrozenNorm.of(post).pullback(u, state[f"out.{site.layer}"].float())
        out[site.layer] = v @ projection_weight(model, site)
    return out


def head_sums(
    grads: dict[int, torch.Tensor],
    state: dict,
    sites: list[HeadSite],
    partners: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The sums the kinds' first-order formulas take (:mod:`headperturb.core.kinds`), each
    (n, n_layers, n_heads): ``z_dot_g``, ``mean_dot_g`` (the head's mean final-position output
    over the prompts), ``partner_dot_g`` (the output on each prompt's partner, ``partners`` its
    row or -1: NaN) and ``g_norm``."""
    n = next(iter(grads.values())).shape[0]
    shape = (n, len(sites), sites[0].n_heads)
    sums = {
        key: np.full(shape, np.nan) for key in ("z_dot_g", "mean_dot_g", "partner_dot_g", "g_norm")
    }
    for j, site in enumerate(sites):
        g = grads[site.layer].reshape(n, site.n_heads, site.head_dim)
        z = state[f"z.{site.layer}"].double().reshape(n, site.n_heads, site.head_dim)
        sums["z_dot_g"][:, j] = (z * g).sum(-1).numpy()
        sums["mean_dot_g"][:, j] = (z.mean(0, keepdim=True) * g).sum(-1).numpy()
        sums["g_norm"][:, j] = g.norm(dim=-1).numpy()
        if partners is not None:
            has = partners >= 0
            zp = z[torch.as_tensor(np.where(has, partners, 0))]
            sums["partner_dot_g"][has, j] = (zp * g).sum(-1).numpy()[has]
    return sums

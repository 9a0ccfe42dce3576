"""What a perturbation does to one head's output: one small class per kind, found through one
registry.

Every kind answers the same questions:

- :meth:`Perturbation.apply`: the edit itself, a function of the head's output slice ``z`` and
  the values it reads ``v`` (the noise, zeros, the mean, the partner's output) to the slice's new
  value: ``z + v`` for noise, ``v`` for the ablations and patching. It must be affine in ``z``
  (``apply(z, v) = keep * z + add``), which the exported last layer reads off it
  (:func:`headperturb.model.tail.edits`);
- ``needs_clean``: whether its values are built from the head's clean outputs (mean, resample,
  patch, restore);
- ``paired``: whether it runs on the pairs of a prompt and its opposite-sentiment partner
  (:func:`headperturb.data.prompts.pair_prompts`), and ``runs_partner``: whether the partner is the
  prompt that runs (``restore``) rather than the one whose head output is taken;
- :meth:`Perturbation.draws`: how many draws a job evaluates;
- :meth:`Perturbation.values`: the values themselves, ``values(index, prompt_id, length)`` ->
  a (draws or 1, length, width) tensor aligned to the *last* ``length`` positions of a prompt;
- :meth:`Perturbation.label`: how tables and plots name it;
- :meth:`Perturbation.first_order`: its first-order effect on a prompt's margin, from the head's
  clean output and the margin's gradient there (the screen, :mod:`headperturb.analysis.screen`): a
  function of arrays of sums over the perturbed positions, ``z_dot_g`` (``sum z.g``),
  ``mean_dot_g`` (``sum mean.g``), ``partner_dot_g`` (``sum z_partner.g``) and ``g_norm``
  (``||g||``).

A new kind is one class here with ``@register`` (and its name in the config schema's enum; a test
checks that the two agree). This module imports only the standard library at import time, so the
Snakefile can list the kinds while building the DAG; torch is imported where values are made.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

PERTURBATIONS: dict[str, type[Perturbation]] = {}
"""kind -> class, in the order kinds are registered (the order of tables and plots)."""

Values = Callable[[int, int, int], "object"]
"""``values(index, prompt_id, length)`` -> a (draws or 1, length, width) torch.Tensor."""


def register(cls: type[Perturbation]) -> type[Perturbation]:
    PERTURBATIONS[cls.kind] = cls
    return cls


def kinds() -> tuple[str, ...]:
    return tuple(PERTURBATIONS)


class PerturbationError(ValueError):
    """A perturbation that cannot be built from the settings given."""


@dataclass(frozen=True)
class Perturbation:
    """Base class: a perturbation of one head's output (see the module docstring)."""

    kind: ClassVar[str]
    needs_clean: ClassVar[bool] = False
    takes_scale: ClassVar[bool] = False
    paired: ClassVar[bool] = False
    runs_partner: ClassVar[bool] = False

    @staticmethod
    def apply(z, v):
        """The head's output slice ``z`` edited with the values ``v`` (of ``z``'s shape): replaced
        by them."""
        return v

    def draws(self, repeats: int) -> int:
        """How many draws a job evaluates: deterministic kinds need one."""
        return 1

    def label(self) -> str:
        return f"{self.kind} ablation"

    def settings(self) -> dict:
        """What is stored with every result of this perturbation."""
        return {"kind": self.kind, "scale": "", "noise_mode": "", "sigma": float("nan")}

    def values(
        self, *, seed: int, layer: int, head: int, width: int, repeats: int, clean=None
    ) -> Values:
        """``values(index, prompt_id, length)``: the tensor added or set (see the module
        docstring). ``clean`` is the head's clean output, one (length, width) tensor per prompt,
        for kinds that need it; a paired kind also gets ``donors``, for each row the prompt whose
        clean output it takes."""
        raise NotImplementedError

    def first_order(self, sums: dict):
        """The first-order change of the margin, ``sum over positions of (v - z) . g``, from the
        sums over the perturbed positions (see the module docstring; arrays, elementwise); for
        noise, the standard deviation of the change."""
        raise NotImplementedError

    def prefix_key(self, length: int):
        """Which prompts get the same values on the demonstrations (the prefix every prompt
        shares), so that a pass computes the edited demonstrations once per group
        (:func:`headperturb.model.passes.shared_prefix`): equal keys for prompts whose values
        there are equal; ``"clean"`` where they are the prompt's own clean outputs (nothing to
        edit); None where every prompt's are its own. ``length`` is the prompt's."""
        return None


@register
@dataclass(frozen=True)
class Noise(Perturbation):
    """``randn * sigma`` added to the head's output (the original study). ``scale`` is what the
    user asked; ``sigma`` what is applied: ``scale`` itself (``absolute``) or ``scale`` times the
    head's RMS output on the baseline prompts (``relative``), set by :meth:`resolve`."""

    kind: ClassVar[str] = "noise"
    takes_scale: ClassVar[bool] = True
    NOISE_MODES: ClassVar[tuple[str, ...]] = ("absolute", "relative")

    scale: float = 1.0
    noise_mode: str = "absolute"
    sigma: float | None = None

    def __post_init__(self):
        if not float(self.scale) > 0:
            raise PerturbationError(
                f"noise scale {self.scale!r} is not allowed: scales must be > 0"
            )
        if self.noise_mode not in self.NOISE_MODES:
            raise PerturbationError(
                f"noise_mode {self.noise_mode!r} is not allowed; "
                f"allowed: {', '.join(self.NOISE_MODES)}"
            )

    @staticmethod
    def apply(z, v):
        """The noise ``v`` added to the head's output slice ``z``."""
        return z + v

    def draws(self, repeats: int) -> int:
        return int(repeats)

    def label(self) -> str:
        scale = format_scale(self.scale)
        return f"noise sigma {scale}" if self.noise_mode == "absolute" else f"noise {scale} x RMS"

    def settings(self) -> dict:
        sigma = float("nan") if self.sigma is None else float(self.sigma)
        return {
            "kind": self.kind,
            "scale": format_scale(self.scale),
            "noise_mode": self.noise_mode,
            "sigma": sigma,
        }

    def resolve(self, rms: float | None = None) -> Noise:
        """This noise with ``sigma`` set; ``rms`` (the head's RMS output) is needed in
        ``relative`` mode."""
        if self.noise_mode == "absolute":
            return replace(self, sigma=float(self.scale))
        if rms is None:
            raise PerturbationError("relative noise needs the head's RMS output")
        return replace(self, sigma=float(self.scale) * float(rms))

    def values(self, *, seed, layer, head, width, repeats, clean=None):
        if self.sigma is None:
            raise PerturbationError("resolve() the noise's sigma before making values")
        return noise_values(
            seed=seed,
            layer=layer,
            head=head,
            scale=self.sigma,
            draws=self.draws(repeats),
            width=width,
        )

    def first_order(self, sums):
        return float(self.sigma) * sums["g_norm"]


@register
@dataclass(frozen=True)
class Zero(Perturbation):
    """The head's output set to 0."""

    kind: ClassVar[str] = "zero"

    def values(self, *, seed, layer, head, width, repeats, clean=None):
        import torch

        return lambda _i, _pid, length: torch.zeros(1, length, width)

    def first_order(self, sums):
        return -sums["z_dot_g"]

    def prefix_key(self, length):
        return 0  # zeros everywhere, for every prompt


@register
@dataclass(frozen=True)
class Mean(Perturbation):
    """The head's output set to its mean over the prompts at each position counted from the end."""

    kind: ClassVar[str] = "mean"
    needs_clean: ClassVar[bool] = True

    def values(self, *, seed, layer, head, width, repeats, clean=None):
        mean = mean_from_end(clean)
        return lambda _i, _pid, length: mean[-length:][None]

    def first_order(self, sums):
        return sums["mean_dot_g"] - sums["z_dot_g"]

    def prefix_key(self, length):
        return ("length", length)  # the mean is aligned from the end: equal for equal lengths


@register
@dataclass(frozen=True)
class Resample(Perturbation):
    """The head's output taken from another prompt (a seeded derangement per draw), aligned from
    the end."""

    kind: ClassVar[str] = "resample"
    needs_clean: ClassVar[bool] = True

    def draws(self, repeats: int) -> int:
        return int(repeats)

    def values(self, *, seed, layer, head, width, repeats, clean=None):
        import torch

        chosen = [donors(seed, layer, head, d, len(clean)) for d in range(self.draws(repeats))]

        def resample(i, _pid, length):
            picks = [clean[int(c[i])] for c in chosen]
            k = min(length, *(len(p) for p in picks))
            return torch.stack([p[-k:] for p in picks])

        return resample


@register
@dataclass(frozen=True)
class Patch(Perturbation):
    """Patching, noising direction: the prompt runs with the head's output replaced by its output
    on the prompt's opposite-sentiment partner at the same positions (the two prompts have equally
    many tokens, so they align token for token). A head that writes the same thing for every
    review patches to itself; a head that carries the review's sentiment moves the answer."""

    kind: ClassVar[str] = "patch"
    needs_clean: ClassVar[bool] = True
    paired: ClassVar[bool] = True

    def label(self) -> str:
        return "patch from the opposite review"

    def values(self, *, seed, layer, head, width, repeats, clean=None, donors=None):
        return lambda i, _pid, length: clean[donors[i]][-length:][None]

    def first_order(self, sums):
        return sums["partner_dot_g"] - sums["z_dot_g"]

    def prefix_key(self, length):
        # the partner shares the demonstrations, and a causal model's output there cannot see
        # the review: the patched values are the prompt's own clean outputs
        return "clean"


@register
@dataclass(frozen=True)
class Restore(Patch):
    """Patching, denoising direction: the opposite-sentiment partner runs with the head's output
    replaced by the clean prompt's, and the answer is read against the clean prompt's label. Its
    contribution is counted from the partner's unperturbed run (restored - partner), so that a
    positive contribution still means the head carries the task."""

    kind: ClassVar[str] = "restore"
    runs_partner: ClassVar[bool] = True

    def label(self) -> str:
        return "restore into the opposite review"

    def first_order(self, sums):
        raise NotImplementedError("the screen estimates patch, not restore")


def build(kind: str, scale=None, noise_mode: str = "absolute") -> Perturbation:
    """The perturbation of ``kind``; ``scale`` and ``noise_mode`` for kinds that take a scale."""
    if kind not in PERTURBATIONS:
        raise PerturbationError(f"kind {kind!r} is not allowed; allowed: {', '.join(kinds())}")
    cls = PERTURBATIONS[kind]
    if cls.takes_scale:
        return cls(scale=float(scale), noise_mode=noise_mode)
    return cls()


# -- the pieces the kinds are made of ---------------------------------------------------------


def format_scale(scale: float) -> str:
    """The canonical text of a noise scale in file names: ``2.0 -> '2'``, ``0.5 -> '0.5'``."""
    value = float(scale)
    if not value > 0:
        raise PerturbationError(f"noise scale {scale!r} is not allowed: scales must be > 0")
    return format(value, "g")


def noise_seed(seed: int, layer: int, head: int, scale: str | float, draw: int, prompt: int) -> int:
    """A 63-bit seed for one noise tensor, a pure function of what it perturbs.

    The same (seed, layer, head, scale, draw, prompt) always gives the same noise, whatever order
    or machine the jobs run in, so a perturbation file is bit-identical across schedules.
    """
    parts = (int(seed), int(layer), int(head), format_scale(float(scale)), int(draw), int(prompt))
    key = "|".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def make_noise(*, seed, layer, head, scale, draws, prompt, length, width):
    """``randn * scale`` of shape (draws, length, width), float32, one seeded generator per draw."""
    import torch

    out = torch.empty(draws, length, width, dtype=torch.float32)
    for draw in range(draws):
        gen = torch.Generator().manual_seed(noise_seed(seed, layer, head, scale, draw, prompt))
        out[draw] = torch.randn(length, width, generator=gen)
    return out * float(scale)


def noise_values(*, seed: int, layer: int, head: int, scale: float, draws: int, width: int):
    """``values(index, prompt_id, length)``: the seeded noise (:func:`make_noise`) a prompt gets."""

    def values(_index, prompt_id, length):
        return make_noise(
            seed=seed,
            layer=layer,
            head=head,
            scale=scale,
            draws=draws,
            prompt=prompt_id,
            length=length,
            width=width,
        )

    return values


def donors(seed: int, layer: int, head: int, draw: int, n: int):
    """For each of ``n`` prompts, the prompt whose head output replaces its own: a seeded
    derangement (no prompt is its own donor when n > 1)."""
    import numpy as np

    key = noise_seed(seed, layer, head, 1.0, draw, -1)
    order = np.random.default_rng(key).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.roll(order, -1)
    return out


def mean_from_end(activations: list):
    """(max length, width): the mean over prompts at each position counted from the end."""
    import torch

    longest = max(a.shape[0] for a in activations)
    width = activations[0].shape[1]
    total = torch.zeros(longest, width, dtype=torch.float64)
    count = torch.zeros(longest, 1, dtype=torch.float64)
    for a in activations:
        total[longest - a.shape[0] :] += a.double()
        count[longest - a.shape[0] :] += 1
    return (total / count).float()

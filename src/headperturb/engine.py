"""Forward passes that score prompts, with and without a perturbed head.

Every prompt is ``prefix + query`` (see :mod:`headperturb.prompts`). Scores are the next-token
logits of the two verbalizer tokens at the last position.

- :meth:`Engine.baseline` encodes the shared prefix once, then runs each query on a copy of the
  prefix's key/value cache, computing logits for the last position only.
- :meth:`Engine.perturbed_naive` is the reference method: a full forward pass over the whole
  prompt with the noise hook active, all noise draws of a prompt in one batch.
"""

from __future__ import annotations

import copy
import inspect
import logging

import numpy as np
import torch

from .intervention import make_noise, perturb_head, site_slice
from .logs import Progress
from .sites import HeadSite

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model, prefix_len: int, label_token_ids: list[int]):
        self.model = model
        self.device = next(model.parameters()).device
        self.prefix_len = int(prefix_len)
        self.label_ids = torch.tensor(label_token_ids, device=self.device)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _ids(self, ids) -> torch.Tensor:
        return torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.device)[None, :]

    def _labels(self, logits: torch.Tensor) -> np.ndarray:
        return logits[:, -1, :].index_select(-1, self.label_ids).float().cpu().numpy()

    @torch.inference_mode()
    def encode_prefix(self, prefix_ids):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        self.model(
            input_ids=self._ids(prefix_ids),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        return cache

    @torch.inference_mode()
    def baseline(self, prompts: list, progress: Progress | None = None) -> np.ndarray:
        """(n, 2) verbalizer logits of the unperturbed model, reusing the prefix's cache."""
        out = np.empty((len(prompts), 2), dtype=np.float64)
        prefix = list(prompts[0][: self.prefix_len]) if self.prefix_len else []
        cache = self.encode_prefix(prefix) if prefix else None
        for i, ids in enumerate(prompts):
            if list(ids[: self.prefix_len]) != prefix:
                raise ValueError(f"prompt {i} does not start with the shared prefix")
            kwargs = {self._cache_kw: copy.deepcopy(cache)} if cache is not None else {}
            logits = self.model(
                input_ids=self._ids(ids[self.prefix_len :]),
                use_cache=cache is not None,
                logits_to_keep=1,
                **kwargs,
            ).logits
            out[i] = self._labels(logits)[0]
            if progress:
                progress.update()
        return out

    @torch.inference_mode()
    def full(self, ids, batch: int = 1) -> np.ndarray:
        """(batch, 2) verbalizer logits of a plain full forward over the whole prompt."""
        inputs = self._ids(ids).expand(batch, -1)
        return self._labels(self.model(input_ids=inputs, use_cache=False, logits_to_keep=1).logits)

    @torch.inference_mode()
    def perturbed_naive(
        self,
        prompts: list,
        prompt_ids: list[int],
        *,
        site: HeadSite,
        head: int,
        where: str,
        scale: float,
        draws: int,
        seed: int,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """(n, draws, 2) verbalizer logits with head ``head`` perturbed: the reference method."""
        width = (
            site_slice(self.model, site, head, where).stop
            - site_slice(self.model, site, head, where).start
        )
        out = np.empty((len(prompts), draws, 2), dtype=np.float64)
        for i, (ids, pid) in enumerate(zip(prompts, prompt_ids)):
            noise = make_noise(seed=seed, layer=site.layer, head=head, scale=scale, draws=draws,
                               prompt=pid, length=len(ids), width=width)  # fmt: skip
            with perturb_head(self.model, site, head, noise.to(self.device), where):
                out[i] = self.full(ids, batch=draws)
            if progress:
                progress.update()
        return out

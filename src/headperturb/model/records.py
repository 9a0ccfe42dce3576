"""What the unperturbed model's passes (:mod:`headperturb.model.engine`) record as they run:
each prompt's final state, every head's RMS output, and every layer's keys and values."""

from __future__ import annotations

import torch

from headperturb.model.sites import HeadSite


def full_cache():
    """An empty cache that keeps every position of every layer (sliding windows too)."""
    from transformers import DynamicCache

    return DynamicCache()


def layers_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values) in ``cache``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


class RmsSums:
    """Running sums of each head's squared output at both sites; the shared prefix counts once
    per prompt, padded positions not at all."""

    def __init__(self, n_prompts: int):
        self.n_prompts = n_prompts
        self.sums: dict[tuple[str, int], list] = {}

    def add(self, where: str, site: HeadSite, x: torch.Tensor, lengths) -> None:
        x = x.detach().float()
        n_heads = site.n_heads
        if lengths is None:  # the prefix, shared by every prompt
            sq, count = x[0].pow(2).sum(0) * self.n_prompts, x.shape[1] * self.n_prompts
        else:
            valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
            sq = (x.pow(2) * valid[..., None]).sum((0, 1))
            count = int(valid.sum())
        per_head = sq.reshape(n_heads, -1).sum(-1).double().cpu()
        entry = self.sums.setdefault(
            (where, site.layer), [torch.zeros(n_heads, dtype=torch.float64), 0, 0]
        )
        entry[0] += per_head
        entry[1] += count
        entry[2] = sq.numel() // n_heads

    def rows(self) -> list[dict]:
        """Rows (site, layer, head, rms)."""
        rows = []
        for (where, layer), (sq, count, width) in sorted(self.sums.items()):
            for head, value in enumerate((sq / max(count * width, 1)).sqrt().tolist()):
                rows.append({"site": where, "layer": layer, "head": head, "rms": value})
        return rows


def final_recorder(final: dict, name: str, current: dict, rms: RmsSums | None = None, what=None):
    """A hook function recording an activation at each prompt's final position into
    ``final[name]``, and adding to the RMS sums when given."""

    def record(x: torch.Tensor) -> None:
        lengths = current["lengths"]
        if rms is not None:
            rms.add(what[0], what[1], x, lengths)
        if lengths is None:  # the prefix pass: no prompt ends there
            return
        rows = torch.arange(x.shape[0], device=x.device)
        final.setdefault(name, []).append(x[rows, lengths - 1].detach().float().cpu().clone())

    return record


class KeysValues:
    """Every layer's keys and values of the prompts run so far, in :meth:`capture_cache`'s
    layout: the prefix's (from its cache, None without one) once, then each prompt's own."""

    def __init__(self, prefix_len: int, cache):
        self.prefix_len, self.parts, self.offsets = prefix_len, {}, [0]
        if cache is not None:
            for layer, (k, v) in enumerate(layers_kv(cache)):
                self.parts.setdefault(f"k.{layer}", []).append(k[0].float().cpu())
                self.parts.setdefault(f"v.{layer}", []).append(v[0].float().cpu())

    def add(self, lengths, batch_cache) -> None:
        """A batch's own positions (``lengths``: each row's), from its cache."""
        for layer, (k, v) in enumerate(layers_kv(batch_cache)):
            for row, length in enumerate(lengths.tolist()):
                sl = slice(self.prefix_len, self.prefix_len + length)
                self.parts.setdefault(f"k.{layer}", []).append(k[row, :, sl].float().cpu())
                self.parts.setdefault(f"v.{layer}", []).append(v[row, :, sl].float().cpu())
        for length in lengths.tolist():
            self.offsets.append(self.offsets[-1] + length)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {key: torch.cat(rows, dim=1).contiguous() for key, rows in self.parts.items()}
        out["offsets"] = torch.tensor(self.offsets, dtype=torch.int64)
        out["prefix_len"] = torch.tensor([self.prefix_len], dtype=torch.int64)
        return out

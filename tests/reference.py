"""The tests' reference passes that the product no longer runs.

:func:`from_layer` is the whole prompt from the job's layer, one prompt per call (the path before
release 0.3.0): the shared-prefix pass must give its numbers, and so must the naive pass.
"""

from __future__ import annotations

import numpy as np
import torch

from headperturb.model import hooks
from headperturb.model.engine import on_device, two_logits
from headperturb.model.passes import layer_input


@torch.inference_mode()
def from_layer(engine, captured, prompts, prompt_ids, edit, progress=None, runs=None):
    """(n, draws, 2) logits with ``edit`` applied at any layer, running only layers >= L from the
    recorded residual stream entering it. ``runs`` says which recorded prompt each row is
    (default: row i is prompt i); ``prompts`` are the rows' token ids."""
    out = np.empty((len(prompts), edit.draws, 2), dtype=np.float64)
    for i, (ids, pid) in enumerate(zip(prompts, prompt_ids)):
        hidden = layer_input(captured, runs[i] if runs is not None else i)
        if hidden.shape[0] != len(ids):
            raise ValueError(f"the layer input recorded for prompt {pid} does not match its length")
        hidden = hidden.to(engine.device)[None].expand(edit.draws, -1, -1)
        values = on_device(edit.values_for(i, pid, len(ids)), engine.device)
        with (
            hooks.start_at_layer(engine.model, edit.site, hidden),
            hooks.edited(engine.model, edit, values),
        ):
            out[i] = two_logits(engine, input_ids=engine.ids(ids).expand(edit.draws, -1))
        if progress:
            progress.update()
    return out

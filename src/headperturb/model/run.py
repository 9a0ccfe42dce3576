"""One road from a plan to its numbers: :func:`run` computes the logits of a :class:`Target`
(one head, or a set of heads, with one kind) by the pass its
:class:`~headperturb.core.plans.Plan` names, for head jobs (:mod:`headperturb.model.headjob`) and
set jobs (:mod:`headperturb.model.headset`) alike.

Each pass has one runner here (:data:`RUNNERS`, one per :data:`headperturb.core.plans.PASSES`):
it loads what the plan reads (each recording checked against the job's prompts and model,
:func:`headperturb.model.recordings.load`), builds the edit (:func:`build_edit`: each member's
values from its kind, :meth:`headperturb.core.kinds.Perturbation.values`, and the kind's function,
:meth:`~headperturb.core.kinds.Perturbation.apply`) and calls the pass
(:mod:`headperturb.model.passes`, or the exported last layer, :mod:`headperturb.model.tail`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from headperturb import joblog
from headperturb.core import files
from headperturb.core.plans import Plan
from headperturb.data.parts import Prefix
from headperturb.model import cache
from headperturb.model.context import (
    JobInputs,
    ModelSpec,
    gpu_memory_hint,
    load_engine,
    prefix_of,
    prompt_ids,
)
from headperturb.model.hooks import AT_SITE, Edit, EditSet, site_slice
from headperturb.model.rows import Rows, job_rows
from headperturb.model.sites import HeadSite
from headperturb.model.target import Result, Target, build_edit

log = logging.getLogger("headperturb")


def run(plan: Plan, target: Target, inputs: JobInputs, model: ModelSpec) -> Result:
    """The logits of ``target`` perturbed, every row and draw, by the pass ``plan`` names."""
    return RUNNERS[plan.name](plan, target, inputs, model)


def _result(rows: Rows, pids, labels, logits, model_info: dict, device: str, engine: str):
    partners = None if rows.partner is None else [int(pids[k]) for k in rows.partner]
    prompts = [int(pids[k]) for k in rows.prompt]
    labels = np.asarray(labels)[rows.prompt]
    return Result(prompts, labels, logits, model_info, device, engine, partners)


def recorded(step: str, inputs: JobInputs, model_info: dict, n_prompts: int, **extra) -> dict:
    """The provenance a recording this job reads must carry
    (:func:`headperturb.model.recordings.load`)."""
    from headperturb.model import recordings

    return recordings.recording(step, inputs.prompts.info, model_info, n_prompts=n_prompts, **extra)


# -- the passes that need no model ------------------------------------------------------------


def _model_info(model: ModelSpec) -> dict:
    from headperturb.model import loading

    return files.read_json(f"{model.path}/{loading.INFO_FILE}")


def _labels(prompts_path) -> tuple[list[int], np.ndarray]:
    table = files.read_columns(prompts_path, ["prompt_id", "label"])
    return table["prompt_id"], np.asarray(table["label"])


def _unperturbed(plan: Plan, target: Target, inputs: JobInputs, model: ModelSpec) -> Result:
    """An edit that cannot reach the logits: each row's logits are its run prompt's unperturbed
    ones, read from the baseline."""
    model_info = _model_info(model)
    pids, labels = _labels(inputs.prompts.prompts)
    columns = ["prompt_id", "logit_negative", "logit_positive"]
    base = files.read_columns(inputs.unperturbed, columns)
    if list(base["prompt_id"]) != list(pids):
        raise ValueError(f"{inputs.unperturbed} holds other prompts than {inputs.prompts.prompts}")
    rows = job_rows(target.perturbation, pids, inputs.pairs)
    logits = np.stack([base["logit_negative"], base["logit_positive"]], axis=-1)[rows.run]
    logits = np.repeat(logits[:, None, :], target.draws, axis=1)
    log.info("%s: the unperturbed logits (%s)", target.what, plan.note)
    return _result(rows, pids, labels, logits, model_info, "none", "unperturbed")


def _program(plan: Plan, target: Target, inputs: JobInputs, model: ModelSpec) -> Result | None:
    """A last-layer job on the baseline's exported last layer: torch and pyarrow only, every
    prompt and draw in one call. None when there is no program for this job's device."""
    from headperturb.model import loading, tail
    from headperturb.model.engine import FINAL_STATE_KEYS

    cache.set_threads(model.threads)
    device = loading.resolve_device(model.device)
    model_info = _model_info(model)
    sha = model_info.get("weights_sha256")
    program, meta = cache.cached_program(inputs.program, device, sha)
    if program is None:
        log.info("last-layer program not used: %s; loading the model", meta)
        return None
    if meta["layer"] != plan.layer:
        raise ValueError(
            f"the program in {inputs.program} is layer {meta['layer']}, not {plan.layer}"
        )
    shape = (model_info.get("n_heads"), model_info.get("head_dim"))
    if (meta["n_heads"], meta["head_dim"]) != shape:
        raise ValueError(f"the program in {inputs.program} has another shape than the model's")
    pids, labels = _labels(inputs.prompts.prompts)
    keys = (*(f"{k}.{plan.layer}" for k in FINAL_STATE_KEYS), "n_tokens")
    expect = recorded("baseline", inputs, model_info, len(pids))
    state = tail.layer_state(cache.cached_tensors(inputs.state, keys, expect), plan.layer)
    rows = job_rows(target.perturbation, pids, inputs.pairs)
    info = files.read_json(inputs.prompts.info)
    edit = build_edit(
        target,
        site_of=lambda layer: HeadSite(layer, "", meta["n_heads"], meta["head_dim"], False),
        cols_of=lambda _site, head: tail.columns(meta, head, target.where),
        clean_of=lambda _site, _head, cols: tail.final_outputs(state, cols, target.where),
        donors=rows.donors,
        prefix=Prefix(int(info["prefix_len"])),  # at the last layer: all or last
    )
    run_state, run_pids = tail.rows_of(state, rows.run), [pids[k] for k in rows.prompt]
    logits = gpu_memory_hint(tail.perturbed, program, run_state, run_pids, meta, edit, device)
    return _result(rows, pids, labels, logits, model_info, device, "program")


# -- the passes on the model ------------------------------------------------------------------


@dataclass(frozen=True)
class _Loaded:
    """What a pass on the model runs on: the engine, each layer's site, the model's info, every
    prompt's token ids, ids and labels, the job's rows, and where the demonstrations lie."""

    engine: object
    sites: list
    model_info: dict
    ids: list
    pids: list
    labels: np.ndarray
    rows: Rows
    prefix: Prefix

    def cols_of(self, where: str) -> Callable:
        return lambda site, head: site_slice(self.engine.model, site, head, where)

    @property
    def run_ids(self) -> list:
        return [self.ids[k] for k in self.rows.run]

    @property
    def run_pids(self) -> list:
        return [self.pids[k] for k in self.rows.prompt]

    def result(self, logits) -> Result:
        device = str(self.engine.device)
        return _result(self.rows, self.pids, self.labels, logits, self.model_info, device, "model")


def _load(target: Target, inputs: JobInputs, model: ModelSpec) -> _Loaded:
    engine, sites, model_info, info = load_engine(inputs.prompts, model)
    ids, pids, labels = prompt_ids(inputs.prompts.prompts)
    rows = job_rows(target.perturbation, pids, inputs.pairs)
    prefix = prefix_of(info, ids[0], model.path, [target.position])
    return _Loaded(engine, sites, model_info, ids, pids, labels, rows, prefix)


def _edit(target: Target, loaded: _Loaded, clean_of) -> Edit | EditSet:
    return build_edit(
        target,
        site_of=lambda layer: loaded.sites[layer],
        cols_of=loaded.cols_of(target.where),
        clean_of=clean_of,
        donors=loaded.rows.donors,
        prefix=loaded.prefix,
    )


def _final_state(inputs: JobInputs, loaded: _Loaded) -> dict:
    expect = recorded("baseline", inputs, loaded.model_info, len(loaded.ids))
    return cache.cached_tensors(inputs.state, None, expect)


def _from_state(state: dict, where: str) -> Callable:
    """Each member's clean output at the final position, from the baseline's final state."""
    from headperturb.model import tail

    def clean_of(site: HeadSite, _head: int, cols: slice):
        return tail.final_outputs(tail.layer_state(state, site.layer), cols, where)

    return clean_of


def _last_layer(plan: Plan, target: Target, inputs: JobInputs, model: ModelSpec) -> Result:
    """The last layer's final position: the exported program where there is one for the job's
    device, else the same layer of the model."""
    if inputs.program:
        result = _program(plan, target, inputs, model)
        if result is not None:
            return result
    from headperturb.model import passes, tail  # the model's code, which the program avoids

    loaded = _load(target, inputs, model)
    state = _final_state(inputs, loaded)
    edit = _edit(target, loaded, _from_state(state, target.where))
    run_state = tail.rows_of(tail.layer_state(state, plan.layer), loaded.rows.run)
    engine = loaded.engine
    logits = gpu_memory_hint(passes.last_layer, engine, run_state, loaded.run_pids, edit)
    return loaded.result(logits)


def _final_position(plan: Plan, target: Target, inputs: JobInputs, model: ModelSpec) -> Result:
    from headperturb.model import passes

    loaded = _load(target, inputs, model)
    state = _final_state(inputs, loaded)
    expect = recorded("capture_cache", inputs, loaded.model_info, len(loaded.ids))
    kv = cache.cached_tensors(inputs.cache, None, expect)
    edit = _edit(target, loaded, _from_state(state, target.where))
    logits = gpu_memory_hint(
        passes.final_position,
        loaded.engine,
        state,
        kv,
        loaded.run_pids,
        edit,
        runs=loaded.rows.run,
    )
    return loaded.result(logits)


def _full_outputs(target: Target, loaded: _Loaded, captured=None) -> Callable:
    """Each member's clean output at every position of every prompt (at the final one for
    ``positions: last``), from a full forward or from the recorded layer input ``captured``."""
    from headperturb.model import passes

    def clean_of(site: HeadSite, head: int, _cols: slice):
        clean = passes.clean_outputs(loaded.engine, loaded.ids, site, head, target.where, captured)
        return [c[-1:] for c in clean] if target.position == "last" else clean

    return clean_of


def _pooled_means(target: Target, loaded: _Loaded) -> Callable:
    """Each member's output averaged over the prompts in one pass for every member's layer
    (:func:`headperturb.model.gradients.head_means`): the mean of one array is itself."""
    from headperturb.model import gradients

    layers = sorted({layer for layer, _ in target.members})
    sites = [loaded.sites[layer] for layer in layers]
    means = gpu_memory_hint(
        gradients.head_means, loaded.engine, loaded.ids, sites, where=target.where
    )
    return lambda site, _head, cols: [means[site.layer][:, cols]]


def _captured(plan: Plan, inputs: JobInputs, loaded: _Loaded) -> dict:
    expect = recorded("capture_layer", inputs, loaded.model_info, len(loaded.ids), layer=plan.layer)
    return cache.cached_tensors(inputs.activations, None, expect)


def _prefix_keys(target: Target, lengths: list[int]) -> list:
    """Per row, which rows share the edited demonstrations
    (:meth:`headperturb.core.kinds.Perturbation.prefix_key`): the review and the final position
    leave them clean."""
    if target.position in ("review", "last"):
        return ["clean"] * len(lengths)
    return [target.perturbation.prefix_key(n) for n in lengths]


def _shared_prefix(plan: Plan, target: Target, inputs: JobInputs, model: ModelSpec) -> Result:
    from headperturb.model import passes

    loaded = _load(target, inputs, model)
    captured = _captured(plan, inputs, loaded)
    clean_of = None
    if target.perturbation.needs_clean:
        pooled = target.is_set
        clean_of = (
            _pooled_means(target, loaded) if pooled else _full_outputs(target, loaded, captured)
        )
    edit = _edit(target, loaded, clean_of)
    run_ids = loaded.run_ids
    keys = _prefix_keys(target, [len(x) for x in run_ids])
    with joblog.progress(len(run_ids), target.what, log):
        logits = gpu_memory_hint(
            passes.shared_prefix,
            loaded.engine,
            captured,
            run_ids,
            loaded.run_pids,
            edit,
            keys,
            runs=loaded.rows.run,
        )
    return loaded.result(logits)


def _partner_patched(plan: Plan, target: Target, inputs: JobInputs, model: ModelSpec) -> Result:
    from headperturb.model import passes

    loaded = _load(target, inputs, model)
    captured = _captured(plan, inputs, loaded)
    cols_of = loaded.cols_of(target.where)
    by_site: dict = {}
    for layer, head in target.members:
        site = loaded.sites[layer]
        by_site.setdefault(site, []).append(cols_of(site, head))
    run_ids, rows = loaded.run_ids, loaded.rows
    with joblog.progress(len(run_ids), target.what, log):
        logits = gpu_memory_hint(
            passes.partner_patched,
            loaded.engine,
            captured,
            run_ids,
            AT_SITE[target.where],
            by_site,
            rows.run,
            rows.donors,
        )
    return loaded.result(logits)


def _naive(plan: Plan, target: Target, inputs: JobInputs, model: ModelSpec) -> Result:
    from headperturb.model import passes

    loaded = _load(target, inputs, model)
    edit = _edit(target, loaded, _full_outputs(target, loaded))
    run_ids = loaded.run_ids
    with joblog.progress(len(run_ids), target.what, log):
        logits = gpu_memory_hint(passes.naive, loaded.engine, run_ids, loaded.run_pids, edit)
    return loaded.result(logits)


RUNNERS = {
    "naive": _naive,
    "unperturbed": _unperturbed,
    "last_layer": _last_layer,
    "final_position": _final_position,
    "shared_prefix": _shared_prefix,
    "partner_patched": _partner_patched,
}
"""The runner of each pass (:data:`headperturb.core.plans.PASSES`)."""

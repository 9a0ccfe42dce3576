"""One head job, top to bottom: its plan, its rows, its edit, its pass and its result file.

A job travels as one :class:`headperturb.core.spec.Job`. :func:`perturb` resolves its noise
(relative noise reads the head's RMS), runs the pass its :func:`headperturb.core.plans.plan`
names, and writes one row per (draw, prompt) with the job's settings in front and in the file's
metadata (:mod:`headperturb.model.recordings`), which the aggregation checks against the run's
config. The pass:

- ``last_layer``: the baseline's exported last layer (:mod:`headperturb.model.tail`), torch alone,
  no transformers, no other weights; where there is no program for the job's device, the same
  layer of the model;
- ``final_position``, ``shared_prefix``, ``naive``: the model (:mod:`headperturb.model.passes`).

Every recording a job reads is checked against the job's prompts and model
(:func:`headperturb.model.recordings.load`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from headperturb import joblog
from headperturb.analysis import scoring
from headperturb.core import files
from headperturb.core.plans import plan
from headperturb.core.spec import Job
from headperturb.model import cache
from headperturb.model.context import (
    ModelSpec,
    PromptFiles,
    gpu_memory_hint,
    load_engine,
    prompt_ids,
)
from headperturb.model.hooks import Edit
from headperturb.model.sites import HeadSite

log = logging.getLogger("headperturb")


@dataclass(frozen=True)
class JobInputs:
    """What a head job reads: the prompts, and what its pass starts from (the baseline's final
    state and exported last layer, a recorded layer input, the recorded keys and values; none for
    the naive method) and the head RMS (relative noise)."""

    prompts: PromptFiles
    state: str | None = None
    program: str | None = None
    activations: str | None = None
    cache: str | None = None
    rms: str | None = None
    pairs: str | None = None
    unperturbed: str | None = None  # the baseline's per-prompt logits


@dataclass(frozen=True)
class Rows:
    """The rows a job scores, as indices into the run's prompts: the prompt each row is scored for
    (``prompt``: its id and label) and, for the paired kinds, the prompt's opposite-sentiment
    partner. Every prompt runs for itself unless the kind is paired: ``patch`` runs each paired
    prompt with its partner's head output, ``restore`` (``runs_partner``) runs the partner with
    the prompt's."""

    prompt: list[int]
    partner: list[int] | None = None
    runs_partner: bool = False

    @property
    def run(self) -> list[int]:
        """The recorded prompt each row runs."""
        return self.partner if self.runs_partner else self.prompt

    @property
    def donors(self) -> list[int] | None:
        """For a paired kind, whose clean head output each row takes."""
        if self.partner is None:
            return None
        return self.prompt if self.runs_partner else self.partner


def job_rows(job: Job, prompt_ids: list[int], pairs_path=None) -> Rows:
    """The :class:`Rows` of ``job``: every prompt, or for a paired kind the prompts that have a
    partner (``prompts/pairs.parquet``)."""
    pert = job.perturbation
    if not pert.paired:
        return rows_for(pert, prompt_ids)
    if pairs_path is None:
        raise ValueError(f"{pert.kind} needs the prompts' pairs (prompts/pairs.parquet)")
    return rows_for(pert, prompt_ids, files.read_columns(pairs_path, ["prompt_id", "partner_id"]),
                   str(pairs_path))  # fmt: skip


def rows_for(pert, prompt_ids: list[int], pairs=None, where: str = "the pairs") -> Rows:
    """The :class:`Rows` of perturbation ``pert`` on the prompts ``prompt_ids`` (in recorded
    order), with ``pairs`` (prompt_id, partner_id) for a paired kind."""
    everyone = list(range(len(prompt_ids)))
    if not pert.paired:
        return Rows(everyone)
    index = {int(pid): i for i, pid in enumerate(prompt_ids)}
    if sorted(index) != sorted(int(p) for p in pairs["prompt_id"]):
        raise ValueError(f"{where} pair other prompts than the run's")
    paired = [(index[int(p)], index[int(q)])
              for p, q in zip(pairs["prompt_id"], pairs["partner_id"]) if q >= 0]  # fmt: skip
    if not paired:
        raise ValueError(
            f"{pert.kind}: no test prompt has an opposite-sentiment partner of the same length "
            f"({where}); raise prompts.n_test, or lower prompts.max_review_tokens so that "
            "more reviews are cut to the same length"
        )
    prompt = [a for a, _ in paired]
    partner = [b for _, b in paired]
    return Rows(prompt, partner, pert.runs_partner)


@dataclass
class Result:
    """The logits of one job, (rows, draws, 2), and what produced them."""

    prompt_ids: list[int]
    labels: np.ndarray
    logits: np.ndarray
    model_info: dict
    device: str
    engine: str  # "program" or "model"
    partner_ids: list[int] | None = None


def _result(rows: Rows, pids, labels, logits, model_info, device, engine) -> Result:
    partners = None if rows.partner is None else [int(pids[k]) for k in rows.partner]
    return Result([int(pids[k]) for k in rows.prompt], np.asarray(labels)[rows.prompt], logits,
                  model_info, device, engine, partners)  # fmt: skip


def head_rms(rms_path, site: str, layer: int, head: int) -> float:
    rms = files.read_columns(rms_path)
    found = [v for s_, l_, h_, v in zip(rms["site"], rms["layer"], rms["head"], rms["rms"])
             if (s_, l_, h_) == (site, layer, head)]  # fmt: skip
    if len(found) != 1:
        raise ValueError(f"{rms_path} holds no RMS for {site} layer {layer} head {head}")
    return float(found[0])


def resolve(job: Job, rms_path=None) -> Job:
    """``job`` with its noise's sigma set (relative noise reads the head's RMS)."""
    pert = job.perturbation
    if not hasattr(pert, "resolve"):
        return job
    t = job.target
    rms = head_rms(rms_path, t.site, t.layer, t.head) if pert.noise_mode == "relative" else None
    return replace(job, perturbation=pert.resolve(rms))


def make_edit(job: Job, site: HeadSite, width: int, clean=None, donors=None,
              prefix_len: int = 0) -> Edit:  # fmt: skip
    """The edit ``job`` applies to ``site``: its perturbation's values, mode and draws
    (``donors``: for a paired kind, whose clean output each row takes; ``prefix_len``: the
    demonstrations' tokens, for the segments)."""
    t, pert = job.target, job.perturbation
    extra = {"donors": donors} if pert.paired else {}
    values = pert.values(seed=job.seed, layer=t.layer, head=t.head, width=width,
                         repeats=job.repeats, clean=clean, **extra)  # fmt: skip
    return Edit(site, t.head, t.site, values, pert.mode, job.draws, t.position, prefix_len)


def prefix_keys(job: Job, lengths: list[int]) -> list:
    """Per row, which rows share the edited demonstrations
    (:meth:`headperturb.core.kinds.Perturbation.prefix_key`): the review and the final position
    leave them clean."""
    if job.target.position in ("review", "last"):
        return ["clean"] * len(lengths)
    return [job.perturbation.prefix_key(n) for n in lengths]


def perturb(job: Job, inputs: JobInputs, model: ModelSpec, out_path) -> dict:
    """Score every prompt with one head perturbed, every draw; write and return the columns."""
    job = resolve(job, inputs.rms)
    result = None
    if job.method == "fast" and inputs.unperturbed:  # the plan's unperturbed pass
        result = unperturbed(job, inputs, model)
    if (
        result is None and job.method == "fast" and inputs.program
    ):  # the plan's last_layer pass, as a program
        result = with_program(job, inputs, model)
    if result is None:
        result = with_model(job, inputs, model)
    return write(out_path, job, inputs, result)


def _labels(prompts_path) -> tuple[list[int], np.ndarray]:
    table = files.read_columns(prompts_path, ["prompt_id", "label"])
    return table["prompt_id"], np.asarray(table["label"])


def recorded(step: str, inputs: JobInputs, model_info: dict, n_prompts: int, **extra) -> dict:
    """The provenance a recording this job reads must carry (:func:`headperturb.model.recordings.load`)."""
    from headperturb.model import recordings

    return recordings.recording(step, inputs.prompts.info, model_info, n_prompts=n_prompts, **extra)


def unperturbed(job: Job, inputs: JobInputs, model: ModelSpec) -> Result | None:
    """A job whose edit cannot reach the logits (:func:`headperturb.core.plans.unchanged`): each
    row's logits are its run prompt's unperturbed ones, read from the baseline. None where the
    job's edit can reach them."""
    from headperturb.core.plans import unchanged
    from headperturb.model import loading

    model_info = files.read_json(f"{model.path}/{loading.INFO_FILE}")
    why = unchanged(job.target, int(model_info["n_layers"]))
    if why is None:
        return None
    pids, labels = _labels(inputs.prompts.prompts)
    base = files.read_columns(inputs.unperturbed, ["prompt_id", "logit_negative", "logit_positive"])
    if list(base["prompt_id"]) != list(pids):
        raise ValueError(f"{inputs.unperturbed} holds other prompts than {inputs.prompts.prompts}")
    rows = job_rows(job, pids, inputs.pairs)
    logits = np.stack([base["logit_negative"], base["logit_positive"]], axis=-1)[rows.run]
    logits = np.repeat(logits[:, None, :], job.draws, axis=1)
    log.info("%s: the unperturbed logits (%s)", job.describe(), why)
    return _result(rows, pids, labels, logits, model_info, "none", "unperturbed")


def with_program(job: Job, inputs: JobInputs, model: ModelSpec) -> Result | None:
    """A last-layer job on the baseline's exported last layer: torch and pyarrow only, every
    prompt and draw in one call. None when there is no program for this job's device."""
    from headperturb.model import loading, tail

    cache.set_threads(model.threads)
    device = loading.resolve_device(model.device)
    model_info = files.read_json(f"{model.path}/{loading.INFO_FILE}")
    program, meta = cache.cached_program(inputs.program, device, model_info.get("weights_sha256"))
    if program is None:
        log.info("last-layer program not used: %s; loading the model", meta)
        return None
    t = job.target
    if meta["layer"] != t.layer:
        raise ValueError(f"the program in {inputs.program} is layer {meta['layer']}, not {t.layer}")
    if meta["n_heads"] != model_info.get("n_heads") or meta["head_dim"] != model_info.get(
        "head_dim"
    ):
        raise ValueError(f"the program in {inputs.program} has another shape than the model's")
    from headperturb.model.engine import FINAL_STATE_KEYS

    pids, labels = _labels(inputs.prompts.prompts)
    keys = tuple(f"{k}.{t.layer}" for k in FINAL_STATE_KEYS) + ("n_tokens",)
    expect = recorded("baseline", inputs, model_info, len(pids))
    state = tail.layer_state(cache.cached_tensors(inputs.state, keys, expect), t.layer)
    rows = job_rows(job, pids, inputs.pairs)
    cols = tail.columns(meta, t.head, t.site)
    clean = None
    if job.perturbation.needs_clean:
        clean = tail.final_outputs(state, cols, t.site)
    site = HeadSite(t.layer, "", meta["n_heads"], meta["head_dim"], False)
    info = files.read_json(inputs.prompts.info)
    edit = make_edit(job, site, cols.stop - cols.start, clean, rows.donors, info["prefix_len"])
    run_state, run_pids = tail.rows_of(state, rows.run), [pids[k] for k in rows.prompt]
    logits = gpu_memory_hint(tail.perturbed, program, run_state, run_pids, meta, edit, device)
    return _result(rows, pids, labels, logits, model_info, device, "program")


def with_model(job: Job, inputs: JobInputs, model: ModelSpec) -> Result:
    """Any job on the model: the pass its plan names (:func:`headperturb.core.plans.plan`)."""
    from headperturb.model import passes, tail
    from headperturb.model.hooks import site_slice

    engine, sites, model_info, _info = load_engine(inputs.prompts, model)
    t = job.target
    site, pass_name = sites[t.layer], plan(t, job.method, len(sites)).name
    ids, pids, labels = prompt_ids(inputs.prompts.prompts)
    rows = job_rows(job, pids, inputs.pairs)
    cols = site_slice(engine.model, site, t.head, t.site)
    state = captured = None
    if pass_name in ("last_layer", "final_position"):
        expect = recorded("baseline", inputs, model_info, len(ids))
        state = cache.cached_tensors(inputs.state, None, expect)
    elif pass_name == "shared_prefix":
        expect = recorded("capture_layer", inputs, model_info, len(ids), layer=t.layer)
        captured = cache.cached_tensors(inputs.activations, None, expect)
    clean = None
    if job.perturbation.needs_clean:
        if state is not None:
            clean = tail.final_outputs(tail.layer_state(state, t.layer), cols, t.site)
        else:
            clean = passes.clean_outputs(engine, ids, site, t.head, t.site, captured)
            clean = [c[-1:] for c in clean] if t.position == "last" else clean
    edit = make_edit(job, site, cols.stop - cols.start, clean, rows.donors, engine.prefix_len)
    run_ids, run_pids = [ids[k] for k in rows.run], [pids[k] for k in rows.prompt]
    progress = joblog.Progress(len(run_ids), job.describe(), log)
    if pass_name == "naive":
        logits = gpu_memory_hint(passes.naive, engine, run_ids, run_pids, edit, progress)
    elif pass_name == "last_layer":
        run_state = tail.rows_of(tail.layer_state(state, t.layer), rows.run)
        logits = gpu_memory_hint(passes.last_layer, engine, run_state, run_pids, edit)
    elif pass_name == "final_position":
        expect = recorded("capture_cache", inputs, model_info, len(ids))
        kv = cache.cached_tensors(inputs.cache, None, expect)
        logits = gpu_memory_hint(passes.final_position, engine, state, kv, run_pids, edit,
                                 runs=rows.run)  # fmt: skip
    else:
        keys = prefix_keys(job, [len(x) for x in run_ids])
        logits = gpu_memory_hint(passes.shared_prefix, engine, captured, run_ids, run_pids, edit,
                                 keys, progress, runs=rows.run)  # fmt: skip
    return _result(rows, pids, labels, logits, model_info, str(engine.device), "model")


def write(out_path, job: Job, inputs: JobInputs, result: Result) -> dict[str, np.ndarray]:
    """Write one row per (draw, prompt) with the job's settings in front; return the columns."""
    from headperturb.model import recordings

    info = files.read_json(inputs.prompts.info)
    offset = float(info.get("calibration", {}).get("offset", 0.0))
    n, draws = result.logits.shape[:2]
    per_draw = [
        scoring.per_prompt_columns(
            result.prompt_ids,
            result.labels,
            result.logits[:, d, :],
            offset,
            f"{job.describe()}, draw {d}",
        )  # fmt: skip
        for d in range(draws)
    ]
    settings = job.settings()
    columns = {key: np.repeat(np.asarray([settings[key]]), n * draws)
               for key in ("site", "position", "kind", "scale", "layer", "head", "noise_mode",
                           "sigma", "seed")}  # fmt: skip
    columns["draw"] = np.repeat(np.arange(draws, dtype=np.int64), n)
    for key in scoring.PER_PROMPT_COLUMNS:
        columns[key] = np.concatenate([d[key] for d in per_draw])
    if result.partner_ids is not None:  # the paired kinds: whose prompt the row was paired with
        columns["partner_id"] = np.tile(np.asarray(result.partner_ids, dtype=np.int64), draws)
    stored = {"step": "perturbation", **settings, "calibration_offset": offset,
              "prompts_sha256": recordings.file_digest(inputs.prompts.info)}  # fmt: skip
    meta = recordings.provenance(result.model_info, result.device, stored)
    meta.update(method=job.method, engine=result.engine)
    files.write_parquet(out_path, columns, meta)
    correct = columns["correct"].reshape(draws, n).mean(axis=1)
    log.info("%s: accuracy per draw %s", job.describe(), ", ".join(f"{a:.4f}" for a in correct))
    return columns

"""Which head jobs a config asks for, where their files go, and the checks made while the DAG is
built (headperturb.core.spec, headperturb.core.checks)."""

from dataclasses import replace
from pathlib import Path

import pytest

from headperturb.core import checks, costs, kinds, plans, spec


def test_resolve_layers_negative_and_all():
    assert spec.resolve_layers(-1, 30) == [29]
    assert spec.resolve_layers([0, -1, 29], 30) == [0, 29]
    assert spec.resolve_layers("all", 3) == [0, 1, 2]


@pytest.mark.parametrize("bad", [30, -31, [0, 31]])
def test_resolve_layers_out_of_range_names_the_range(bad):
    with pytest.raises(
        spec.SpecError, match=r"out of range: the model has 30 layers \(allowed -30..29, negative"
    ):
        spec.resolve_layers(bad, 30)


def test_resolve_heads():
    assert spec.resolve_heads("all", 4) == [0, 1, 2, 3]
    assert spec.resolve_heads([3, 1, 1], 4) == [1, 3]
    with pytest.raises(spec.SpecError, match="4 query heads"):
        spec.resolve_heads(4, 4)
    with pytest.raises(spec.SpecError, match="'some' is not allowed"):
        spec.resolve_heads("some", 4)


def test_format_scale_is_canonical_and_positive():
    assert spec.format_scale(2.0) == "2"
    assert spec.format_scale(2) == "2"
    assert spec.format_scale(0.5) == "0.5"
    for bad in (0, -1.0):
        with pytest.raises(kinds.PerturbationError, match="must be > 0"):
            spec.format_scale(bad)


def _perturbation(**kw):
    base = dict(
        layers=[-1],
        heads="all",
        scales=[2.0],
        kinds=["noise"],
        positions=["all"],
        sites=["o_proj_input"],
    )
    return {**base, **kw}


def test_head_jobs_resolve_against_the_model_and_deduplicate():
    jobs = spec.head_jobs(_perturbation(scales=[2.0, 2]), n_layers=3, n_heads=2)
    assert [(j.kind, j.layer, j.head, j.scale) for j in jobs] == [
        ("noise", 2, 0, "2"),
        ("noise", 2, 1, "2"),
    ]
    assert (
        jobs[0].path("results/r")
        == "results/r/perturb/o_proj_input/all/noise_scale2/layer2/head0.parquet"
    )
    both = spec.head_jobs(
        _perturbation(layers=[0], heads=[1], scales=[1.0, 3.0], kinds=["noise", "zero"]), 1, 2
    )
    assert [(j.kind, j.scale) for j in both] == [("noise", "1"), ("noise", "3"), ("zero", "")]
    assert both[2].path("r") == "r/perturb/o_proj_input/all/zero/layer0/head1.parquet"
    with pytest.raises(spec.SpecError, match="kind 'shuffle'"):
        spec.head_jobs(_perturbation(kinds=["shuffle"]), 1, 1)
    with pytest.raises(spec.SpecError, match="site 'resid'"):
        spec.head_jobs(_perturbation(sites=["resid"]), 1, 1)
    with pytest.raises(spec.SpecError, match="position 'first'"):
        spec.head_jobs(_perturbation(positions=["first"]), 1, 1)


def test_sweeps_take_missing_keys_from_the_top_level_and_are_united():
    config = _perturbation(
        kinds=["noise", "zero"],
        sweeps=[{"layers": [-1]}, {"layers": "all", "positions": ["last"], "kinds": ["zero"]}],
    )
    jobs = spec.head_jobs(config, n_layers=3, n_heads=2)
    last_layer = [j for j in jobs if j.position == "all"]
    assert {(j.layer, j.kind) for j in last_layer} == {(2, "noise"), (2, "zero")}
    assert {(j.layer, j.kind) for j in jobs if j.position == "last"} == {
        (0, "zero"),
        (1, "zero"),
        (2, "zero"),
    }
    assert len(jobs) == 2 * 2 + 3 * 2
    # a job asked for twice is one job
    twice = spec.head_jobs(_perturbation(sweeps=[{"heads": [0]}, {"heads": [0, 1]}]), 3, 2)
    assert len(twice) == 2


def test_settings_round_trip_through_paths_and_wildcards():
    job = spec.HeadJob("o_proj_output", "last", "noise", "0.5", 3, 7)
    assert job.setting == "noise_scale0.5"
    assert spec.HeadJob.from_wildcards("o_proj_output", "last", "noise_scale0.5", "3", "7") == job
    assert spec.parse_setting("mean") == ("mean", "")
    import re

    pattern = re.compile(spec.setting_pattern())
    assert pattern.fullmatch("noise_scale2") and pattern.fullmatch("resample")
    assert not pattern.fullmatch("zero_scale2") and not pattern.fullmatch("noise")
    with pytest.raises(spec.SpecError, match="noise needs scale"):
        spec.parse_setting("noise")


def test_noise_seed_depends_on_every_part_and_only_on_them():
    seed = kinds.noise_seed
    base = seed(0, 1, 2, "2", 0, 5)
    assert base == seed(0, 1, 2, 2.0, 0, 5)  # the scale's text is canonical
    others = {
        seed(1, 1, 2, "2", 0, 5),
        seed(0, 0, 2, "2", 0, 5),
        seed(0, 1, 3, "2", 0, 5),
        seed(0, 1, 2, "3", 0, 5),
        seed(0, 1, 2, "2", 1, 5),
        seed(0, 1, 2, "2", 0, 6),
    }
    assert base not in others and len(others) == 6
    assert 0 <= base < 2**63


def test_data_files(tmp_path, imdb_dir):
    assert checks.data_files(None) == []
    assert checks.data_files(str(imdb_dir)) == [
        str(imdb_dir / "train.parquet"),
        str(imdb_dir / "test.parquet"),
    ]
    (tmp_path / "imdb_train.csv").write_text("text,label\n")
    (tmp_path / "imdb_test.csv").write_text("text,label\n")
    pattern = str(tmp_path / "imdb_{split}.csv")
    assert checks.data_files(pattern) == [
        str(tmp_path / "imdb_train.csv"),
        str(tmp_path / "imdb_test.csv"),
    ]
    (tmp_path / "aclImdb" / "train" / "pos").mkdir(parents=True)
    assert (
        checks.data_files(str(tmp_path)) == []
    )  # an aclImdb/ tree: one file per review, untracked


@pytest.mark.parametrize(
    "path, message",
    [
        ("{root}/absent", "does not exist"),
        ("{root}/imdb_{{split}}_{{x}}.csv", "the only placeholder allowed is {split}"),
        ("{root}/imdb_{{split}}.parquet", "imdb_test.parquet do not exist"),
        ("{root}/single.csv", "is a single file"),
        ("{root}", "holds neither train/test .parquet or .csv files nor an aclImdb/ layout"),
    ],
)
def test_data_paths_that_name_no_source_are_refused(tmp_path, path, message):
    (tmp_path / "single.csv").write_text("text,label\n")
    with pytest.raises(spec.SpecError, match=message.replace("{", r"\{").replace("}", r"\}")):
        checks.data_files(path.format(root=tmp_path))


def test_review_counts_against_the_prompt_settings(imdb_dir, tmp_path, monkeypatch):
    """The early count is what the loader keeps (duplicates dropped: IMDB repeats a few hundred
    reviews), counted once per version of the files."""
    counts = checks.review_counts(str(imdb_dir), checks.data_files(str(imdb_dir)), tmp_path)
    from headperturb.data import imdb

    kept = {
        s: imdb.load_split(str(imdb_dir), s)["label"].value_counts().to_dict()
        for s in ("train", "test")
    }
    assert counts == kept and counts["train"][0] < 12500
    monkeypatch.setattr(imdb, "load_split", None)  # a second count comes from the cache
    assert checks.review_counts(str(imdb_dir), checks.data_files(str(imdb_dir)), tmp_path) == counts
    fine = {"k_shot": 4, "n_test": 200, "candidates": 8, "n_dev": 100}
    checks.check_review_counts(counts, fine)
    with pytest.raises(
        spec.SpecError,
        match=(
            f"asks for 50050 negative reviews from the train split, which has {counts['train'][0]}"
        ),
    ):
        checks.check_review_counts(counts, {**fine, "k_shot": 100000, "candidates": 1})
    with pytest.raises(
        spec.SpecError, match="n_test asks for 15000 negative reviews from the test split"
    ):
        checks.check_review_counts(counts, {**fine, "n_test": 30000})
    checks.check_review_counts(None, {**fine, "n_test": 10**9})  # the hub: checked on reading


def test_the_schema_lists_what_the_library_knows():
    """Kinds, sites, positions, methods, noise modes and calibrations are defined once, in the
    library; the schema's enums must agree with them."""
    from headperturb.core import config
    from headperturb.data import calibration

    schema = config.load_schema(
        Path(__file__).resolve().parents[2] / "workflow/schemas/config.schema.yaml"
    )
    defs, pert = schema["$defs"], schema["properties"]["perturbation"]["properties"]
    assert defs["kinds"]["items"]["enum"] == list(kinds.kinds())
    assert defs["sites"]["items"]["enum"] == list(spec.SITES)
    named, numbered = defs["positions"]["items"]["anyOf"]
    assert named["enum"] == list(spec.POSITIONS)
    assert f"{numbered['pattern'][1:-1]}" == spec.POSITION_PATTERN.split("|")[-1]
    assert pert["method"]["enum"] == list(spec.METHODS)
    assert pert["noise_mode"]["enum"] == list(kinds.Noise.NOISE_MODES)
    assert set(pert["sweeps"]["items"]["properties"]) == set(spec.SWEEP_KEYS)
    scoring = schema["properties"]["scoring"]["properties"]
    assert scoring["calibration"]["enum"] == list(calibration.METHODS)
    from headperturb.analysis import screen

    assert schema["properties"]["screen"]["properties"]["kinds"]["items"]["enum"] == list(
        screen.KINDS
    )


def test_cost_preview_counts_jobs_and_prices_them_from_the_measured_per_token_costs():
    """Against a hand computation: 10 prompts of (1 + 1) x (56 + 8) = 128 tokens, 64 of them the
    prompt's own, 4 layers. Zero at every position of layer 1: the demonstrations once per job (a
    tenth of them per prompt), so 3 layers x (64 + 64 / 10) tokens x 0.1 s = 21.12 s a prompt;
    noise at its final position: 5 draws x 3 layers x 0.2 s = 3.0 s; 241 s in all. At the final
    position only, the zero job costs 3 x 0.2 s a prompt: (0.6 + 3.0) x 10 = 36 s."""
    config = {
        "prompts": {"n_test": 10, "k_shot": 1, "max_review_tokens": 56},
        "perturbation": {"repeats": 5, "method": "fast"},
    }
    jobs = [
        spec.HeadJob("o_proj_input", "all", "zero", "", 1, 0),
        spec.HeadJob("o_proj_input", "last", "noise", "2", 1, 0),
    ]
    shape = {"n_layers": 4}
    info = {
        "seconds_per_token_layer": 0.1,
        "seconds_per_final_token_layer": {"128": 0.2, "512": 0.4},
    }
    text = costs.cost_preview(jobs, shape, config, info)
    assert text.startswith("2 head jobs (1 at all positions, 1 at last positions): about 4 min")
    assert "at the last position only they would take about 36 s" in text
    before = costs.cost_preview(jobs, shape, config, None)
    assert before.endswith("their cost is estimated once the model is prepared")
    older = costs.cost_preview(jobs, shape, config, {"seconds_per_token_layer": 0.1})
    assert "`--forcerun prepare_model` measures them" in older


def test_out_of_range_messages_offer_what_the_config_allows():
    """Layers may count from the end; heads may not (the schema refuses negative heads)."""
    with pytest.raises(
        spec.SpecError,
        match=(
            r"layer 5 is out of range: the model has 2 layers "
            r"\(allowed -2\.\.1, negative ones from the end\)"
        ),
    ):
        spec.resolve_layers([5], 2)
    with pytest.raises(
        spec.SpecError,
        match=r"head 4 is out of range: the model has 4 query heads \(allowed 0\.\.3\)$",
    ):
        spec.resolve_heads([4], 4)
    with pytest.raises(spec.SpecError, match=r"head -1 is out of range.*\(allowed 0\.\.3\)"):
        spec.resolve_heads([-1], 4)
    assert spec.resolve_layers([-1], 2) == [1]


@pytest.mark.parametrize(
    "template, message",
    [
        ("Review: {text} {foo}\nSentiment: {label}", r"holds the placeholder\(s\) \{foo\}"),
        ("Review: {text}\nSentiment: {label} {Label}", r"holds the placeholder\(s\) \{Label\}"),
        ("Sentiment: {label}\nReview: {text}", r"\{label\} must come after \{text\}"),
    ],
)
def test_templates_hold_only_their_two_placeholders(template, message):
    with pytest.raises(spec.SpecError, match=message):
        checks.check_template(template)
    checks.check_template("Review: {text}\nSentiment: {label} {}")  # a literal {} is text


def test_model_sha256_is_checked_or_refused_never_ignored(tmp_path):
    from headperturb.core import files
    from headperturb.model import loading

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    right = files.sha256_file(folder / "model.safetensors")
    loading.verify_source(str(folder), None, right)
    with pytest.raises(
        loading.ModelError, match="sha256 of .*model.safetensors.* is .* but the config expects"
    ):
        loading.verify_source(str(folder), None, "0" * 64)
    (folder / "model-2.safetensors").write_bytes(b"more")
    with pytest.raises(loading.ModelError, match="is one hash, but .* holds 2 weights files"):
        loading.verify_source(str(folder), None, right)
    both = {
        "model.safetensors": right,
        "model-2.safetensors": files.sha256_file(folder / "model-2.safetensors"),
    }
    loading.verify_source(str(folder), None, both)
    with pytest.raises(loading.ModelError, match="name every one of them"):
        loading.verify_source(str(folder), None, {"model.safetensors": right})
    with pytest.raises(loading.ModelError, match="no local file or folder"):
        loading.verify_source("someone/model", None, right)
    with pytest.raises(spec.SpecError, match="is a hub id"):
        checks.check_model_sha256({"path": "someone/model", "sha256": right}, local=False)
    with pytest.raises(spec.SpecError, match="give its sha256 as one hash"):
        checks.check_model_sha256({"pypi_wheel": {}, "sha256": both}, local=False)
    checks.check_model_sha256({"path": str(folder), "sha256": both}, local=True)


def test_each_job_gets_the_pass_its_settings_allow():
    """The plan of a 30-layer model: the reference, the last layer, the final position, the
    demonstrations once per job, and the unperturbed logits where the edit cannot reach them."""

    def name(position, kind, layer, method="fast"):
        scale = "2" if spec.takes_scale(kind) else ""
        return plans.plan(
            spec.HeadJob("o_proj_input", position, kind, scale, layer, 0), method, 30
        ).name

    assert name("all", "zero", 3, "naive") == "naive"
    assert name("review", "zero", 29, "naive") == "naive"  # the reference runs everything
    assert name("all", "zero", 29) == "last_layer"
    assert name("last", "patch", 29) == "last_layer"
    assert name("last", "zero", 3) == "final_position"
    for position in ("all", "demonstrations", "review"):
        assert name(position, "zero", 3) == "shared_prefix"
    assert name("review", "patch", 3) == "shared_prefix"
    for position in ("demonstrations", "review"):
        assert (
            name(position, "noise", 29) == "unperturbed"
        )  # only the final position reaches the logits
    for kind in ("patch", "restore"):
        assert name("demonstrations", kind, 3) == "unperturbed"  # the partner shares them
    assert plans.plan(
        spec.HeadJob("o_proj_input", "review", "zero", "", 29, 0), "fast", 30
    ).recordings == ("unperturbed",)


def test_the_longest_jobs_and_the_recordings_come_first():
    """Priorities (a 30-layer model, 5 noise draws): the layers a job's pass runs over every token,
    times its draws, times 5 where every prompt runs its own demonstrations; recordings and then
    the checkpoints above every job."""

    def priority(position, layer, method="fast", kind="zero"):
        job = spec.HeadJob(
            "o_proj_input", position, kind, "2.0" if kind == "noise" else "", layer, 0
        )
        return plans.priority(job, method, 30, repeats=5)

    assert priority("all", 0) == 30 and priority("all", 3) == 27 and priority("review", 28) == 2
    assert priority("all", 3, "naive") == 5 * 30  # full passes over the whole prompt
    assert priority("all", 3, kind="noise") == 5 * 27 * 5  # draws, its own demonstrations
    assert priority("review", 3, kind="noise") == 5 * 27  # the demonstrations stay clean
    assert priority("last", 3) == priority("all", 29) == priority("review", 29) == 0
    assert priority("demonstrations", 3, kind="patch") == 0  # unperturbed
    assert (
        plans.CHECKPOINT_PRIORITY > plans.RECORDING_PRIORITY > priority("all", 0, "naive", "noise")
    )


def test_recordings_start_from_every_stride_th_layer():
    """30 layers: stride 5, each recording from the multiple of 5 below it (the first five from
    the embeddings); a 4-layer model: each from the layer below."""
    assert [plans.recording_source(layer, 30) for layer in (1, 5, 6, 10, 13, 25, 28)] == [
        None,
        None,
        5,
        5,
        10,
        20,
        25,
    ]
    assert [plans.recording_source(layer, 4) for layer in (1, 2, 3)] == [None, 1, 2]
    assert plans.recording_source(15, 16) == 12 and plans.recording_source(3, 16) is None


def test_demonstrations_need_demonstrations():
    perturbation = {"sweeps": [{"positions": ["review", "demonstrations"]}]}
    with pytest.raises(spec.SpecError, match="prompts.k_shot = 0 gives none; set k_shot >= 1"):
        checks.check_segments(perturbation, {"k_shot": 0})
    checks.check_segments(perturbation, {"k_shot": 1})
    checks.check_segments({"sweeps": [{"positions": ["all"]}]}, {"k_shot": 0})


def test_label_words_and_single_demonstrations_are_positions_inside_the_demonstrations():
    """demonstration_<i> up to k_shot, in the sweeps and an enabled screen; label_words where there
    are demonstrations; a name that is none is refused with what is allowed."""
    one = {"sweeps": [{"positions": ["label_words", "demonstration_2"]}]}
    checks.check_segments(one, {"k_shot": 2})
    with pytest.raises(spec.SpecError, match="allowed: demonstration_1 to demonstration_1"):
        checks.check_segments(one, {"k_shot": 1})
    with pytest.raises(spec.SpecError, match="label_words asks .*k_shot = 0 gives none"):
        checks.check_segments(one, {"k_shot": 0})
    screen = {"enabled": True, "positions": ["all", "demonstration_5"]}
    all_ = {"sweeps": [{"positions": ["all"]}]}
    with pytest.raises(spec.SpecError, match="demonstration_5 asks for demonstration 5"):
        checks.check_segments(all_, {"k_shot": 4}, screen)
    checks.check_segments(all_, {"k_shot": 4}, {**screen, "enabled": False})
    for wrong in ("demonstration_0", "demonstration_x", "labels"):
        with pytest.raises(spec.SpecError, match="allowed: all, last, .*label_words"):
            spec.check_position(wrong)
    assert spec.in_prefix("demonstration_3") and spec.in_prefix("label_words")
    assert not spec.in_prefix("review") and not spec.in_prefix("all")
    assert spec.within_demonstrations("label_words") and spec.within_demonstrations(
        "demonstration_2"
    )
    assert not spec.within_demonstrations("demonstrations")
    job = spec.HeadJob("o_proj_input", "label_words", "patch", "", 3, 0)
    assert "shares the demonstrations" in plans.unchanged(job, 30)
    assert "only the final position" in plans.unchanged(replace(job, kind="zero", layer=29), 30)
    assert plans.unchanged(replace(job, kind="zero"), 30) is None
    assert spec.position_label("demonstration_2") == "demonstration 2 positions"
    assert [spec.demonstration_index(p) for p in ("demonstration_12", "label_words", "all")] == [
        12,
        None,
        None,
    ]


def test_a_threshold_or_a_choice_of_demonstrations_needs_development_reviews():
    prompts = {"n_dev": 0, "candidates": 1}
    with pytest.raises(spec.SpecError, match="n_dev = 0"):
        checks.check_calibration({"calibration": "threshold"}, prompts)
    checks.check_calibration({"calibration": "none"}, prompts)
    with pytest.raises(spec.SpecError, match="candidates: 4"):
        checks.check_calibration({"calibration": "none"}, {"n_dev": 0, "candidates": 4})

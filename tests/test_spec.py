import pytest

from headperturb import spec


def test_resolve_layers_negative_and_all():
    assert spec.resolve_layers(-1, 30) == [29]
    assert spec.resolve_layers([0, -1, 29], 30) == [0, 29]
    assert spec.resolve_layers("all", 3) == [0, 1, 2]


@pytest.mark.parametrize("bad", [30, -31, [0, 31]])
def test_resolve_layers_out_of_range_names_the_range(bad):
    with pytest.raises(
        spec.SpecError, match=r"out of range: the model has 30 layers \(allowed -30..29\)"
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
        with pytest.raises(spec.SpecError, match="must be > 0"):
            spec.format_scale(bad)


def test_head_jobs_resolve_against_the_model_and_deduplicate():
    jobs = spec.head_jobs([-1], "all", [2.0, 2], ["o_proj_input"], n_layers=3, n_heads=2)
    assert [(j.kind, j.layer, j.head, j.scale) for j in jobs] == [
        ("noise", 2, 0, "2"),
        ("noise", 2, 1, "2"),
    ]
    assert (
        jobs[0].path("results/r")
        == "results/r/perturb/o_proj_input/noise/layer2/head0_scale2.parquet"
    )
    both = spec.head_jobs([0], [1], [1.0, 3.0], ["o_proj_input"], 1, 2, kinds=["noise", "zero"])
    assert [(j.kind, j.scale) for j in both] == [("noise", "1"), ("noise", "3"), ("zero", "")]
    assert both[2].path("r") == "r/perturb/o_proj_input/zero/layer0/head1.parquet"
    ablations_only = spec.head_jobs([0], [1], [1.0], ["o_proj_input"], 1, 2, kinds=["mean"])
    assert [(j.kind, j.scale) for j in ablations_only] == [("mean", "")]
    with pytest.raises(spec.SpecError, match="kind 'shuffle'"):
        spec.head_jobs([0], [0], [1.0], ["o_proj_input"], 1, 1, kinds=["shuffle"])
    with pytest.raises(spec.SpecError, match="site 'resid'"):
        spec.head_jobs([0], [0], [1.0], ["resid"], n_layers=1, n_heads=1)


def test_noise_seed_depends_on_every_part_and_only_on_them():
    base = spec.noise_seed(0, 1, 2, "2", 0, 5)
    assert base == spec.noise_seed(0, 1, 2, 2.0, 0, 5)  # the scale's text is canonical
    others = {
        spec.noise_seed(1, 1, 2, "2", 0, 5),
        spec.noise_seed(0, 0, 2, "2", 0, 5),
        spec.noise_seed(0, 1, 3, "2", 0, 5),
        spec.noise_seed(0, 1, 2, "3", 0, 5),
        spec.noise_seed(0, 1, 2, "2", 1, 5),
        spec.noise_seed(0, 1, 2, "2", 0, 6),
    }
    assert base not in others and len(others) == 6
    assert 0 <= base < 2**63


def test_data_files(tmp_path, imdb_dir):
    assert spec.data_files(None) == []
    assert spec.data_files(str(imdb_dir)) == [
        str(imdb_dir / "train.parquet"),
        str(imdb_dir / "test.parquet"),
    ]
    assert spec.data_files("x/imdb_{split}.csv") == ["x/imdb_train.csv", "x/imdb_test.csv"]
    assert spec.data_files(str(tmp_path)) == []

import io as _io
import tarfile

import pandas as pd
import pytest

from headperturb.data.imdb import DataError, clean_text, load_split


def test_clean_text_removes_br_tags_and_collapses_space():
    assert clean_text("Great.<br /><br />Really   great<BR/>film ") == "Great. Really great film"


def test_shared_parquet_copy(imdb_dir):
    test = load_split(str(imdb_dir), "test")
    assert set(test.columns) >= {"row", "text", "label"}
    assert set(test["label"]) == {0, 1}
    # the README of the copy: 25,000 rows of which 199 texts occur twice -> dropped
    assert len(test) == 25_000 - 199
    assert not test["text"].duplicated().any()


def _acl_files():
    return {
        "aclImdb/train/pos/0_9.txt": "Loved it.<br />Yes.",
        "aclImdb/train/neg/0_2.txt": "Hated it.",
        "aclImdb/train/neg/1_1.txt": "Awful.",
        "aclImdb/test/pos/0_10.txt": "Superb.",
        "aclImdb/test/neg/0_3.txt": "Dull.",
    }


def test_aclimdb_folder_and_tarball_agree(tmp_path):
    for name, text in _acl_files().items():
        f = tmp_path / "folder" / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    tar_path = tmp_path / "aclImdb_v1.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for name, text in _acl_files().items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, _io.BytesIO(text.encode()))
    for source in (tmp_path / "folder", tmp_path / "folder" / "aclImdb", tar_path):
        train = load_split(str(source), "train").sort_values("text", ignore_index=True)
        assert train["text"].tolist() == ["Awful.", "Hated it.", "Loved it.<br />Yes."]
        assert train["label"].tolist() == [0, 0, 1]
        assert sorted(train["rating"]) == [1, 2, 9]


def test_csv_with_split_placeholder(tmp_path):
    for split in ("train", "test"):
        pd.DataFrame({"text": ["good", "bad"], "label": [1, 0]}).to_csv(
            tmp_path / f"imdb_{split}.csv", index=False
        )
    frame = load_split(str(tmp_path / "imdb_{split}.csv"), "test")
    assert frame[["text", "label"]].values.tolist() == [["good", 1], ["bad", 0]]


def test_empty_and_duplicate_texts_are_dropped(tmp_path, caplog):
    pd.DataFrame({"text": ["a", "a", " ", "b"], "label": [1, 1, 0, 0]}).to_parquet(
        tmp_path / "test.parquet"
    )
    with caplog.at_level("INFO"):
        frame = load_split(str(tmp_path), "test")
    assert frame["text"].tolist() == ["a", "b"]
    assert frame["row"].tolist() == [0, 3]  # positions in the source survive the drops
    assert "dropped 1 empty" in caplog.text and "dropped 1 duplicate" in caplog.text


@pytest.mark.parametrize(
    "frame, message",
    [
        (
            pd.DataFrame({"review": ["a"], "label": [1]}),
            "no column 'text' \\(found 'review', 'label'\\)",
        ),
        (
            pd.DataFrame({"text": ["a"], "stars": [1]}),
            "no column 'label' \\(found 'text', 'stars'\\)",
        ),
        (
            pd.DataFrame({"text": ["a", "b"], "label": [1, 1]}),
            "column 'label' holds 1; labels must be the two classes 0",
        ),
        (
            pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 2]}),
            "column 'label' holds 0, 1, 2;",
        ),
        (
            pd.DataFrame({"text": ["a", "b"], "label": ["neg", "pos"]}),
            "column 'label' holds 'neg', 'pos'; labels must be",
        ),
        (pd.DataFrame({"text": [], "label": []}), "no reviews \\(the columns 'text' and 'label'"),
    ],
)
@pytest.mark.parametrize("form", ["parquet", "csv"])
def test_bad_frames_name_the_file_and_the_column(tmp_path, frame, message, form):
    path = tmp_path / f"train.{form}"
    frame.to_parquet(path) if form == "parquet" else frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=f"^{path}: {message}"):
        load_split(str(tmp_path), "train")


def test_an_unreadable_table_names_itself(tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="train.parquet' cannot be read as parquet"):
        load_split(str(tmp_path), "train")


def test_missing_path_and_wrong_tarball(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_split(str(tmp_path / "nowhere"), "train")
    tar_path = tmp_path / "other.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        info = tarfile.TarInfo("notes/readme.txt")
        tar.addfile(info, _io.BytesIO(b""))
    with pytest.raises(DataError, match="not the aclImdb_v1 tarball"):
        load_split(str(tar_path), "train")
    with pytest.raises(DataError, match="neither train.parquet"):
        load_split(str(tmp_path), "train")


def test_unreachable_hub_names_both_ways(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", "/nonexistent-cache")
    with pytest.raises(DataError) as info:
        load_split(None, "train", hub_dataset="stanfordnlp/imdb-not-cached")
    text = str(info.value)
    assert "Hugging Face hub" in text and "data.path" in text and "aclImdb_v1.tar.gz" in text


def test_missing_texts_are_dropped_and_counted_as_missing(tmp_path, caplog):
    """A NaN in a Parquet file or an empty field in a CSV is a missing review, not a duplicate,
    and nothing but text reaches prompt building, whatever review the seed picks."""
    from headperturb.data.prompts import select_reviews

    texts = [f"review number {i}" for i in range(12)]
    frame = pd.DataFrame({"text": texts + [None, None], "label": [0, 1] * 7})
    frame.to_parquet(tmp_path / "train.parquet")
    (tmp_path / "test.csv").write_text(
        "text,label\n" + "".join(f"test review {i},{i % 2}\n" for i in range(6)) + ",1\n,0\n"
    )
    with caplog.at_level("INFO"):
        train = load_split(str(tmp_path / "train.parquet").replace("train", "{split}"), "train")
        test = load_split(str(tmp_path / "test.csv").replace("test.csv", "{split}.csv"), "test")
    assert "dropped 2 missing text(s)" in caplog.text and "duplicate" not in caplog.text
    assert len(train) == 12 and len(test) == 6
    for seed in range(30):
        reviews = select_reviews(train, test, k_shot=2, n_test=6, seed=seed, candidates=2, n_dev=4)
        assert all(isinstance(t, str) and t for t in reviews["text"])

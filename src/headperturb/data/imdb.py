"""IMDB reviews from the Hugging Face hub or a local copy, as frames with ``text`` and ``label``.

Labels follow the ``stanfordnlp/imdb`` convention: 0 = negative, 1 = positive.

A local source (``data.path`` in the config) may be:

- a folder holding ``train.parquet``/``test.parquet`` or ``train.csv``/``test.csv``
  (columns ``text`` and ``label``; other columns are kept but unused);
- the official ``aclImdb/`` folder (``{train,test}/{pos,neg}/ID_RATING.txt``), or a folder
  holding it;
- the official ``aclImdb_v1.tar.gz`` tarball, read without unpacking;
- a single Parquet or CSV file whose name contains ``{split}``, e.g. ``imdb_{split}.parquet``.
"""

from __future__ import annotations

import logging
import re
import tarfile
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

HUB_DATASET = "stanfordnlp/imdb"
SPLITS = ("train", "test")
_BR = re.compile(r"<br\s*/?>", flags=re.IGNORECASE)
_SPACE = re.compile(r"\s+")


class DataError(ValueError):
    """The data cannot be read or is not a two-class text dataset."""


def clean_text(text: str) -> str:
    """Remove ``<br />`` tags (as they appear in IMDB) and collapse runs of white space."""
    return _SPACE.sub(" ", _BR.sub(" ", text)).strip()


def load_split(path: str | None, split: str, hub_dataset: str = HUB_DATASET) -> pd.DataFrame:
    """Load one split as a frame with at least ``text`` (str) and ``label`` (int 0/1).

    ``path`` None means the Hugging Face hub (``hub_dataset``). Empty and duplicate texts are
    dropped with a count in the log; other defects raise :class:`DataError`.
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not allowed; allowed: {', '.join(SPLITS)}")
    if path is None:
        return validate_frame(_load_hub(hub_dataset, split), f"{hub_dataset} [{split}]")
    frame, where = _load_local(Path(path), split)
    return validate_frame(frame, where)


def _load_hub(name: str, split: str) -> pd.DataFrame:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # any failure to reach or read the hub ends in one clear message
        raise DataError(
            f"could not load the IMDB {split} split from the Hugging Face hub ({name!r}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
            "Give the data one of two ways: (1) make the hub reachable (or set HF_DATASETS_CACHE "
            "to a cache that holds it), or (2) set `data.path` in the config to a local copy: a "
            "folder with train/test Parquet or CSV files (columns text,label), the official "
            "aclImdb/ folder, or the aclImdb_v1.tar.gz tarball."
        ) from None
    return ds.to_pandas()


def _load_local(path: Path, split: str) -> tuple[pd.DataFrame, str]:
    """One split of a local source, and the name of what was read (for messages)."""
    if "{split}" in str(path):
        file = Path(str(path).format(split=split))
        return _read_table(file), str(file)
    if not path.exists():
        raise DataError(
            f"data.path {str(path)!r} does not exist; give a folder with {split}.parquet or "
            f"{split}.csv, the aclImdb/ folder, or the aclImdb_v1.tar.gz tarball"
        )
    if path.is_file():
        if path.name.endswith((".tar.gz", ".tgz", ".tar")):
            return _read_tarball(path, split), f"{path} [{split}]"
        raise DataError(
            f"data.path {str(path)!r} is a single file; name one file per split with a '{{split}}' "
            "placeholder (e.g. imdb_{split}.parquet), or give the aclImdb_v1.tar.gz tarball"
        )
    for ext in ("parquet", "csv"):
        candidate = path / f"{split}.{ext}"
        if candidate.is_file():
            return _read_table(candidate), str(candidate)
    for root in (path, path / "aclImdb"):
        if (root / split / "pos").is_dir() and (root / split / "neg").is_dir():
            return _read_acl_folder(root, split), str(root / split)
    raise DataError(
        f"data.path {str(path)!r} holds neither {split}.parquet, {split}.csv nor an aclImdb/ "
        f"layout ({split}/pos, {split}/neg)"
    )


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix == ".csv":
            return pd.read_csv(path)
    except Exception as exc:  # pyarrow and pandas raise many types for a file they cannot read
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"data file {str(path)!r} cannot be read as {path.suffix[1:]}: {first}"
        ) from None
    raise DataError(f"data file {str(path)!r}: only .parquet and .csv are allowed")


_ACL_NAME = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")


def _read_acl_folder(root: Path, split: str) -> pd.DataFrame:
    rows = []
    for label, sub in ((1, "pos"), (0, "neg")):
        for f in sorted((root / split / sub).glob("*.txt")):
            review_id, rating = f.stem.split("_")
            rows.append((int(review_id), int(rating), label, f.read_text(encoding="utf-8")))
    return pd.DataFrame(rows, columns=["review_id", "rating", "label", "text"])


def _read_tarball(path: Path, split: str) -> pd.DataFrame:
    rows = []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                match = _ACL_NAME.search(member.name)
                if not member.isfile() or not match or match.group(1) != split:
                    continue
                text = tar.extractfile(member).read().decode("utf-8")
                label = 1 if match.group(2) == "pos" else 0
                rows.append((int(match.group(3)), int(match.group(4)), label, text))
    except tarfile.TarError as exc:
        raise DataError(f"{str(path)!r} is not a readable tar archive: {exc}") from None
    if not rows:
        raise DataError(
            f"{str(path)!r} holds no aclImdb/{split}/{{pos,neg}}/*.txt files: it is not the "
            "aclImdb_v1 tarball"
        )
    frame = pd.DataFrame(rows, columns=["review_id", "rating", "label", "text"])
    return frame.sort_values(["label", "review_id"], ascending=[False, True], ignore_index=True)


def validate_frame(frame: pd.DataFrame, where: str) -> pd.DataFrame:
    """Check columns and labels; drop missing, empty and duplicate texts (each counted in
    the log)."""
    missing = [c for c in ("text", "label") if c not in frame.columns]
    if missing:
        raise DataError(
            f"{where}: no column {' and no column '.join(repr(c) for c in missing)} (found "
            f"{', '.join(repr(str(c)) for c in frame.columns) or 'none'}); the data needs a column "
            "'text' (the review) and a column 'label' (0 = negative, 1 = positive)"
        )
    if frame.empty:
        raise DataError(
            f"{where}: no reviews (the columns 'text' and 'label' are there, no rows); give a "
            "split with reviews of both labels"
        )
    labels = {x.item() if hasattr(x, "item") else x for x in pd.unique(frame["label"])}
    if not labels <= {0, 1} or len(labels) != 2:
        shown = sorted(labels, key=str)
        raise DataError(
            f"{where}: column 'label' holds {', '.join(map(repr, shown[:10]))}"
            f"{' and more' if len(shown) > 10 else ''}; labels must be the two classes 0 "
            "(negative) and 1 (positive)"
        )
    frame = frame.copy()
    if "row" not in frame.columns:  # the position in the source, kept through the drops below
        frame.insert(0, "row", range(len(frame)))
    frame["label"] = frame["label"].astype("int64")
    missing = frame["text"].isna()
    if missing.any():
        log.warning("%s: dropped %d missing text(s)", where, int(missing.sum()))
        frame = frame[~missing]
    # every text reaching prompt building is a str (a CSV column of digits would be numbers)
    frame["text"] = [t if isinstance(t, str) else str(t) for t in frame["text"]]
    empty = frame["text"].str.strip() == ""
    if empty.any():
        log.warning("%s: dropped %d empty text(s)", where, int(empty.sum()))
        frame = frame[~empty]
    dup = frame["text"].duplicated(keep="first")
    if dup.any():
        log.info("%s: dropped %d duplicate text(s)", where, int(dup.sum()))
        frame = frame[~dup]
    return frame.reset_index(drop=True)

"""Bad model files, out-of-memory, interrupted writes: one clear message, no partial output."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from headperturb import io, models, steps, tensors


def test_gguf_with_wrong_sha256_stops_before_loading(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a model")
    out = tmp_path / "prepared"
    with pytest.raises(
        models.ModelError, match=r"sha256 of .*model.gguf.* but the config expects 0{64}"
    ):
        models.prepare_model(str(fake), out, sha256="0" * 64)
    assert not out.exists()


def test_missing_model_names_what_is_allowed(tmp_path):
    with pytest.raises(models.ModelError, match="GGUF file .* does not exist"):
        models.load_source(str(tmp_path / "absent.gguf"))


def test_out_of_gpu_memory_says_which_setting_lowers_memory():
    def allocate():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(models.ModelError, match="out of GPU memory: .*model.dtype: bfloat16"):
        steps.gpu_memory_hint(allocate)


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    def broken(table, where, **kwargs):
        with open(where, "wb") as handle:
            handle.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        io.write_parquet(tmp_path / "out.parquet", pd.DataFrame({"a": [1]}))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_folder_write_keeps_the_old_folder_and_leaves_no_temporary(tmp_path):
    folder = tmp_path / "prepared"
    with io.atomic_dir(folder) as tmp:
        (tmp / "a.json").write_text("1")
    with pytest.raises(OSError, match="disk full"):
        with io.atomic_dir(folder) as tmp:
            (tmp / "a.json").write_text("half")
            raise OSError("disk full")
    assert list(tmp_path.iterdir()) == [folder]
    assert (folder / "a.json").read_text() == "1"


def test_provenance_has_settings_hash_and_no_timestamps():
    meta = tensors.provenance({"source": "m", "weights_sha256": "ab"}, "cpu", {"layer": 3})
    again = tensors.provenance({"source": "m", "weights_sha256": "ab"}, "cpu", {"layer": 3})
    other = tensors.provenance({"source": "m", "weights_sha256": "ab"}, "cpu", {"layer": 4})
    assert meta == again and meta["config_sha256"] != other["config_sha256"]
    assert {"torch_version", "transformers_version", "headperturb_version", "device"} <= set(meta)
    assert not any(k in str(meta).lower() for k in ("time", "host", "date"))

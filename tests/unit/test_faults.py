"""Bad model files, out-of-memory, interrupted writes: one clear message, no partial output."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from headperturb.core import files
from headperturb.model import loading, recordings
from headperturb.model.context import gpu_memory_hint


def test_gguf_with_wrong_sha256_stops_before_loading(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a model")
    out = tmp_path / "prepared"
    with pytest.raises(
        loading.ModelError, match=r"sha256 of .*model.gguf.* but the config expects 0{64}"
    ):
        loading.prepare_model(str(fake), out, sha256="0" * 64)
    assert not out.exists()


def test_missing_model_names_what_is_allowed(tmp_path):
    with pytest.raises(loading.ModelError, match="GGUF file .* does not exist"):
        loading.load_source(str(tmp_path / "absent.gguf"))


def test_out_of_gpu_memory_says_which_setting_lowers_memory():
    def allocate():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(loading.ModelError, match="out of GPU memory: .*model.dtype: bfloat16"):
        gpu_memory_hint(allocate)


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    def broken(table, where, **kwargs):
        with open(where, "wb") as handle:
            handle.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        files.write_parquet(tmp_path / "out.parquet", pd.DataFrame({"a": [1]}))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_folder_write_keeps_the_old_folder_and_leaves_no_temporary(tmp_path):
    folder = tmp_path / "prepared"
    with files.atomic_dir(folder) as tmp:
        (tmp / "a.json").write_text("1")
    with pytest.raises(OSError, match="disk full"):
        with files.atomic_dir(folder) as tmp:
            (tmp / "a.json").write_text("half")
            raise OSError("disk full")
    assert list(tmp_path.iterdir()) == [folder]
    assert (folder / "a.json").read_text() == "1"


def test_provenance_has_settings_hash_and_no_timestamps():
    meta = recordings.provenance({"source": "m", "weights_sha256": "ab"}, "cpu", {"layer": 3})
    again = recordings.provenance({"source": "m", "weights_sha256": "ab"}, "cpu", {"layer": 3})
    other = recordings.provenance({"source": "m", "weights_sha256": "ab"}, "cpu", {"layer": 4})
    assert meta == again and meta["config_sha256"] != other["config_sha256"]
    assert {"torch_version", "transformers_version", "headperturb_version", "device"} <= set(meta)
    assert not any(k in str(meta).lower() for k in ("time", "host", "date"))


def test_a_failed_process_step_writes_its_traceback_to_its_log_and_one_line_to_stderr(
    tmp_path, capsys
):
    """The steps that are processes of their own (script: rules) end through runtime.script_main."""
    from headperturb import runtime

    def fail():
        raise ValueError("first line\nsecond line")

    with pytest.raises(SystemExit) as stop:
        runtime.script_main(str(tmp_path / "step.log"), fail)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "headperturb error: ValueError: first line" in err and "Traceback" not in err
    log = (tmp_path / "step.log").read_text()
    assert "Traceback (most recent call last)" in log and "second line" in log


@pytest.fixture
def interrupt_handler():
    """runtime.stop_threads_on_interrupt() for one test: the SIGINT handler and the flag restored."""
    import signal

    from headperturb import runtime

    before = signal.getsignal(signal.SIGINT)
    yield runtime
    signal.signal(signal.SIGINT, before)
    runtime.INTERRUPTED.clear()


def test_ctrl_c_stops_a_job_running_in_a_thread(interrupt_handler):
    """KeyboardInterrupt reaches the main thread only: a job in another thread stops at its next
    progress update instead of running to its end."""
    import signal
    import threading
    import time

    runtime = interrupt_handler
    runtime.stop_threads_on_interrupt()
    runtime.stop_threads_on_interrupt()  # a second call keeps one handler
    started, outcome = threading.Event(), {}

    def job():
        progress = runtime.Progress(10_000, "baseline prompts")
        try:
            for _ in range(10_000):
                started.set()
                time.sleep(0.001)
                progress.update()
        except runtime.Interrupted as exc:
            outcome["error"], outcome["done"] = exc, progress.done

    thread = threading.Thread(target=job)
    thread.start()
    started.wait(5)
    with pytest.raises(KeyboardInterrupt):  # the previous handler still runs in the main thread
        signal.raise_signal(signal.SIGINT)
    thread.join(10)
    assert not thread.is_alive()
    assert "baseline prompts: interrupted at" in str(outcome["error"])
    assert outcome["done"] < 10_000


def test_end_of_run_cancels_only_the_scheduler_timers():
    """Snakemake's scheduler leaves a one-second threading.Timer per scheduling round that the
    interpreter waits for at exit; end_of_run cancels those and no other timer."""
    import gc
    import threading

    from headperturb import runtime

    def release():
        pass

    release.__module__ = "snakemake.scheduling.job_scheduler"
    theirs, other = threading.Timer(30, release), threading.Timer(30, lambda: None)
    theirs.start()
    other.start()
    try:
        assert runtime.end_of_run() == 1
        theirs.join(5)
        assert not theirs.is_alive() and other.is_alive()
    finally:
        other.cancel()
        gc.unfreeze()


def test_no_job_starts_in_a_thread_after_ctrl_c(interrupt_handler, tmp_path):
    """Snakemake still starts the jobs it had queued when Ctrl-C came; in a thread they stop at
    once, with the reason in their log."""
    from headperturb import runtime
    from headperturb.workflow import steps

    runtime.INTERRUPTED.set()
    log = tmp_path / "aggregate.log"
    with pytest.raises(runtime.JobError, match=r"interrupted \(Ctrl-C\) before this job started"):
        steps.aggregate(None, None, None, {}, 1, [str(log)])
    assert "before this job started" in log.read_text()

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
    """The steps that are processes of their own (script: rules) end through
    lifecycle.script_main."""
    from headperturb.workflow import lifecycle

    def fail():
        raise ValueError("first line\nsecond line")

    with pytest.raises(SystemExit) as stop:
        lifecycle.script_main(str(tmp_path / "step.log"), fail)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "headperturb error: ValueError: first line" in err and "Traceback" not in err
    log = (tmp_path / "step.log").read_text()
    assert "Traceback (most recent call last)" in log and "second line" in log


@pytest.fixture
def interrupt_handler():
    """lifecycle.stop_threads_on_interrupt() for one test: the SIGINT handler and the flag
    restored."""
    import signal

    from headperturb import joblog
    from headperturb.workflow import lifecycle

    before = signal.getsignal(signal.SIGINT)
    # as in a terminal: a shell that starts pytest in the background ignores SIGINT, and then
    # there is nothing to chain to (stop_threads_on_interrupt leaves an ignored SIGINT alone)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield lifecycle
    signal.signal(signal.SIGINT, before)
    joblog.INTERRUPTED.clear()


def test_ctrl_c_stops_a_job_running_in_a_thread(interrupt_handler):
    """KeyboardInterrupt reaches the main thread only: a job in another thread stops at its next
    progress update instead of running to its end."""
    import signal
    import threading
    import time

    lifecycle = interrupt_handler
    from headperturb import joblog

    lifecycle.stop_threads_on_interrupt()
    lifecycle.stop_threads_on_interrupt()  # a second call keeps one handler
    started, outcome = threading.Event(), {}

    def job():
        progress = joblog.Progress(10_000, "baseline prompts")
        try:
            for _ in range(10_000):
                started.set()
                time.sleep(0.001)
                progress.update()
        except joblog.Interrupted as exc:
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

    from headperturb.workflow import lifecycle

    def release():
        pass

    release.__module__ = "snakemake.scheduling.job_scheduler"
    theirs, other = threading.Timer(30, release), threading.Timer(30, lambda: None)
    theirs.start()
    other.start()
    try:
        assert lifecycle.end_of_run() == 1
        theirs.join(5)
        assert not theirs.is_alive() and other.is_alive()
    finally:
        other.cancel()
        gc.unfreeze()


def test_the_scheduler_keeps_one_reevaluation_timer():
    """A stand-in for Snakemake's scheduler, patched: however often a round asks for a
    re-evaluation, one timer is pending, it wakes the scheduler once, and the next round may
    start the next; end_of_run cancels it."""
    import gc
    import threading
    import time

    from headperturb.workflow import lifecycle

    class Scheduler:
        def __init__(self):
            self._open_jobs = threading.Semaphore(0)

        def _schedule_reevalutation(self, delay):  # Snakemake's: a new timer every round
            threading.Timer(delay, lambda: self._open_jobs.release()).start()

    assert lifecycle.one_reevaluation_timer(Scheduler)
    scheduler = Scheduler()
    for _ in range(50):
        scheduler._schedule_reevalutation(0.3)
    pending = [t for t in threading.enumerate() if t.name == lifecycle.REEVALUATION]
    assert len(pending) == 1
    assert scheduler._open_jobs.acquire(timeout=5)
    time.sleep(0.1)
    assert not scheduler._open_jobs.acquire(blocking=False)  # woken once, not fifty times
    scheduler._schedule_reevalutation(30)
    try:
        assert lifecycle.end_of_run() >= 1
        scheduler._reevaluation.join(5)
        assert not scheduler._reevaluation.is_alive()
    finally:
        gc.unfreeze()
    assert not lifecycle.one_reevaluation_timer(
        type("Other", (), {})
    )  # internals differ: untouched


def test_no_job_starts_in_a_thread_after_ctrl_c(interrupt_handler, tmp_path):
    """Snakemake still starts the jobs it had queued when Ctrl-C came; in a thread they stop at
    once, with the reason in their log."""
    from headperturb import joblog
    from headperturb.workflow import steps

    joblog.INTERRUPTED.set()
    log = tmp_path / "aggregate.log"
    with pytest.raises(joblog.JobError, match=r"interrupted \(Ctrl-C\) before this job started"):
        steps.aggregate(
            input=None, output=None, params=None, wildcards={}, threads=1, log=[str(log)]
        )
    assert "before this job started" in log.read_text()


def test_a_changed_dtype_in_a_recordings_header_is_caught(tmp_path):
    """safetensors keeps each tensor's dtype and shape in its header: the checksum covers them,
    so F32 read as I32 (the same bytes) is refused, not turned into other numbers."""
    path = tmp_path / "state.safetensors"
    recordings.save(path, {"z": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, {"step": "x"})
    data = path.read_bytes()
    assert b'"F32"' in data
    path.write_bytes(data.replace(b'"F32"', b'"I32"', 1))
    with pytest.raises(files.UnreadableError, match="tensor 'z' does not match its checksum"):
        recordings.load(path)


def test_a_changed_value_in_the_programs_description_is_caught(tmp_path):
    from headperturb.model import tail

    meta = {"layer": 1, "n_heads": 4, "head_dim": 8, "d_out": 32, "device": "cpu"}
    tail.save(tmp_path / "program", None, meta)
    path = tmp_path / "program/program.json"
    path.write_text(path.read_text().replace('"head_dim": 8', '"head_dim": 6'))
    with pytest.raises(
        files.UnreadableError, match="program.json cannot be read .its values do not"
    ):
        tail.load(tmp_path / "program", "cpu")


def test_a_parquet_file_with_a_column_less_than_written_is_caught(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    files.write_parquet(path, {"a": [1, 2], "b": [3.0, 4.0]}, {"step": "x"})
    meta = pq.read_schema(path).metadata
    pq.write_table(pa.table({"a": [1, 2]}).replace_schema_metadata(meta), path)
    with pytest.raises(files.UnreadableError, match="its schema does not match its checksum"):
        files.read_parquet(path)
    assert files.read_parquet(path, ["a"])["a"].tolist() == [1, 2]  # what is there is intact
    assert json.loads(meta[b"headperturb"])["step"] == "x"


def test_the_owner_is_its_pid_and_its_start_time():
    """A process that got the owner's pid after the owner died is not taken for it."""
    import os

    from headperturb.workflow import lifecycle

    started = lifecycle._started(os.getpid())
    assert lifecycle.alive(os.getpid(), started)
    if started is not None:  # Linux
        assert not lifecycle.alive(os.getpid(), str(int(started) + 1))

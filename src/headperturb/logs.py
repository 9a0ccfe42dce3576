"""Logging for the workflow's jobs: one log file per job, and progress lines for long loops."""

from __future__ import annotations

import logging
import sys
import time


def setup(log_file: str | None = None, level: int = logging.INFO) -> logging.Logger:
    """Send the package's log records to ``log_file`` (the rule's ``log:``) and to stderr."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger("headperturb")


class Progress:
    """Logs ``done/total``, rate and time left about every ``every`` seconds and at the end."""

    def __init__(
        self, total: int, what: str, logger: logging.Logger | None = None, every: float = 10.0
    ):
        self.total, self.what, self.every = total, what, every
        self.log = logger or logging.getLogger("headperturb")
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            elapsed = now - self.start
            rate = self.done / elapsed if elapsed > 0 else float("inf")
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            self.log.info(
                "%s: %d/%d (%.0f%%), %.2f/s, %.0f s elapsed, ~%.0f s left",
                self.what, self.done, self.total, 100 * self.done / max(self.total, 1),
                rate, elapsed, left,
            )  # fmt: skip

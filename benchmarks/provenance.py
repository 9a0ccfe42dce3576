"""What a benchmark's figures were measured on: the commit, for the line heading its results."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def current_commit() -> str:
    """The commit checked out, with a note when the working tree's tracked files differ from it
    (``unknown`` outside a git checkout)."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no")
    return f"{head} with uncommitted changes" if changed else head


def setting_line(commit: str, setting: str, what: str = "setting") -> str:
    """``Commit `abc1234`; setting `benchmarks/configs/x.yaml`.``"""
    return f"Commit `{commit}`; {what} `benchmarks/configs/{setting}.yaml`."

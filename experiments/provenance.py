"""Where a page of measurements came from: the command, the time, the commit and the machine,
written by the command that measured (``make bench``, ``make conformance``), so that the docs
quote its output rather than a hand-kept record."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

from gradtools.loggers.local import library_versions

ROOT = Path(__file__).resolve().parent.parent


def _git(*arguments: str) -> str:
    try:
        return subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance(command: str) -> str:
    """One sentence: ``command``, when, at which commit (and whether the tree had changes), on
    what machine and versions (those a run directory records: :func:`library_versions`)."""
    commit = _git("rev-parse", "--short", "HEAD") or "an unknown commit"
    changed = " with uncommitted changes" if _git("status", "--porcelain", "--untracked-files=no") else ""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    versions = ", ".join(f"{name} {version}" for name, version in library_versions().items())
    machine = f"{os.cpu_count()} cores, {platform.machine()}"
    return f"Written by `{command}`, {when}, at {commit}{changed}; {machine}, {versions}."

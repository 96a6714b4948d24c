"""Small real file systems for tests about full and read-only disks: a tmpfs mounted under the test's
temporary directory (needs root). Outside CI a machine that cannot mount one skips the test loudly; under
``CI=true`` it fails (``helpers_real``)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers_real import missing_component


def _run(*argv: str) -> str:
    """Run a mount command; the problem text, or '' when it worked."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return done.stderr.strip() or f"exit status {done.returncode}" if done.returncode else ""


@contextmanager
def tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (created) for the block, unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    problem = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", os.fspath(path))
    if problem:
        missing_component("TMPFS TEST", f"cannot mount a {size} tmpfs for this test (needs root): {problem}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", os.fspath(path)], check=False, timeout=30)


def remount(path: Path, mode: str) -> None:
    """Remount the tmpfs at ``path`` ``"ro"`` or ``"rw"``."""
    problem = _run("mount", "-o", f"remount,{mode}", os.fspath(path))
    if problem:
        raise AssertionError(f"cannot remount {path} {mode}: {problem}")


def fill(path: Path, leave: int) -> Path:
    """Fill the file system holding ``path`` with a file until about ``leave`` bytes are free; the file."""
    filler = path / "filler"
    stat = os.statvfs(path)
    size = max(0, stat.f_bavail * stat.f_frsize - leave)
    with open(filler, "wb") as handle:
        handle.write(b"\0" * size)
    return filler

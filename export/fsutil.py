"""Atomic output directories and single-writer locks.

Every verb that writes a directory builds it in a hidden temporary directory beside the
target and renames it into place at the end, so an interrupted run (Ctrl-C, SIGKILL,
an exception) never leaves a half-written RUN_DIR or BUNDLE, and an existing one stays
intact until the new one is complete.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UsageError

TMP_PREFIX = ".probattn-tmp-"


@contextlib.contextmanager
def atomic_directory(target, overwrite: bool = False):
    """Yield a temporary directory; on success it replaces ``target`` in one rename."""
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise UsageError(f"output path exists and is not a directory: {target}")
    if target.exists() and not overwrite and any(target.iterdir()):
        raise UsageError(f"output directory already exists and is not empty: {target} "
                         "(pass --overwrite to replace it)")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(target):
        _remove_stale(parent, target.name)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=parent))
        try:
            yield tmp
            backup = None
            if target.exists():
                backup = parent / f"{TMP_PREFIX}{target.name}-old-{os.getpid()}"
                os.rename(target, backup)
            os.rename(tmp, target)
            if backup is not None:
                shutil.rmtree(backup, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _remove_stale(parent: Path, name: str) -> None:
    """Temporary directories left by a killed run (we hold the lock, so none is live)."""
    for p in parent.glob(f"{TMP_PREFIX}{name}-*"):
        if p.is_dir() and not p.name.endswith(".lock"):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def directory_lock(target: Path):
    """An exclusive, non-blocking lock per output path; a second writer fails clearly."""
    lock_path = target.parent / f"{TMP_PREFIX}{target.name}.lock"
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another probattn process is writing {target}; "
                             "wait for it to finish or choose another --out") from None
        yield
    finally:
        os.close(fd)  # the lock file stays: unlinking it would let two writers lock two inodes

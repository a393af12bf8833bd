"""Atomic output directories and single-writer locks.

Every verb that writes a directory builds it in a hidden temporary directory beside the
target and renames it into place at the end, so an interrupted run (Ctrl-C, SIGKILL,
an exception) never leaves a half-written RUN_DIR or BUNDLE, and an existing one stays
intact until the new one is complete.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import UsageError

TMP_PREFIX = ".probattn-tmp-"


def sha256_path(path) -> str:
    """SHA-256 of a file, or of a directory's files (relative names and contents, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(str(p.relative_to(path)).encode() + b"\0")
            h.update(sha256_path(p).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_directory(target, overwrite: bool = False, marker: str | None = None):
    """Yield a temporary directory; on success it replaces ``target`` in one rename.
    ``marker``: a file that marks ``target`` as ours (``manifest.json`` for a bundle,
    ``metrics.json`` for a run); ``overwrite`` replaces only such a directory."""
    target = check_output_dir(target, overwrite, marker)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(target):
        _remove_stale(parent, target.name)
        check_output_dir(target, overwrite, marker)  # again, under the lock: a writer may just have finished
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result is an ordinary directory
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


def check_output_dir(target, overwrite: bool = False, marker: str | None = None) -> Path:
    """Refuse an output path that is a file, a non-empty directory without ``overwrite``,
    or (with ``overwrite``) a non-empty directory that lacks ``marker``: --overwrite
    replaces an earlier bundle or run, never an arbitrary folder. Verbs call this before
    their slow work too, so a bad ``--out`` fails in seconds."""
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise UsageError(f"output path exists and is not a directory: {target}")
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise UsageError(f"output directory already exists and is not empty: {target} "
                             "(pass --overwrite to replace it)")
        if marker and not (target / marker).is_file():
            raise UsageError(f"--overwrite replaces only an earlier probattn output; {target} is not "
                             f"one (no {marker}). Choose another --out")
    return target


#: what follows ``TMP_PREFIX + name + "-"`` in our own temporary names: mkdtemp's 8
#: random characters, or the ``old-PID`` backup. ``NAME-2``'s directories do not match.
_OWN_TMP = re.compile(r"[a-z0-9_]{8}|old-[0-9]+")


def _remove_stale(parent: Path, name: str) -> None:
    """Temporary directories left by a killed run (we hold the lock, so none is live).
    A run killed between its two final renames leaves the previous result only as its
    ``old-PID`` backup: that one is put back in place, not deleted."""
    prefix = f"{TMP_PREFIX}{name}-"
    target = parent / name
    for p in sorted(parent.glob(glob.escape(prefix) + "*")):
        if not p.is_dir() or not _OWN_TMP.fullmatch(p.name[len(prefix):]):
            continue  # the lock file, or another target's directory (NAME-2 while we write NAME)
        if p.name[len(prefix):].startswith("old-") and not target.exists():
            os.rename(p, target)
        else:
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def directory_lock(target: Path, shared: bool = False):
    """A non-blocking lock per output path, in a file beside it. Writers (train, export)
    take it exclusively; ``verify`` takes it shared, so verifies run side by side but an
    export cannot replace a bundle while it is being verified."""
    lock_path = target.parent / f"{TMP_PREFIX}{target.name}.lock"
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            if shared:
                raise UsageError(f"an export is writing {target}; verify it when the export has finished") from None
            raise UsageError(f"another probattn process is writing or verifying {target}; "
                             "wait for it to finish or choose another --out") from None
        yield
    finally:
        os.close(fd)  # the lock file stays: unlinking it would let two writers lock two inodes

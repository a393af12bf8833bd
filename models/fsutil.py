"""Files and directories, read and written without following links out of where they belong.

Writing (``train``, ``export``): every verb that writes a directory builds it in a hidden
temporary directory beside the target and swaps it into place at the end, so an
interrupted run (Ctrl-C, SIGTERM, SIGKILL, a full disk) never leaves a half-written RUN_DIR
or BUNDLE, and an existing one stays intact until the new one is complete. The new
directory carries ``OUTPUT_MARKER`` (what made it, and when); ``--overwrite`` replaces only
a directory holding that marker, of the same kind, and never deletes anything else.

Reading (``predict``, ``verify``, ``bench``): ``LockedDirectory`` opens a bundle once, holds
a shared ``flock`` on that directory descriptor and opens every file relative to it,
refusing symbolic links, ``..``, absolute paths and special files (FIFOs, devices,
sockets). A writer swapping in a new bundle takes the exclusive lock on the old one first,
so a reader never mixes two bundles, and a reader needs no write permission anywhere.

Reports (``verify``, ``bench``): ``open_output_dir`` opens (or creates) a directory with no
link on its last component and ``write_file_at`` writes through that descriptor with
``O_CREAT | O_EXCL | O_NOFOLLOW`` and a rename, so a symbolic link planted where a report
goes is never followed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import time
from pathlib import Path

from .errors import UsageError

TMP_PREFIX = ".probattn-tmp-"
#: written at the top of every directory ``train`` and ``export`` create
OUTPUT_MARKER = ".probattn-output.json"
#: output kinds: what ``--overwrite`` may replace with what (``serving``: ``probattn package``)
KINDS = ("run", "bundle", "serving")
#: a marker is a few hundred bytes; anything bigger is not ours
_MARKER_MAX_BYTES = 4096

#: How long a reader waits for a writer that is swapping a bundle (the swap itself is one
#: rename; the writer then deletes the old tree, which takes well under a second for a bundle).
READER_WAIT_SECONDS = 30.0
#: How long a writer waits, at the end, for readers of the old bundle to finish loading
#: (``predict`` holds the lock only while it reads the files: milliseconds).
SWAP_WAIT_SECONDS = 60.0
#: At the start a writer gives readers this long before it refuses: ``predict`` releases the
#: lock within a second, ``verify`` and ``bench`` hold it for their whole run.
START_WAIT_SECONDS = 2.0

#: Temporary directories being built by this process. The termination watchdog removes them
#: when a signal arrives while the main thread is stuck in native code.
LIVE_TEMP_DIRS: set = set()

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def kind_of(mode: int) -> str:
    """``file``, ``directory``, ``symbolic link``, ``FIFO``, ... from ``st_mode``."""
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


# ------------------------------------------------------------------ reading single files

def open_regular(path, max_bytes: int | None = None, *, dir_fd: int | None = None, what: str = "file") -> int:
    """A descriptor of a regular file, never following a link on the last component and never
    blocking on a FIFO (``O_NONBLOCK``, then ``fstat``: S_ISREG). ``max_bytes``: refuse bigger."""
    shown = os.fspath(path)
    try:
        fd = os.open(path, _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {shown}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"{what} {shown} is a symbolic link; a regular file is required") from None
        if e.errno in (errno.ENXIO, errno.ENOTDIR):
            raise UsageError(f"{what} {shown} is not a regular file") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UsageError(f"{what} {shown} is a {kind_of(st.st_mode)}; a regular file is required")
    if max_bytes is not None and st.st_size > max_bytes:
        os.close(fd)
        raise UsageError(f"{what} {shown} is {st.st_size:,} bytes; at most {max_bytes:,} allowed")
    return fd


def read_fd(fd: int, max_bytes: int | None, what: str) -> bytes:
    """Everything from ``fd`` (closed afterwards), never more than ``max_bytes``."""
    chunks, total = [], 0
    try:
        while True:
            chunk = os.read(fd, 1 << 22)
            if not chunk:
                break
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:
                raise UsageError(f"{what} grew past {max_bytes:,} bytes while being read")
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_regular(path, max_bytes: int | None = None, *, dir_fd: int | None = None, what: str = "file") -> bytes:
    return read_fd(open_regular(path, max_bytes, dir_fd=dir_fd, what=what), max_bytes, f"{what} {os.fspath(path)}")


def sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    try:
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def tree_digest(files: dict) -> str:
    """The hash of a directory from its files' hashes (relative name and hash, in path order)."""
    h = hashlib.sha256()
    for rel in sorted(files, key=lambda r: tuple(r.split("/"))):
        h.update(rel.encode() + b"\0")
        h.update(files[rel].encode())
    return h.hexdigest()


def hash_tree(path, *, dir_fd: int | None = None, what: str = "directory", skip=()) -> dict:
    """``{relative path: sha256}`` of every file under a directory. Never follows a link;
    refuses links, FIFOs, sockets and devices anywhere in it. ``skip``: top-level names left out."""
    root = os.open(path, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
    out = {}
    try:
        _walk(root, "", out, what, os.fspath(path), set(skip))
    finally:
        os.close(root)
    return dict(sorted(out.items()))


def _walk(dfd, prefix, out, what, shown, skip, depth=0):
    if depth > 16:
        raise UsageError(f"{what} {shown} nests deeper than 16 directories")
    for name in sorted(os.listdir(dfd)):
        if not prefix and name in skip:
            continue
        rel = prefix + name
        st = os.lstat(name, dir_fd=dfd)
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dfd)
            try:
                _walk(sub, rel + "/", out, what, shown, skip, depth + 1)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            out[rel] = sha256_fd(open_regular(name, dir_fd=dfd, what=f"{what} entry {rel}"))
        else:
            raise UsageError(f"{what} {shown}: {rel} is a {kind_of(st.st_mode)}; only regular files and "
                             "directories are allowed")


def sha256_path(path) -> str:
    """SHA-256 of a file, or of a directory (``tree_digest`` of its files). Links and special
    files are refused, never followed."""
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        return tree_digest(hash_tree(path))
    return sha256_fd(open_regular(path))


# ------------------------------------------------------------------ relative paths inside a directory

def safe_relpath(rel, what: str = "path") -> str:
    """``rel`` if it is a relative path of plain names ('/' separated): no absolute path, no
    ``..`` or ``.``, no empty component, no backslash, no NUL. Otherwise a UsageError."""
    if not isinstance(rel, str) or not rel:
        raise UsageError(f"{what} {rel!r} is not a file name inside the bundle; refusing it")
    if "\0" in rel:
        raise UsageError(f"{what} {rel!r} contains a NUL byte; refusing it")
    if rel.startswith("/") or "\\" in rel or (len(rel) > 1 and rel[1] == ":"):
        raise UsageError(f"{what} '{rel}' points outside the bundle (an absolute path); refusing it")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UsageError(f"{what} '{rel}' points outside the bundle ('..', '.' or an empty name); refusing it")
    if len(rel) > 1024 or len(parts) > 16:
        raise UsageError(f"{what} '{rel[:60]}...' is longer than 1024 characters or 16 levels; refusing it")
    return rel


def _open_parent_at(root_fd: int, rel: str, what: str):
    """(descriptor of rel's parent directory, last name), walking every component with
    O_NOFOLLOW: a link anywhere on the way is refused."""
    parts = safe_relpath(rel, what).split("/")
    dfd = os.dup(root_fd)
    try:
        for i, p in enumerate(parts[:-1]):
            try:
                nxt = os.open(p, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dfd)
            except FileNotFoundError:
                raise UsageError(f"{what} missing from bundle: {rel}") from None
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UsageError(f"{what} '{rel}': '{'/'.join(parts[:i + 1])}' is a symbolic link or not a "
                                     "directory; refusing it") from None
                raise
            os.close(dfd)
            dfd = nxt
    except BaseException:
        os.close(dfd)
        raise
    return dfd, parts[-1]


# ------------------------------------------------------------------ locks

def _flock(fd: int, op: int, wait: float) -> bool:
    """Take a flock, retrying for up to ``wait`` seconds; False if it stayed taken."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def _lock_path(target: Path) -> Path:
    return target.parent / f"{TMP_PREFIX}{target.name}.lock"


def _busy(target) -> str:
    return (f"another probattn process is writing or verifying {target}; wait for it to finish or "
            "choose another --out")


@contextlib.contextmanager
def directory_lock(target: Path, shared: bool = False):
    """The writers' lock: one file beside the output path, so that two ``train`` / ``export``
    runs never write one output at once. (Readers lock the directory itself: see
    ``LockedDirectory``.)"""
    target = Path(target)
    fd = os.open(_lock_path(target), os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            if shared:
                raise UsageError(f"an export is writing {target}; verify it when the export has finished") from None
            raise UsageError(_busy(target)) from None
        yield
    finally:
        os.close(fd)  # the lock file stays: unlinking it would let two writers lock two inodes


def writer_active(target: Path) -> bool:
    """True while a ``train`` / ``export`` holds the writers' lock of ``target``. Opens the
    lock file read-only and never creates it (works on a read-only file system)."""
    try:
        fd = os.open(_lock_path(Path(target)), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
    finally:
        os.close(fd)


class LockedDirectory:
    """A directory opened once and read under a shared lock.

    >>> with LockedDirectory(bundle) as d:
    ...     data = d.read("manifest.json", 1 << 20)

    Every path is relative, checked by ``safe_relpath`` and opened component by component
    with ``O_NOFOLLOW`` relative to the directory's descriptor; files must be regular. The
    shared ``flock`` is on the directory itself (no lock file, no write permission needed); a
    writer replacing the directory takes the exclusive lock first. If the path was swapped
    between opening and locking, the new directory is opened instead.
    """

    def __init__(self, path, what: str = "bundle", wait: float = READER_WAIT_SECONDS):
        self.path = Path(path)
        self.what = what
        self.wait = wait
        self.fd = None

    def __enter__(self):
        for _ in range(8):
            try:
                fd = os.open(self.path, _DIR_FLAGS)
            except FileNotFoundError:
                raise UsageError(f"{self.what} not found: {self.path}") from None
            except NotADirectoryError:
                raise UsageError(f"expected a {self.what} directory, received a file: {self.path}") from None
            if not _flock(fd, fcntl.LOCK_SH, self.wait):
                os.close(fd)
                raise UsageError(f"{self.path} is being replaced by another probattn process and stayed locked "
                                 f"for {self.wait:g} s; try again")
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                now = None
            st = os.fstat(fd)
            if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                self.fd = fd
                return self
            os.close(fd)  # replaced between open and lock: read the new one
        raise UsageError(f"{self.path} kept changing while being opened; try again")

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None

    def open(self, rel: str, max_bytes: int | None = None, what: str = "file") -> int:
        dfd, name = _open_parent_at(self.fd, rel, what)
        try:
            try:
                return open_regular(name, max_bytes, dir_fd=dfd, what=f"{what} {rel}")
            except UsageError as e:
                if "not found" in str(e):
                    raise UsageError(f"{what} missing from {self.what}: {rel}") from None
                raise
        finally:
            os.close(dfd)

    def read(self, rel: str, max_bytes: int, what: str = "file") -> bytes:
        return read_fd(self.open(rel, max_bytes, what), max_bytes, f"{what} {rel}")

    def sha256(self, rel: str, what: str = "file") -> str:
        return sha256_fd(self.open(rel, None, what))

    def lstat(self, rel: str):
        """``os.lstat`` of ``rel`` (None when missing), its parents walked without links."""
        dfd, name = _open_parent_at(self.fd, rel, "path")
        try:
            return os.lstat(name, dir_fd=dfd)
        except FileNotFoundError:
            return None
        finally:
            os.close(dfd)

    def hash_tree(self, rel: str = "", skip=()) -> dict:
        """``{path relative to the directory: sha256}`` under ``rel`` ('' = everything)."""
        if not rel:
            return hash_tree(".", dir_fd=self.fd, what=self.what, skip=skip)
        dfd, name = _open_parent_at(self.fd, rel, "path")
        try:
            st = os.lstat(name, dir_fd=dfd)
            if not stat.S_ISDIR(st.st_mode):
                raise UsageError(f"{rel} in {self.what} is a {kind_of(st.st_mode)}; a directory is required")
            return {f"{rel}/{k}": v for k, v in hash_tree(name, dir_fd=dfd, what=f"{self.what} {rel}").items()}
        finally:
            os.close(dfd)

    def fd_path(self, rel: str = "") -> str:
        """A path that resolves through this directory's descriptor (``/proc/self/fd/N/rel``),
        for libraries that take only paths: they read this generation of the directory."""
        base = f"/proc/self/fd/{self.fd}"
        if not os.path.isdir(base):  # no /proc: the plain path (the lock still holds writers off)
            base = str(self.path)
        return base if not rel else f"{base}/{safe_relpath(rel)}"


# ------------------------------------------------------------------ writing reports

def open_output_dir(path, *, dir_fd: int | None = None, what: str = "report directory", create: bool = True) -> int:
    """A descriptor of a directory to write into, created if missing (``create``). A symbolic
    link (or anything but a directory) at ``path`` is refused, never followed; the directory
    must be writable (checked with a probe file, which is what counts on read-only mounts)."""
    shown = os.fspath(path)
    try:
        st = os.lstat(path, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise
        try:
            if dir_fd is None:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(path, 0o755, dir_fd=dir_fd)
        except FileExistsError:
            pass
        except OSError as e:
            raise UsageError(f"cannot create {what} {shown} ({e.strerror}); choose a writable one") from None
        st = os.lstat(path, dir_fd=dir_fd)
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"{what} {shown} is a symbolic link; refusing to write through it")
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} exists and is not a directory: {shown}")
    fd = os.open(path, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
    if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise UsageError(f"{what} {shown} changed while being opened; try again")
    problem = not_writable(fd)
    if problem:
        os.close(fd)
        raise UsageError(f"cannot write to {what} {shown} ({problem}); choose a writable one")
    return fd


def check_output_dir_usable(path, *, dir_fd: int | None = None, what: str = "report directory") -> None:
    """What ``open_output_dir`` would refuse, refused now, without creating anything: an
    existing path must be a writable directory and no link; a missing one needs a writable
    parent (the nearest existing one, for a path outside ``dir_fd``)."""
    try:
        os.close(open_output_dir(path, dir_fd=dir_fd, what=what, create=False))
        return
    except FileNotFoundError:
        pass
    if dir_fd is not None:
        parent_fd, shown_parent = os.dup(dir_fd), "its parent"
    else:
        parent = Path(path).absolute().parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise UsageError(f"cannot create {what} {os.fspath(path)}: {parent} is not a directory")
        parent_fd, shown_parent = os.open(parent, _DIR_FLAGS), str(parent)
    try:
        problem = not_writable(parent_fd)
    finally:
        os.close(parent_fd)
    if problem:
        raise UsageError(f"cannot create {what} {os.fspath(path)} in {shown_parent} ({problem}); choose a writable one")


def not_writable(dir_fd: int) -> str | None:
    """None when a file can be created in the directory; otherwise why not. (``os.access``
    says yes for root on a read-only mount.)"""
    import secrets

    probe = f".probattn-probe-{secrets.token_hex(6)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(probe, dir_fd=dir_fd)
    return None


def write_file_at(dir_fd: int, name: str, data) -> None:
    """Write ``name`` (a plain name) in the directory ``dir_fd``: a new temporary file
    (``O_EXCL | O_NOFOLLOW``: a planted file or link there makes it fail, not follow), then a
    rename over ``name``. A rename replaces a link at ``name`` itself, never its target."""
    import secrets

    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise UsageError(f"file name {name!r} must be a plain name")
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = f".{name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


# ------------------------------------------------------------------ output directories and their marker

def write_marker(directory, kind: str) -> None:
    """Mark ``directory`` as made by probattn (what made it, and when)."""
    from importlib import metadata

    try:
        version = metadata.version("probattn")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        version = None
    doc = {"tool": "probattn", "kind": kind, "version": version,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    fd = os.open(directory, _DIR_FLAGS | os.O_NOFOLLOW)
    try:
        write_file_at(fd, OUTPUT_MARKER, json.dumps(doc, indent=1) + "\n")
    finally:
        os.close(fd)


def read_marker(directory) -> dict | None:
    """The marker of a probattn output, or None (no marker, a link, not ours, unreadable)."""
    try:
        fd = os.open(directory, _DIR_FLAGS | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        data = read_regular(OUTPUT_MARKER, _MARKER_MAX_BYTES, dir_fd=fd)
        doc = json.loads(data)
    except (UsageError, OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if isinstance(doc, dict) and doc.get("tool") == "probattn" and doc.get("kind") in KINDS:
        return doc
    return None


def check_output_dir(target, overwrite: bool = False, kind: str = "run") -> Path:
    """Refuse an output path that is a symbolic link or a file, a non-empty directory
    without ``overwrite``, or (with ``overwrite``) a non-empty directory that probattn did not
    make as a ``kind`` (no ``OUTPUT_MARKER``): --overwrite replaces an earlier bundle or run,
    never an arbitrary folder, whatever it holds. Verbs call this before their slow work too,
    so a bad ``--out`` fails in seconds."""
    if kind not in KINDS:
        raise ValueError(kind)
    target = Path(target).absolute()
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return target
    except NotADirectoryError:
        raise UsageError(f"output path {target}: a parent is not a directory") from None
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"output path {target} is a symbolic link (to {os.readlink(target)}); pass the real "
                         "directory or another path")
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"output path exists and is not a directory: {target}")
    if any(os.scandir(target)):
        if not overwrite:
            raise UsageError(f"output directory already exists and is not empty: {target} "
                             "(pass --overwrite to replace it)")
        marker = read_marker(target)
        if marker is None:
            raise UsageError(f"--overwrite replaces only a {kind} probattn made (it holds {OUTPUT_MARKER}); "
                             f"{target} has none, so it is left alone. Choose another --out")
        if marker["kind"] != kind:
            raise UsageError(f"--overwrite replaces only a probattn {kind}; {target} is a probattn "
                             f"{marker['kind']}. Choose another --out")
    return target


@contextlib.contextmanager
def atomic_directory(target, overwrite: bool = False, kind: str = "run"):
    """Yield a temporary directory (already holding ``OUTPUT_MARKER``); on success it
    replaces ``target`` in one atomic swap. ``overwrite`` replaces only an earlier probattn
    output of the same ``kind``."""
    import shutil
    import tempfile

    target = check_output_dir(target, overwrite, kind)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(target):
        _remove_stale(parent, target.name)
        check_output_dir(target, overwrite, kind)  # again, under the lock: a writer may just have finished
        _readers_gone(target, START_WAIT_SECONDS)  # fail now, not after the slow part
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=parent))
        LIVE_TEMP_DIRS.add(str(tmp))
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result is an ordinary directory
            write_marker(tmp, kind)
            yield tmp
            _install(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            LIVE_TEMP_DIRS.discard(str(tmp))


def check_not_in_use(target) -> None:
    """Refuse now (not after the slow part) when a reader holds ``target``."""
    _readers_gone(Path(target).absolute(), START_WAIT_SECONDS)


def _readers_gone(target: Path, wait: float) -> None:
    """Refuse while a reader (verify, bench, a loading predict) holds ``target``."""
    try:
        fd = os.open(target, _DIR_FLAGS | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        if not _flock(fd, fcntl.LOCK_EX, wait):
            raise UsageError(_busy(target))
    finally:
        os.close(fd)


def _install(tmp: Path, target: Path) -> None:
    """Put ``tmp`` at ``target``. An existing target is locked exclusively (readers finish
    first), swapped atomically (``renameat2(RENAME_EXCHANGE)``; two renames through an
    ``old-PID`` backup where that is missing) and deleted while still locked."""
    import shutil

    try:
        old_fd = os.open(target, _DIR_FLAGS | os.O_NOFOLLOW)
    except FileNotFoundError:
        os.rename(tmp, target)
        return
    try:
        if not _flock(old_fd, fcntl.LOCK_EX, SWAP_WAIT_SECONDS):
            raise UsageError(f"{target} stayed in use by another probattn process for {SWAP_WAIT_SECONDS:g} s; "
                             "the new result was not installed and the old one is unchanged")
        try:
            rename_exchange(tmp, target)
            old = tmp  # the temporary name now holds the previous result
        except OSError:
            old = target.parent / f"{TMP_PREFIX}{target.name}-old-{os.getpid()}"
            os.rename(target, old)
            os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        os.close(old_fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def rename_exchange(a, b) -> None:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); OSError if the
    system cannot."""
    try:
        import ctypes
    except ImportError as e:  # pragma: no cover - a Python built without ctypes
        raise OSError(errno.ENOSYS, str(e)) from None
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), os.fspath(a))


#: what follows ``TMP_PREFIX + name + "-"`` in our own temporary names: mkdtemp's 8
#: random characters, or the ``old-PID`` backup. ``NAME-2``'s directories do not match.
_OWN_TMP = re.compile(r"[a-z0-9_]{8}|old-[0-9]+")


def _remove_stale(parent: Path, name: str) -> None:
    """Temporary directories left by a killed run (we hold the lock, so none is live).
    A run killed between its two final renames leaves the previous result only as its
    ``old-PID`` backup: that one is put back in place, not deleted. Links are never followed
    or restored."""
    import glob
    import shutil

    prefix = f"{TMP_PREFIX}{name}-"
    target = parent / name
    for p in sorted(parent.glob(glob.escape(prefix) + "*")):
        if p.is_symlink() or not p.is_dir() or not _OWN_TMP.fullmatch(p.name[len(prefix):]):
            continue  # the lock file, or another target's directory (NAME-2 while we write NAME)
        if p.name[len(prefix):].startswith("old-") and not os.path.lexists(target):
            os.rename(p, target)
        else:
            shutil.rmtree(p, ignore_errors=True)

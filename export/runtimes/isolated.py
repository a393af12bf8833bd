"""Runtimes isolated in child processes: a runtime that crashes (segfault, abort) or hangs
takes down its child, not the caller, and the caller gets the cause as an error it can
record (``RuntimeCrash``) before going on.

One ``Worker`` is a small persistent child (``python -m probattn.export.runtimes.isolated``)
that hosts one runner at a time. Requests and replies are pickled tuples (numpy arrays
travel as pickle protocol 5 buffers) over two private pipes, length-prefixed; the child's
own stdout/stderr go to a temporary file whose last line is quoted when it dies.
``IsolatedRunner`` has the Runner API (``activate``, ``infer``, ``accepts_length``,
``name``, context manager) with the real Runner living in its worker: verify spawns one per
artifact x runtime pair, so the child loads the artifact once and answers every case.

Resource limits have one home: ``Limits`` (applied in ``_apply_limits`` in the child before
anything runs, and as reply deadlines in the parent).
"""
from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from probattn.models.errors import ProbattnError, UsageError, one_line

_HEADER = struct.Struct("<Q")


@dataclass(frozen=True)
class Limits:
    """Limits of one child. ``None``: no limit.

    * ``load_seconds`` / ``call_seconds``: how long the parent waits for a reply before it
      declares the child hung and kills it (a hang fails the row, it never stalls verify);
      generous, since a first call may compile kernels.
    * ``memory_bytes`` / ``cpu_seconds``: ``RLIMIT_AS`` / ``RLIMIT_CPU`` set in the child
      before it imports anything (not set by default).
    """

    load_seconds: float | None = 900.0
    call_seconds: float | None = 900.0
    memory_bytes: int | None = None
    cpu_seconds: int | None = None


DEFAULT_LIMITS = Limits()


class RuntimeCrash(ProbattnError):
    """A child runtime died or hung; ``str()`` says how (signal, exit code, last output)."""

    exit_code = 1


def _apply_limits(limits: Limits) -> None:
    """In the child, first thing: the resource limits."""
    import resource

    if limits.memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    if limits.cpu_seconds:
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))


# ---------------------------------------------------------------------------- framing

def _send(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=5)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None  # the other side closed the pipe (it exited or died)
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(fd: int, deadline: float | None = None):
    head = _read_exact(fd, _HEADER.size, deadline)
    if head is None:
        return None
    body = _read_exact(fd, _HEADER.unpack(head)[0], deadline)
    return None if body is None else pickle.loads(body)


# ---------------------------------------------------------------------------- parent side

class Worker:
    """A persistent child process hosting one runner at a time."""

    def __init__(self, limits: Limits | None = None):
        self.limits = limits or DEFAULT_LIMITS
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        self._log = tempfile.TemporaryFile()
        # the child imports what this process can (a runner class is sent by module and name)
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
                   PROBATTN_PARENT_PID=str(os.getpid()),
                   PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        cmd = [sys.executable, "-m", "probattn.export.runtimes.isolated", str(to_child_r), str(from_child_w)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                     pass_fds=(to_child_r, from_child_w), env=env)
        os.close(to_child_r)
        os.close(from_child_w)
        self.closed = False
        _send(self._to_child, ("limits", self.limits))
        self.what = "starting"

    def request(self, op, *args, seconds: float | None = None):
        """Send one request and wait for its reply. Re-raises the child's UsageError (bad
        input: exit 2) as is; a child that dies or does not answer in time raises
        RuntimeCrash (and is gone)."""
        if self.closed:
            raise RuntimeCrash(f"runtime process already stopped ({self.what})")
        try:
            _send(self._to_child, (op, *args))
        except (BrokenPipeError, OSError):
            raise self._crash() from None
        deadline = None if seconds is None else time.monotonic() + seconds
        try:
            reply = _recv(self._from_child, deadline)
        except TimeoutError:
            self.kill()
            raise RuntimeCrash(f"no answer within {seconds:g} s while {self.what} (hung); the runtime process "
                               "was killed") from None
        if reply is None:
            raise self._crash()
        status, *rest = reply
        if status == "ok":
            return rest[0]
        kind, message = rest
        if kind == "UsageError":
            raise UsageError(message)
        if kind == "RuntimeCrash":
            raise RuntimeCrash(message)
        raise RuntimeCrash(f"{kind}: {message}")

    def _crash(self) -> RuntimeCrash:
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.proc.returncode
        self.closed = True
        if rc is not None and rc < 0:
            try:
                how = f"killed by signal {-rc} ({signal.Signals(-rc).name})"
            except ValueError:
                how = f"killed by signal {-rc}"
        else:
            how = f"exited with code {rc}"
        tail = self._tail()
        return RuntimeCrash(f"the runtime process {how} while {self.what}" + (f"; last output: {tail}" if tail else ""))

    def _tail(self) -> str:
        try:
            self._log.seek(0)
            lines = [l.strip() for l in self._log.read().decode("utf-8", "replace").splitlines() if l.strip()]
        except Exception:
            return ""
        return one_line(lines[-1], 240) if lines else ""

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._finish()

    def close(self):
        """Ask the child to exit; kill it if it does not."""
        if not self.closed and self.proc.poll() is None:
            try:
                _send(self._to_child, ("exit",))
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def _finish(self):
        if not self.closed:
            self.closed = True
        for fd in ("_to_child", "_from_child"):
            f = getattr(self, fd, None)
            if f is not None:
                try:
                    os.close(f)
                except OSError:
                    pass
                setattr(self, fd, None)
        try:
            self._log.close()
        except Exception:
            pass

    def __del__(self):
        try:
            self.kill()
        except Exception:
            pass


_SELF_FD = "/proc/self/fd/"


class IsolatedRunner:
    """A Runner whose runtime lives in a child ``Worker`` (the Runner API, by proxy).

    ``cls`` and its arguments are what would make the in-process runner; the local instance
    is never activated (it answers ``name``, ``accepts_length`` and the like)."""

    def __init__(self, cls, path, vocab_size=None, threads=None, variant=None, input_shape=None,
                 limits: Limits | None = None, worker: Worker | None = None, **kwargs):
        if "<locals>" in cls.__qualname__ or cls.__module__ == "__main__":
            raise TypeError(f"{cls.__qualname__} cannot run in a child process: define it at the top level of an "
                            "importable module")
        self.local = cls(path, vocab_size, threads, variant=variant, input_shape=input_shape, **kwargs)
        # a path through one of this process's descriptors (``bundle.Bundle.check_entry``:
        # ``/proc/self/fd/N/...``, the generation that was hash-checked) names the same
        # directory from the child as ``/proc/PARENT/fd/N/...`` while this process holds it
        shown = str(path)
        if shown.startswith(_SELF_FD):
            shown = f"/proc/{os.getpid()}/fd/" + shown[len(_SELF_FD):]
        self.spec = (cls.__module__, cls.__qualname__, (shown, vocab_size, threads),
                     {"variant": variant, "input_shape": input_shape, **kwargs})
        self.limits = limits or DEFAULT_LIMITS
        self.worker = worker
        self._own_worker = worker is None
        self.active = False

    def __getattr__(self, item):  # name, path, variant, runtime, accepts_length, ...
        if item in ("local", "spec", "limits", "worker", "_own_worker", "active"):
            raise AttributeError(item)
        return getattr(self.local, item)

    def activate(self):
        if not self.active:
            if self.worker is None or self.worker.closed:
                self.worker = Worker(self.limits)
            self.worker.what = f"loading {self.local.path.name} on {self.local.name}"
            self.worker.request("load", *self.spec, seconds=self.limits.load_seconds)
            self.active = True
        return self

    def infer(self, ids, check_inputs: bool = True) -> dict:
        self.activate()
        self.worker.what = f"running {self.local.path.name} on {self.local.name}"
        return self.worker.request("infer", ids, check_inputs, seconds=self.limits.call_seconds)

    def accepts(self, ids) -> bool:
        """``Runner.accepts``: answered here when it needs only the manifest (lengths), in
        the child when the runner's own check needs the loaded file (MediaPipe's vocabulary)."""
        from .base import Runner

        if type(self.local).accepts is Runner.accepts:
            return self.local.accepts(ids)
        return bool(self.call("accepts", ids))

    def precision_problem(self, precision):
        """``Runner.precision_problem``, asked of the loaded runner in the child."""
        return self.call("precision_problem", precision)

    def call(self, method: str, *args, **kwargs):
        """Call another public method of the runner in the child (e.g. a diagnosis)."""
        self.activate()
        self.worker.what = f"{method} of {self.local.path.name} on {self.local.name}"
        return self.worker.request("call", method, args, kwargs, seconds=self.limits.call_seconds)

    def deactivate(self):
        if self.active and self.worker is not None and not self.worker.closed:
            try:
                self.worker.request("close", seconds=60)
            except RuntimeCrash:
                pass
        self.active = False
        if self._own_worker and self.worker is not None:
            self.worker.close()
            self.worker = None

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()


# ---------------------------------------------------------------------------- child side

def _exit_with_parent():
    import threading

    parent = int(os.environ.get("PROBATTN_PARENT_PID") or os.getppid())

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _child_main(fd_in: int, fd_out: int) -> int:
    _exit_with_parent()
    runner = None
    while True:
        msg = _recv(fd_in)
        if msg is None or msg[0] == "exit":
            return 0
        op, *args = msg
        try:
            if op == "limits":
                _apply_limits(args[0])
                continue  # no reply: the parent does not wait for this one
            if op == "load":
                module, qualname, pos, kwargs = args
                import importlib

                cls = getattr(importlib.import_module(module), qualname)
                if runner is not None:
                    runner.deactivate()
                runner = cls(*pos, **kwargs).activate()
                result = None
            elif op == "infer":
                result = runner.infer(args[0], check_inputs=args[1])
            elif op == "call":
                method, a, kw = args
                if method.startswith("_"):
                    raise UsageError(f"not a public runner method: {method}")
                result = getattr(runner, method)(*a, **kw)
            elif op == "close":
                if runner is not None:
                    runner.deactivate()
                runner = None
                result = None
            else:
                raise UsageError(f"unknown request {op!r}")
            _send(fd_out, ("ok", result))
        except BaseException as e:  # reported to the parent, which decides
            kind = "UsageError" if isinstance(e, UsageError) else type(e).__name__
            try:
                _send(fd_out, ("error", kind, one_line(str(e) or kind, 600)))
            except OSError:
                return 1
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                return 1


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(_child_main(int(sys.argv[1]), int(sys.argv[2])))

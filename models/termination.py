"""SIGTERM and SIGHUP handled like SIGINT (Ctrl-C), with a watchdog for native calls.

``with graceful_termination():`` (the CLI wraps every verb in it)

* SIGTERM, SIGHUP and SIGINT raise ``Terminated`` (a ``KeyboardInterrupt`` carrying the
  signal number) in the main thread, so every ``except BaseException`` / ``finally`` that
  removes a temporary directory runs; the CLI exits with 128 + the signal number (143,
  129, 130).
* A second signal while the first is being handled is ignored, so a second Ctrl-C or
  SIGTERM cannot cut the cleanup short.
* Inside ``with deferred():`` (TensorFlow graph building and conversion, where an
  exception raised at an arbitrary bytecode can leave TensorFlow's native state half
  made and crash the process later) the signal is only recorded; it is raised when the
  block ends, or at a ``checkpoint()`` inside it.
* Python runs signal handlers only between bytecodes: while the main thread is inside one
  long native call (a TensorFlow conversion, a runtime's kernel) the handler cannot run.
  ``signal.set_wakeup_fd`` is written by the C-level handler at once, so a watchdog thread
  sees the signal; if the main thread has not finished within ``GRACE_SECONDS`` it removes
  the temporary directories still being built (``fsutil.LIVE_TEMP_DIRS``) and exits with
  128 + the signal number.
"""
from __future__ import annotations

import os
import signal
import threading

from . import fsutil

#: How long the main thread gets to clean up after a signal before the watchdog does it.
GRACE_SECONDS = 10.0
SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


#: the graceful_termination block in force (main thread), for ``deferred`` and ``checkpoint``
_ACTIVE = None
_DEFER_DEPTH = 0


class deferred:
    """Record a termination signal instead of raising it inside the block; raise it when
    the outermost block ends (``raise_at_end``; else only ``checkpoint()`` calls raise it),
    and the watchdog still ends the process after the grace time."""

    def __init__(self, raise_at_end: bool = True):
        self.raise_at_end = raise_at_end

    def __enter__(self):
        global _DEFER_DEPTH
        if threading.current_thread() is threading.main_thread():
            _DEFER_DEPTH += 1
        return self

    def __exit__(self, *exc):
        global _DEFER_DEPTH
        if threading.current_thread() is not threading.main_thread():
            return False
        _DEFER_DEPTH -= 1
        if _DEFER_DEPTH == 0 and exc[0] is None and self.raise_at_end:
            checkpoint()
        return False


def checkpoint() -> None:
    """Raise the termination signal recorded inside a ``deferred`` block, if any."""
    active = _ACTIVE
    if active is not None and active.fired is not None and not active.raised \
            and threading.current_thread() is threading.main_thread():
        active.raised = True
        raise Terminated(active.fired)


class Terminated(KeyboardInterrupt):
    """A termination signal, raised in the main thread. ``signum``: which one."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


def exit_code(exc: BaseException) -> int:
    """128 + the signal number (SIGINT 130, SIGTERM 143, SIGHUP 129)."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


def signal_name(exc: BaseException) -> str:
    return signal.Signals(getattr(exc, "signum", signal.SIGINT)).name


class graceful_termination:
    """Install the handlers and the watchdog for the duration of the block (main thread only;
    elsewhere, e.g. inside a library caller's thread, it does nothing)."""

    def __init__(self, grace: float = GRACE_SECONDS, verb: str | None = None):
        self.grace = grace
        self.verb = verb  # the CLI verb, for the watchdog's last line
        self.fired = None
        self.raised = False
        self.active = False
        self._done = threading.Event()

    def _handler(self, signum, frame):
        if self.fired is not None:
            return  # already terminating: let the cleanup finish
        self.fired = signum
        if _DEFER_DEPTH:
            return  # raised at the end of the deferred block (or by a checkpoint)
        self.raised = True
        raise Terminated(signum)

    def _watch(self):
        while True:
            try:
                data = os.read(self._r, 64)
            except OSError:
                return
            if not data or self._done.is_set():
                return
            signums = [s for s in data if s in SIGNALS]
            if not signums:
                continue
            if self._done.wait(self.grace):
                return
            paths = list(fsutil.LIVE_TEMP_DIRS)
            for p in paths:
                import shutil

                shutil.rmtree(p, ignore_errors=True)
            name = signal.Signals(signums[0]).name
            if self.verb:  # the same last line as when the main thread cleans up itself
                what = "interrupted" if name == "SIGINT" else f"terminated by {name}"
                os.write(2, f"probattn {self.verb}: {what}; nothing was written\n".encode())
            else:
                os.write(2, f"probattn: terminated by {name}; the main thread did not stop within {self.grace:g} s, "
                            f"removed {len(paths)} temporary director{'y' if len(paths) == 1 else 'ies'}\n".encode())
            os._exit(128 + signums[0])

    def __enter__(self):
        global _ACTIVE
        if threading.current_thread() is not threading.main_thread():
            return self
        _ACTIVE = self
        self.active = True
        self._old = {s: signal.signal(s, self._handler) for s in SIGNALS}
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(self._r, True)
        self._old_wakeup = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="probattn-termination-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        global _ACTIVE
        if not self.active:
            return False
        _ACTIVE = None
        self._done.set()
        signal.set_wakeup_fd(self._old_wakeup)
        for s, h in self._old.items():
            # after a termination signal the process is on its way out: repeats stay ignored
            signal.signal(s, signal.SIG_IGN if self.fired is not None else h)
        try:
            os.write(self._w, b"\0")  # wake the watchdog so it sees _done
        except OSError:
            pass
        self._thread.join(1)
        os.close(self._w)
        os.close(self._r)
        return False

"""Helpers shared by the test modules (fixtures live in conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args, input=None, env=None, timeout=600):
    """Run ``probattn`` in a child process; returns CompletedProcess (text)."""
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    return subprocess.run([sys.executable, "-m", "probattn.export.cli", *map(str, args)],
                          capture_output=True, text=True, input=input, env=full_env, timeout=timeout)


def assert_one_error_line(proc, verb: str | None = None, code: int = 2, stdout_empty: bool = False) -> str:
    """A CLI failure as the README promises it: exit ``code``, no traceback anywhere, and
    exactly one error line, the last line on stderr (progress lines may come before it),
    starting ``probattn VERB: error:``. Returns that line."""
    err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode("utf-8", "replace")
    out = proc.stdout if isinstance(proc.stdout, str) else proc.stdout.decode("utf-8", "replace")
    where = f"exit {proc.returncode}\nstdout: {out[-1500:]}\nstderr: {err[-3000:]}"
    assert proc.returncode == code, where
    assert "Traceback" not in err and "Traceback" not in out, where
    lines = [l for l in err.splitlines() if l.strip()]
    errors = [l for l in lines if ": error: " in l or "internal error" in l]
    assert len(errors) == 1 and lines and lines[-1] == errors[0], where
    prefix = f"probattn {verb}: error: " if verb else "probattn"
    assert errors[0].startswith(prefix) or errors[0].startswith("probattn: error: "), where
    if stdout_empty:
        assert out == "", where
    return errors[0]


def tamper(path) -> None:
    """Flip one byte in the middle of a file."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def cases_longer_than(bundle, length: int) -> set:
    """Names of the verify case families with a batch longer than ``length`` ids (what a
    fixed-shape artifact of that length reports as not applicable)."""
    import json
    from pathlib import Path

    from probattn.export.parity.cases import build_cases, load_texts
    from probattn.models.text.tokenizer import load_tokenizer

    bundle = Path(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    texts, labels, _ = load_texts(bundle, manifest, None)
    cases = build_cases(load_tokenizer(bundle / manifest["tokenizer"]["path"]), manifest, texts, labels)
    return {c.name for c in cases if any(b.shape[1] > length for b in c.batches + (c.base or []))}

"""TensorFlow Lite Micro (the ``tflite-micro`` package: the real TFLM kernels and
allocator, built for the host, driven from Python). What a microcontroller build runs.

TFLite Micro cannot resize inputs: it runs the shape stored in the file, so it runs the
fixed-shape ``tflite-fixed`` artifacts (``[1, max_length]``; the Runner base pads shorter
ids and runs one row at a time). It has no float16 kernels (a DEQUANTIZE from float16
fails to prepare) and no hybrid kernels (a FULLY_CONNECTED with float input and int8
weights fails to prepare), so fp16 and int8-dynamic files are not its business. int8
outputs are dequantized with the tensor's own scale and zero point: the runner always
returns float32.
"""
from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from probattn.models.errors import UsageError, one_line

from . import register
from .base import Runner

#: arena for running (the smallest one is searched at export and recorded as arena_bytes)
RUN_ARENA_BYTES = 1 << 22


@register
class TFLMRunner(Runner):
    runtime = "tflm"
    formats = ("tflite-fixed", "tflite")
    requires = ("tflite_micro",)
    package = "tflite-micro"
    order = 25
    description = "TensorFlow Lite Micro kernels (tflite-micro), fixed-shape files, one row at a time"

    @classmethod
    def cannot_run(cls, fmt: str, precision: str, entry: dict | None = None) -> str | None:
        if fmt not in cls.formats:
            return super().cannot_run(fmt, precision, entry)
        measured = (entry or {}).get("target_checks", {}).get("tflm", "ok")
        if fmt != "tflite" and measured != "ok":  # what the export measured on this very file
            return f"measured at export: {measured}"
        why = []
        if fmt == "tflite":
            why.append("TFLite Micro cannot resize inputs and this file has a dynamic [batch, sequence] input "
                       "(stored as [1, 1]); the tflite-fixed artifacts are its files")
        if precision == "fp16":
            why.append("it has no float16 kernels (a DEQUANTIZE from float16 fails to prepare)")
        if precision == "int8-dynamic":
            why.append("it has no hybrid kernels (FULLY_CONNECTED with float input and int8 weights fails to prepare)")
        return "; ".join(why) or None

    def _load(self):
        from tflite_micro import runtime

        from ..formats.tflite_flatbuffer import describe

        from .litert import MAX_FILE_BYTES

        # the hash-checked bytes from the bundle, or a regular file read with no link followed
        blob = self.read_model(MAX_FILE_BYTES, "TFLite model")
        try:
            info = describe(blob)
        except Exception as e:
            raise UsageError(f"{self.path} is not a valid TFLite model ({one_line(e, 200)})") from None
        shape = info["inputs"][0]["shape_signature"] if info["inputs"] else []
        if len(shape) != 2 or min(shape) < 1:
            raise UsageError(f"{self.path.name}: TFLite Micro needs a fixed [1, length] input; the file has "
                             f"{shape} (export the tflite-fixed artifacts)")
        if self.fixed_length not in (None, shape[1]) or self.fixed_batch not in (None, shape[0]):
            raise UsageError(f"{self.path.name}: the manifest says input [{self.fixed_batch}, "
                             f"{self.fixed_length}], the file stores {shape}")
        self.fixed_batch, self.fixed_length = shape
        self.names = [o["name"] for o in info["outputs"]]
        with captured_stderr() as err:
            try:
                self.interp = runtime.Interpreter.from_bytes(blob, arena_size=RUN_ARENA_BYTES)
            except Exception as e:
                raise UsageError(f"TFLite Micro could not load {self.path.name} "
                                 f"({one_line(err.text() or e, 300)})") from None
        self.details = [self.interp.get_output_details(i) for i in range(len(self.names))]

    def _infer(self, ids):
        out = {}
        try:
            self.interp.set_input(np.ascontiguousarray(ids, dtype=np.int32), 0)
            self.interp.invoke()
        except Exception as e:
            raise UsageError(f"TFLite Micro failed on {self.path.name} ({one_line(e, 300)})") from None
        for i, (name, d) in enumerate(zip(self.names, self.details)):
            out[name] = dequantize(self.interp.get_output(i), d)
        return out

    def _close(self):
        self.interp = None


def dequantize(x, details) -> np.ndarray:
    """float32 values of an output: ``(q - zero_point) * scale`` for a quantized tensor."""
    q = details["quantization_parameters"]
    if np.issubdtype(x.dtype, np.integer) and len(q["scales"]):
        return ((x.astype(np.float32) - np.float32(q["zero_points"][0])) * np.float32(q["scales"][0])).astype(np.float32)
    return np.array(x, dtype=np.float32)


def _runs(blob: bytes, arena: int, shape) -> bool:
    from tflite_micro import runtime

    try:
        it = runtime.Interpreter.from_bytes(blob, arena_size=arena)
        it.set_input(np.zeros(shape, np.int32), 0)
        it.invoke()
        return True
    except Exception:  # TFLM reports a too-small arena or an unsupported op as RuntimeError
        return False


def smallest_arena(blob: bytes, shape, ceiling: int = RUN_ARENA_BYTES) -> tuple:
    """``(arena_bytes, None)``: the smallest arena with which TFLite Micro allocates the model
    and invokes it once (binary search over whole bytes); or ``(None, reason)`` with TFLM's
    own error lines when it does not run even with ``ceiling`` bytes."""
    with captured_stderr() as err:
        if not _runs(blob, ceiling, shape):
            lines = [l.strip() for l in err.text().splitlines() if l.strip()]
            return None, " | ".join(lines[-3:]) or "TFLite Micro failed without a message"
        lo, hi = 0, ceiling  # lo fails, hi runs
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if _runs(blob, mid, shape) else (mid, hi)
    return hi, None


class _Captured:
    def __init__(self, f):
        self.f = f

    def text(self) -> str:
        self.f.flush()
        self.f.seek(0)
        return self.f.read()


@contextlib.contextmanager
def captured_stderr():
    """What C++ writes to file descriptor 2 (TFLM's error reports), captured instead of shown."""
    import tempfile  # imported here: discovering the runners must not cost predict's start-up this

    with tempfile.TemporaryFile(mode="w+") as f:
        cap = _Captured(f)
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no real fd 2
            yield cap
            return
        os.dup2(f.fileno(), 2)
        try:
            yield cap
        finally:
            os.dup2(saved, 2)
            os.close(saved)

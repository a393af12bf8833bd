"""Where a TFLite-family artifact runs, measured at export, never assumed.

Not a format module: ``tflite``, ``tflite-fixed`` and ``mediapipe`` call ``measure`` on
each file they write. Each target is tried for real on a zero input of the file's stored
shape:

* ``litert``: the ``ai_edge_litert`` interpreter allocates and invokes it, outputs finite;
* ``tflm``: TensorFlow Lite Micro (``tflite-micro``) allocates and invokes it; the
  smallest arena that does so is found by binary search and recorded as ``arena_bytes``.
  A file with a dynamic input is not tried (TFLM cannot resize), and a file whose constant
  buffers are not 16-byte aligned is not listed even when the x86 build runs it (TFLM
  reads constant data in place; microcontrollers may fault on unaligned reads);
* ``mediapipe``: MediaPipe's ``TextClassifier`` loads it and classifies a text; only
  files with MediaPipe metadata can pass (it refuses models without).

The manifest entry gets ``targets`` (the ones that passed), ``target_checks`` (``"ok"`` or
why not, per target) and what raw clients see (``ops``, ``raw_inputs``, ``raw_outputs``
with dtype, shape and quantization).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from probattn.models.errors import one_line

from ..contract import TARGETS
from .tflite_flatbuffer import describe, unaligned_buffers


def measure(path, max_length: int | None = None) -> dict:
    blob = Path(path).read_bytes()
    info = describe(blob)
    shape = info["inputs"][0]["shape_signature"]
    stored = info["inputs"][0]["shape"]
    dynamic = any(d < 1 for d in shape)
    checks, extra = {}, {}
    checks["litert"] = _litert(blob, stored)
    if dynamic:
        checks["tflm"] = (f"dynamic input {shape} (stored as {stored}): TFLite Micro cannot resize inputs, "
                          "it would run that shape")
    elif importlib.util.find_spec("tflite_micro") is None:
        checks["tflm"] = "not measured: tflite-micro is not installed"
    else:
        from ..runtimes.tflm import smallest_arena

        arena, why = smallest_arena(blob, stored)
        misaligned = unaligned_buffers(blob)
        if why:
            checks["tflm"] = f"TFLite Micro refuses it: {why}"
        elif misaligned:
            checks["tflm"] = (f"the x86 TFLite Micro build runs it (arena {arena} bytes), but {len(misaligned)} "
                              "constant buffers are not 16-byte aligned (MediaPipe's metadata writer repacks "
                              "the flatbuffer); use the tflite-fixed files on a microcontroller")
        else:
            checks["tflm"] = "ok"
            extra["arena_bytes"] = arena
    if not info["has_metadata"]:
        checks["mediapipe"] = "no MediaPipe metadata (TextClassifier needs it): see the mediapipe format"
    elif importlib.util.find_spec("mediapipe") is None:
        checks["mediapipe"] = "not measured: mediapipe is not installed"
    else:
        checks["mediapipe"] = _mediapipe(blob)
    return {
        "targets": [t for t in TARGETS if checks.get(t) == "ok"],
        "target_checks": checks,
        **extra,
        "ops": info["ops"],
        "raw_inputs": info["inputs"],
        "raw_outputs": info["outputs"],
    }


def _litert(blob: bytes, stored) -> str:
    try:
        from ai_edge_litert.interpreter import Interpreter

        from probattn.models.quiet import quiet_stderr

        with quiet_stderr():
            it = Interpreter(model_content=blob)
            it.allocate_tensors()
            it.set_tensor(it.get_input_details()[0]["index"], np.zeros(stored, np.int32))
            it.invoke()
        outs = [it.get_tensor(d["index"]) for d in it.get_output_details()]
    except Exception as e:
        return f"LiteRT refuses it: {one_line(e, 200)}"
    if not all(np.isfinite(o.astype(np.float32)).all() for o in outs):
        return "LiteRT runs it but the outputs are not finite"
    return "ok"


def _mediapipe(blob: bytes) -> str:
    try:
        from ..runtimes.mediapipe import classifier

        with classifier(blob) as clf:
            result = clf.classify("a")
        if not result.classifications or not result.classifications[0].categories:
            return "MediaPipe TextClassifier loads it but returns no categories"
    except Exception as e:
        return f"MediaPipe TextClassifier refuses it: {one_line(e, 200)}"
    return "ok"

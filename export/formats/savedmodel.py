"""TensorFlow SavedModel with the signature ``serving_default`` (the traced function)."""
from __future__ import annotations

import time

from ..contract import SIGNATURE_KEY, artifact_filename
from . import Built, ExportContext

FORMAT = "savedmodel"
NEEDS_SAVED_MODEL = False
TFLITE_JOBS = False


def save(ctx: ExportContext, directory, module=None, concrete=None) -> float:
    """Write the SavedModel (of ``ctx``'s traced function, or of ``module``/``concrete``,
    another trace of it) to ``directory``; returns the seconds it took."""
    import tensorflow as tf

    from probattn.models.errors import UsageError, one_line

    t = time.perf_counter()
    try:  # the module tracks raw tf.Variables, never a Keras 3 model (see export/signature.py)
        tf.saved_model.save(module or ctx.module, str(directory),
                            signatures={SIGNATURE_KEY: concrete or ctx.concrete})
    except Exception as e:
        raise UsageError(f"the SavedModel could not be written: {type(e).__name__}: {one_line(e, 300)}") from None
    return time.perf_counter() - t


def export(ctx: ExportContext, precisions) -> list:
    rel = artifact_filename(FORMAT, "fp32")
    if ctx.saved_model_dir is not None and ctx.saved_model_dir == ctx.out / rel:
        seconds = ctx.saved_model_seconds  # already written for a converter that needed it
    else:
        seconds = save(ctx, ctx.out / rel)
    return [Built(FORMAT, "fp32", rel, seconds, {"signature": SIGNATURE_KEY})]

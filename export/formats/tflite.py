"""TFLite (LiteRT) conversion: fp32, fp16 weights, dynamic-range int8, full-integer int8.

Conversions run in the exporting process, one after the other, after the in-process
formats (``convert_jobs``): the exporter has TensorFlow loaded already, so a converter
child's second TensorFlow start-up (seconds, and its own copy in memory) is not paid. Six
conversions in a row on TensorFlow 2.21 grew the process by 12 MB in all, measured.

Builtin ops only: Select TF (Flex) ops cannot be run by any Python LiteRT interpreter,
so a model that needs them fails with a message naming the ops.

After conversion the flatbuffer is rewritten (``tflite_flatbuffer.rewrite_io``): raw
tensor names are the contract's (``token_ids``, ``probabilities``, ``attention_weights``)
and ``probabilities`` is output 0 of the subgraph and of the signature, so raw clients
(C++, TFLite Micro, ``get_output_details()[0]``) get the probabilities first.

Full-integer recipe (recorded in the manifest): int8 weights and activations, int32
``token_ids`` input, float32 outputs (a dequantize at the end), per-channel dense weights,
calibrated on real training texts at their own lengths in padded batches. The layer's
masking arithmetic (small mask offset, matmul pooling) is what keeps int8 from collapsing.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from probattn.models.errors import UsageError, one_line

from ..contract import INPUT, SUPPORTED, artifact_filename
from . import Built, ExportContext

FORMAT = "tflite"
NEEDS_SAVED_MODEL = True
SAVED_MODEL = "dynamic"
#: full int8 converts from the int8-safe trace when the float files take the float graph
INT8_SAVED_MODEL = "dynamic-int8"
TFLITE_JOBS = True
TFLITE_PRECISIONS = SUPPORTED[FORMAT]

INT8_RECIPE = {
    "weights": "int8; per channel for dense layers, per tensor for the embedding",
    "activations": "int8",
    "input": "int32 token_ids (not quantized)",
    "outputs": "float32 (dequantized in the graph)",
    "calibration": "training texts at their own length, cut to random lengths, as 1- and 2-token rows, and "
                   "joined beyond max_length (export/calibration.py); batches of 4 padded to the longest",
    "ops": "TFLITE_BUILTINS_INT8 only",
}


def _flex_ops(message: str) -> list:
    """The op names the converter lists itself ("TF Select ops: StridedSlice, ..."); nothing
    is scraped from the rest of its message (MLIR noise such as tf.entry_function)."""
    listed = re.findall(r"(?:TF Select|Custom) ops:\s*([A-Za-z0-9_, ]+)", message)
    return sorted({x.strip() for group in listed for x in group.split(",") if x.strip()})


def _saved_model_ops(saved_model_dir, prefix: str) -> list:
    """Op types starting with ``prefix`` in a SavedModel's graph and function library."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((Path(saved_model_dir) / "saved_model.pb").read_bytes())
    ops = set()
    for mg in sm.meta_graphs:
        ops.update(n.op for n in mg.graph_def.node)
        for fn in mg.graph_def.library.function:
            ops.update(n.op for n in fn.node_def)
    return sorted(o for o in ops if o.startswith(prefix))


def convert(saved_model_dir: str, precision: str, calibration: list | None = None,
            int8_output: bool = False, float_ops=()) -> bytes:
    """One conversion. ``int8_output``: full int8 with int8 outputs (no final DEQUANTIZE);
    the input stays int32 (token ids are not quantized). ``float_ops``: builtin op names
    (e.g. ``EXP``) that full int8 keeps in float32, between a DEQUANTIZE and a QUANTIZE."""
    import tensorflow as tf

    if precision not in TFLITE_PRECISIONS:
        raise UsageError(f"unknown TFLite precision '{precision}'; allowed: {', '.join(TFLITE_PRECISIONS)}")
    conv = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    conv.allow_custom_ops = False
    if precision == "fp16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif precision == "int8-dynamic":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif precision == "int8":
        if not calibration:
            raise UsageError("full-integer int8 needs calibration texts (--calibration-data)")
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

        def representative():
            for ids in calibration:
                yield {INPUT: np.asarray(ids, dtype=np.int32)}

        conv.representative_dataset = representative
        if int8_output:
            conv.inference_output_type = tf.int8
        if float_ops:
            return _convert_with_float_ops(conv, float_ops, int8_output)
    try:
        return conv.convert()
    except Exception as e:  # ConverterError and friends: report what the converter said
        msg = str(e)
        ops = _flex_ops(msg)
        how = "Rewrite those ops with builtins (e.g. tf.expand_dims instead of x[..., None])"
        if not ops and "tensor list" in msg.lower():  # the converter does not name them
            ops = _saved_model_ops(saved_model_dir, "TensorList") or ["TensorList ops"]
            how = ("They come from a recurrent layer traced with a dynamic shape: rewrite it as a loop "
                   "of builtin ops (probattn does so for LSTM and Bidirectional(LSTM))")
        if ops or "Select TF" in msg or "Flex" in msg or "custom op" in msg.lower():
            raise UsageError(
                f"TFLite {precision}: the model needs ops that are not LiteRT builtins "
                f"({', '.join(ops) or 'the converter did not name them'}); Select TF (Flex) and custom ops "
                f"cannot be run by the Python LiteRT interpreter, so probattn refuses them. {how}"
            ) from None
        raise UsageError(f"TFLite {precision} conversion failed: {one_line(msg)}") from None


def _convert_with_float_ops(conv, float_ops, int8_output: bool) -> bytes:
    """Full int8 with ``float_ops`` left in float32: calibrate with the converter, then
    quantize with the MLIR quantizer's op denylist (what the public
    ``tf.lite.experimental.QuantizationDebugger`` does with ``denylisted_ops``)."""
    import tensorflow as tf
    from tensorflow.lite.python import convert as tf_convert

    conv._experimental_calibrate_only = True  # the converter stops after calibration
    try:
        calibrated = conv.convert()
        return tf_convert.mlir_quantize(calibrated, disable_per_channel=False,
                                        output_data_type=tf.int8 if int8_output else tf.float32,
                                        denylisted_ops=list(float_ops))
    except Exception as e:
        raise UsageError(f"TFLite int8 conversion with {', '.join(float_ops)} in float failed: {one_line(e)}") from None


def conversion(fmt: str, saved_model, precision: str, path: str, calibration: str | None = None,
               int8_output: bool = False, float_ops=()) -> dict:
    """One conversion job: convert ``saved_model`` at ``precision`` (full int8
    calibrated with the context's ``calibration`` set, ``"dynamic"`` or ``"fixed"``),
    rewrite its I/O names and order, write it to ``path`` inside the bundle."""
    return {"format": fmt, "saved_model": str(saved_model), "precision": precision, "path": path,
            "calibration": calibration if precision == "int8" else None, "int8_output": bool(int8_output),
            "float_ops": list(float_ops) if precision == "int8" else []}


def conversions(ctx: ExportContext, precisions) -> list:
    if "int8" in precisions and not ctx.calibration:
        raise UsageError("full-integer int8 needs calibration texts (--calibration-data)")
    int8_apart = INT8_SAVED_MODEL in ctx.saved_models  # else every precision converts from the one trace
    return [conversion(FORMAT, ctx.saved_models[INT8_SAVED_MODEL if p == "int8" and int8_apart else SAVED_MODEL],
                       p, artifact_filename(FORMAT, p), "dynamic")
            for p in precisions]


def finish(ctx: ExportContext, results) -> list:
    """Manifest entries of the converted files: recipe, output dtype, what raw clients see,
    and where each file runs (measured)."""
    from .targets import measure

    built = []
    for r in results:
        extra = {**({"recipe": INT8_RECIPE} if r["precision"] == "int8" else {}), "output_dtype": "float32"}
        extra.update(measure(ctx.out / r["path"], ctx.max_length))
        built.append(Built(FORMAT, r["precision"], r["path"], r["seconds"], extra))
    return built


def export(ctx: ExportContext, precisions) -> list:
    """Every TFLite precision asked for, converted from the SavedModels in ``ctx.saved_models``."""
    return finish(ctx, convert_jobs(ctx, conversions(ctx, precisions)))


def convert_jobs(ctx: ExportContext, jobs) -> list:
    """Run ``jobs`` (from ``conversion``) one after the other in this process (TensorFlow is
    already imported by the exporter: no second start-up, no second copy in memory);
    returns their results (``path``, ``precision``, ``seconds``, ...) in order. A job that
    fails goes to ``ctx.failed(format, precision, reason)`` when it is set and the others go
    on; without it the first failure raises. A termination signal stops between two jobs."""
    from probattn.models.quiet import quiet_stderr
    from probattn.models.termination import checkpoint

    from ..contract import ordered_outputs
    from .tflite_flatbuffer import rewrite_io

    sets = {"dynamic": ctx.calibration, "fixed": ctx.calibration_fixed}
    calibration = {}  # each set used, as int32 arrays once for all its jobs
    for name in {j["calibration"] for j in jobs if j["calibration"]}:
        if not sets.get(name):
            raise UsageError("full-integer int8 needs calibration texts (--calibration-data)")
        calibration[name] = [np.asarray(c, np.int32) for c in sets[name]]
    results = []
    for job in jobs:
        checkpoint()
        t0 = time.perf_counter()
        try:
            with quiet_stderr():  # the converter's MLIR diagnostics go to fd 2
                blob = convert(job["saved_model"], job["precision"], calibration.get(job["calibration"]),
                               int8_output=job["int8_output"], float_ops=job.get("float_ops", ()))
            try:
                blob = rewrite_io(blob, ordered_outputs)  # raw names and order = the contract's
            except ValueError as e:
                raise UsageError(f"{job['path']}: cannot name its tensors ({one_line(e)})") from None
        except UsageError as e:  # this job fails; the next ones are still tried
            if ctx.failed is None:
                raise
            ctx.failed(job["format"], job["precision"], str(e))
            continue
        path = Path(ctx.out) / job["path"]
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)
        results.append({**job, "seconds": round(time.perf_counter() - t0, 2)})
    return results

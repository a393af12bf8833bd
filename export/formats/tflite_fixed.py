"""Fixed-shape TFLite for devices: the same serving function traced with a fixed
``TensorSpec([1, max_length])``, converted like ``tflite`` (builtin ops, the same names,
``probabilities`` first).

TensorFlow Lite Micro cannot resize inputs, and the dynamic ``tflite`` files store
``[1, 1]``, so microcontrollers need these. Precisions: fp32 and full int8 (TFLM has no
float16 or hybrid kernels). Full int8 comes twice: with float32 outputs (a DEQUANTIZE at
the end, like ``tflite``) and with int8 outputs (``output_dtype: int8``; probabilities
then have scale 1/256 and zero point -128, read from the file into ``quantization``).
Full-int8 calibration uses the same rows as ``tflite`` that fit, one per
``[1, max_length]`` input, right-padded. ``TFLM_FLOAT_OPS`` (EXP, LOG) stay in float32:
TFLite Micro has no int8 kernels for them.

Each manifest entry records ``input_shape``, ``output_dtype``, ``quantization`` (int8
outputs), ``ops``, ``arena_bytes`` (the smallest TFLM arena that allocates and invokes
it) and ``targets`` (measured in ``targets.py``).
"""
from __future__ import annotations

from probattn.models.errors import UsageError

from ..contract import artifact_filename, fixed_input_shape, output_dtypes
from . import Built, ExportContext
from .tflite import INT8_RECIPE, conversion, convert_jobs

FORMAT = "tflite-fixed"
NEEDS_SAVED_MODEL = True
SAVED_MODEL = "fixed"
TFLITE_JOBS = True

#: ops full int8 keeps in float32 here: TFLite Micro has float kernels only for them (its
#: EXP and LOG refuse int8 inputs). LiteRT's int8 EXP and LOG are lookup tables of the same
#: float functions, so on LiteRT the outputs equal those of the all-int8 graph.
TFLM_FLOAT_OPS = ("EXP", "LOG")
FIXED_INT8_RECIPE = {**INT8_RECIPE,
                     "calibration": "the tflite recipe's rows that fit, one per [1, max_length] input, right-padded",
                     "ops": "TFLITE_BUILTINS_INT8, except " + " and ".join(TFLM_FLOAT_OPS) + " in float32 between "
                            "DEQUANTIZE and QUANTIZE (TFLite Micro has no int8 kernels for them)"}


def conversions(ctx: ExportContext, precisions, fmt: str = FORMAT, saved_model: str = SAVED_MODEL) -> list:
    if "int8" in precisions and not ctx.calibration_fixed:
        raise UsageError("full-integer int8 needs calibration texts (--calibration-data)")
    jobs = []
    for p in precisions:
        for dtype in output_dtypes(fmt, p):
            jobs.append(conversion(fmt, ctx.saved_models[saved_model], p, artifact_filename(fmt, p, dtype),
                                   "fixed", int8_output=dtype == "int8", float_ops=TFLM_FLOAT_OPS))
    return jobs


def entry_extra(ctx: ExportContext, result: dict) -> dict:
    """What the manifest says of one fixed-shape file, read from the file itself."""
    from .targets import measure

    dtype = "int8" if result["int8_output"] else "float32"
    extra = {"input_shape": fixed_input_shape(ctx.max_length), "output_dtype": dtype}
    if result["precision"] == "int8":
        extra["recipe"] = {**FIXED_INT8_RECIPE, "outputs": "int8 (scale and zero point below)"
                           if dtype == "int8" else FIXED_INT8_RECIPE["outputs"]}
    extra.update(measure(ctx.out / result["path"], ctx.max_length))
    stored = extra["raw_inputs"][0]["shape_signature"]
    if stored != extra["input_shape"]:
        raise UsageError(f"{result['path']}: the converter stored input shape {stored}, expected "
                         f"{extra['input_shape']}")
    if dtype == "int8":
        quant = {o["name"]: o["quantization"] for o in extra["raw_outputs"]}
        if any(q is None for q in quant.values()):
            raise UsageError(f"{result['path']}: int8 outputs without quantization parameters: {quant}")
        # float = (int8 - zero_point) * scale; a softmax output gets 1/256 and -128
        extra["quantization"] = {n: {"scale": q["scale"][0], "zero_point": q["zero_point"][0]} for n, q in quant.items()}
    return extra


def finish(ctx: ExportContext, results) -> list:
    return [Built(FORMAT, r["precision"], r["path"], r["seconds"], entry_extra(ctx, r)) for r in results]


def export(ctx: ExportContext, precisions) -> list:
    return finish(ctx, convert_jobs(ctx, conversions(ctx, precisions)))

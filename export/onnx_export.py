"""ONNX export with tf2onnx from the traced serving function, then fp16 and int8 variants.

* fp32: ``tf2onnx.convert.from_function`` with the explicit input signature; input
  ``token_ids`` and outputs keep their names, dynamic dims are named ``batch`` and
  ``sequence`` (tf2onnx calls them ``unk__N``).
* fp16: ``onnxruntime.transformers.float16`` with ``keep_io_types=True`` (int32 input,
  float32 outputs). ``onnxconverter_common.float16`` produced an invalid Cast on this graph.
* int8: ``onnxruntime.quantization.quantize_dynamic``: int8 weights for MatMul and Gather,
  activations quantized at run time (dynamic, no calibration).

Every file passes ``onnx.checker.check_model(full_check=True)``.
"""
from __future__ import annotations

from pathlib import Path

from .errors import UsageError, one_line

DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 13, 18  # tf2onnx 1.17 refuses opsets above 18
ONNX_PRECISIONS = ("fp32", "fp16", "int8")
INT8_RECIPE = {"method": "onnxruntime quantize_dynamic", "weights": "int8 (QInt8)",
               "activations": "uint8, quantized at run time", "ops": "MatMul, Gather"}
FP16_RECIPE = {"method": "onnxruntime.transformers.float16", "io": "int32 in, float32 out"}


def check_opset(opset) -> int:
    try:
        value = int(opset)
    except (TypeError, ValueError):
        raise UsageError(f"--opset must be an integer from {MIN_OPSET} to {MAX_OPSET}; received {opset!r}") from None
    if not MIN_OPSET <= value <= MAX_OPSET:
        raise UsageError(f"--opset {value} is not supported; allowed: {MIN_OPSET} to {MAX_OPSET} "
                         f"(tf2onnx 1.17 converts up to {MAX_OPSET}; default {DEFAULT_OPSET})")
    return value


def _name_dims(model, output_dims: dict) -> None:
    """Name the input's dims batch/sequence, carry the names through, drop tf2onnx's unk__N."""
    inp = model.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    rename = {}
    for d, new in zip(dims, ("batch", "sequence")):
        if d.dim_param:
            rename[d.dim_param] = new
        d.ClearField("dim_value")
        d.dim_param = new
    for out in model.graph.output:
        wanted = output_dims.get(out.name)
        for i, d in enumerate(out.type.tensor_type.shape.dim):
            if wanted and isinstance(wanted[i], str):
                d.dim_param = wanted[i]
    for vi in model.graph.value_info:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]


def _rename_io(model, mapping: dict) -> None:
    """Rename graph inputs/outputs (e.g. 'token_ids:0' -> 'token_ids') everywhere they appear."""
    if not mapping:
        return
    for node in model.graph.node:
        for i, n in enumerate(node.input):
            if n in mapping:
                node.input[i] = mapping[n]
        for i, n in enumerate(node.output):
            if n in mapping:
                node.output[i] = mapping[n]
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if vi.name in mapping:
            vi.name = mapping[vi.name]


def convert_fp32(module, opset: int, output_names: list):
    import tensorflow as tf
    import tf2onnx

    from .serving import INPUT_NAME

    spec = (tf.TensorSpec([None, None], tf.int32, name=INPUT_NAME),)
    try:
        model, _ = tf2onnx.convert.from_function(module.serve, input_signature=spec, opset=opset)
    except Exception as e:
        raise UsageError(f"ONNX conversion (tf2onnx, opset {opset}) failed: {one_line(e)}") from None
    mapping = {}
    for vi in list(model.graph.input) + list(model.graph.output):
        base = vi.name.split(":")[0]
        if base != vi.name:
            mapping[vi.name] = base
    _rename_io(model, mapping)
    got = [o.name for o in model.graph.output]
    if sorted(got) != sorted(output_names):
        raise UsageError(f"ONNX outputs came out as {got}, expected {output_names}")
    _name_dims(model, {"probabilities": ["batch", None], "attention_weights": ["batch", "sequence"]})
    model.doc_string = "probattn ProbAttention classifier"
    return model


def convert_fp16(model_fp32):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        return convert_float_to_float16(model_fp32, keep_io_types=True)
    except Exception as e:
        raise UsageError(f"ONNX fp16 conversion failed: {one_line(e)}") from None


def convert_int8(fp32_path: Path, out_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import logging

    logging.disable(logging.WARNING)  # "consider pre-processing" advice logged on the root logger
    try:
        quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gather"])
    except Exception as e:
        raise UsageError(f"ONNX int8 quantization failed: {one_line(e)}") from None
    finally:
        logging.disable(logging.NOTSET)


def save_checked(model, path: Path) -> None:
    import onnx

    onnx.save(model, str(path))
    check(path)


def check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise UsageError(f"{path.name} fails onnx.checker ({one_line(e)})") from None

"""ONNX export with tf2onnx from the traced serving function, then fp16 and int8 variants.

* fp32: ``tf2onnx.convert.from_function`` with the explicit input signature; input
  ``token_ids`` and outputs keep their names, dynamic dims are named ``batch`` and
  ``sequence`` (tf2onnx calls them ``unk__N``), and the graph outputs are put in contract
  order, ``probabilities`` first (fp16 and int8 are derived from this graph and keep it).
* fp16: ``onnxruntime.transformers.float16`` with ``keep_io_types=True`` (int32 input,
  float32 outputs). ``onnxconverter_common.float16`` produced an invalid Cast on this graph.
* int8: the embedding table stored in 8 bits (``onnxruntime.quantization.quantize_dynamic``
  on the embedding ``Gather`` only: a uint8 table with one scale and zero point, the
  gathered rows dequantized to float); every other op stays float: the ``MatMul`` weights,
  and the float graph's score table (one float per id, gathered by the ids: its values go
  straight into ``exp``). Chosen by measurement (``scripts/onnx_int8_recipes.py``, README
  "ONNX int8: the recipe"): no recipe that shrinks the file is faster than fp32, so int8
  is for size, and of the small recipes this one is the most accurate (attention weights
  as fp32's) and the fastest at batch 1. No ``MatMulInteger`` runs and no activation is
  quantized at run time, so a row's outputs do not depend on its batch.
* int64 twins (``model_<precision>_int64.onnx``): the same graph (outputs in the same
  contract order) behind one
  ``Cast(token_ids: int64 -> int32)``, for clients that follow the Hugging Face convention
  of int64 ids (transformers.js, ``tokenizer(..., return_tensors="np")``). Ids are below
  the vocabulary size, so the cast is exact.

Every file passes ``onnx.checker.check_model(full_check=True)``.
"""
from __future__ import annotations

import time
from pathlib import Path

from probattn.models.errors import UsageError, one_line

from ..contract import (ATTENTION, BATCH_DIM, INPUT, INPUT_DTYPES, SEQUENCE_DIM, SUPPORTED, artifact_filename,
                        input_dims, is_head, ordered_outputs, output_dims)
from . import Built, ExportContext

FORMAT = "onnx"
INT64 = INPUT_DTYPES[1]
NEEDS_SAVED_MODEL = False
TFLITE_JOBS = False
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 13, 18  # tf2onnx 1.17 refuses opsets above 18
ONNX_PRECISIONS = SUPPORTED[FORMAT]
#: What ``convert_int8`` does (written into the manifest). onnxruntime quantizes a Gather's
#: table with its activation type, uint8 asymmetric, one scale per tensor, whatever
#: ``weight_type``, ``per_channel`` or ``reduce_range`` say (those only shape MatMul
#: weights, and no MatMul is quantized). The recipe before this one also quantized the
#: MatMuls (QInt8 with reduce_range, because onnxruntime's MatMulInteger on CPUs without
#: VNNI saturated AVX2's u8 x s8 pair sums and gave the all-padding row logits in the
#: thousands) and the score table: a file 6% smaller, 8-10% slower at batch 1, and
#: attention weights off by 1.5e-4.
INT8_RECIPE = {"method": "onnxruntime quantize_dynamic, Gather nodes of embedding tables only",
               "ops": "Gather of each float table with a row per id (the embedding)",
               "weights": "those tables uint8, asymmetric, one scale and zero point per table",
               "activations": "float: the gathered rows are dequantized (DequantizeLinear); nothing is "
                              "quantized at run time",
               "float": "every MatMul (weights float32); the float graph's score table (one value per id)"}
INT8_QUANTIZATION = "weight-only"
FP16_RECIPE = {"method": "onnxruntime.transformers.float16", "io": "int32 in, float32 out",
               "ids": "never float16: a model's own float cast of the ids is bypassed for the embedding lookup"}


def check_opset(opset) -> int:
    try:
        value = int(opset)
    except (TypeError, ValueError):
        raise UsageError(f"--opset must be an integer from {MIN_OPSET} to {MAX_OPSET}; received {opset!r}") from None
    if not MIN_OPSET <= value <= MAX_OPSET:
        raise UsageError(f"--opset {value} is not supported; allowed: {MIN_OPSET} to {MAX_OPSET} "
                         f"(tf2onnx 1.17 converts up to {MAX_OPSET}; default {DEFAULT_OPSET})")
    return value


def _name_dims(model, output_dims: dict, input_dims=(BATCH_DIM, SEQUENCE_DIM)) -> None:
    """Name the input's dims batch/sequence (a fixed length stays a number), carry the names
    through, drop tf2onnx's unk__N."""
    inp = model.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    rename = {}
    for d, new in zip(dims, input_dims):
        if isinstance(new, int):
            d.ClearField("dim_param")
            d.dim_value = new
            continue
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


def _order_outputs(model, order: list) -> None:
    """Graph outputs in contract order (tf2onnx sorts a dict's keys by name, which puts
    attention_weights first): ``session.run(None, feed)[0]`` is then the probabilities."""
    outputs = sorted(model.graph.output, key=lambda o: order.index(o.name))
    copies = [type(o)() for o in outputs]
    for c, o in zip(copies, outputs):
        c.CopyFrom(o)
    del model.graph.output[:]
    model.graph.output.extend(copies)


def convert_fp32(module, opset: int, output_names: list, fixed_length: int | None = None,
                 head_units: dict | None = None):
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec([None, fixed_length], tf.int32, name=INPUT),)
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
    _order_outputs(model, ordered_outputs(got))
    # the contract's outputs get named dims; another graph (``bench --attention-scaling``
    # converts a bare layer) keeps tf2onnx's
    dims = {n: output_dims(n, (head_units or {}).get(n), fixed_length) for n in got if is_head(n) or n == ATTENTION}
    _name_dims(model, dims, input_dims(fixed_length))
    model.doc_string = "probattn classifier"
    return model


def bypass_float_id_casts(model) -> int:
    """Rewire ``Cast(to=int)`` nodes that read ``Cast(to=float)(token_ids)`` to read the int
    ids directly; returns how many were rewired.

    A model that takes float ids (the seed page's ``Input(shape=(maxlen,))``) gets the
    serving graph's int32 -> float cast and the Embedding's float -> int cast.
    ``convert_float_to_float16`` turns every float tensor into float16 (also between two
    nodes it is told to keep), so ids above 2048 would round. With no float tensor on the
    way to the Gather nothing can round. Float consumers (the mask's comparison with 0) keep
    the float cast: in float16 an id >= 1 never rounds to 0, so the mask is unchanged."""
    from onnx import TensorProto

    ints = {TensorProto.INT32, TensorProto.INT64}
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}

    def to(n):
        return next((a.i for a in n.attribute if a.name == "to"), None)

    float_casts = {n.output[0]: n for n in model.graph.node
                   if n.op_type == "Cast" and n.input[0] == INPUT and to(n) in floats}
    rewired = 0
    for n in model.graph.node:
        if n.op_type == "Cast" and n.input[0] in float_casts and to(n) in ints:
            n.input[0] = INPUT
            if to(n) == TensorProto.INT32:  # Cast int32 -> int32: an identity
                n.op_type = "Identity"
                del n.attribute[:]
            rewired += 1
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for out, n in float_casts.items():
        if out not in used:
            model.graph.node.remove(n)
    return rewired


def convert_fp16(model_fp32):
    import copy

    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = copy.deepcopy(model_fp32)
    bypass_float_id_casts(model)
    try:
        model = convert_float_to_float16(model, keep_io_types=True)
    except Exception as e:
        raise UsageError(f"ONNX fp16 conversion failed: {one_line(e)}") from None
    # ops the converter keeps in float32 (Min, Max, ...) get cast nodes that it appends after
    # their consumers; ONNX requires nodes in topological order
    toposort(model.graph)
    return model


def _outer_names(node) -> list:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing graph."""
    out = []
    for a in node.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local.update(n.output)
            for n in g.node:
                out += [i for i in list(n.input) + _outer_names(n) if i and i not in local]
    return out


def toposort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the nodes producing its inputs (stable:
    nodes already in order keep their order). Raises on a cycle."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes = list(graph.node)
    ordered, pending = [], nodes
    while pending:
        progress, rest = False, []
        for node in pending:
            if all(i in available for i in list(node.input) + _outer_names(node)):
                ordered.append(node)
                available.update(node.output)
                progress = True
            else:
                rest.append(node)
        if not progress:
            missing = sorted({i for n in rest for i in n.input if i not in available})[:5]
            raise UsageError(f"ONNX graph has a cycle or undefined inputs ({', '.join(missing)})")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def embedding_gathers(model) -> list:
    """Names of the ``Gather`` nodes that read a float table with a row per id (rank 2 or
    more: an embedding), the nodes ``convert_int8`` quantizes."""
    from onnx import TensorProto

    tables = {i.name for i in model.graph.initializer if len(i.dims) >= 2 and i.data_type == TensorProto.FLOAT}
    return [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables]


def convert_int8(fp32_path: Path, out_path: Path, model=None) -> None:
    """``INT8_RECIPE``: the embedding tables of ``fp32_path`` in uint8, nothing else.
    ``model``: the file's ModelProto when the caller holds it (else it is read)."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    import logging

    nodes = embedding_gathers(model if model is not None else onnx.load(str(fp32_path)))
    if not nodes:  # onnxruntime reads an empty nodes_to_quantize as "every node"
        raise UsageError("ONNX int8 quantizes embedding tables (a Gather of a float table with a row per id); "
                         "this graph has none")
    logging.disable(logging.WARNING)  # "consider pre-processing" advice logged on the root logger
    try:
        quantize_dynamic(str(fp32_path), str(out_path), op_types_to_quantize=["Gather"], nodes_to_quantize=nodes)
    except Exception as e:
        raise UsageError(f"ONNX int8 quantization failed: {one_line(e)}") from None
    finally:
        logging.disable(logging.NOTSET)


def int64_twin(model):
    """A copy of ``model`` whose ``token_ids`` input is int64, cast to int32 by its first node."""
    import copy

    from onnx import TensorProto, helper

    twin = copy.deepcopy(model)
    inp = next(i for i in twin.graph.input if i.name == INPUT)
    if inp.type.tensor_type.elem_type != TensorProto.INT32:
        raise UsageError(f"ONNX input {INPUT} is not int32; cannot make its int64 twin")
    inner = f"{INPUT}_int32"

    def rename(graph):  # every reader, subgraphs (If/Loop/Scan bodies) included
        for node in graph.node:
            for i, n in enumerate(node.input):
                if n == INPUT:
                    node.input[i] = inner
            for a in node.attribute:
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    rename(g)

    rename(twin.graph)
    twin.graph.node.insert(0, helper.make_node("Cast", [INPUT], [inner], to=TensorProto.INT32,
                                               name=f"{INPUT}_to_int32"))
    inp.type.tensor_type.elem_type = TensorProto.INT64
    twin.doc_string = (model.doc_string + "; " if model.doc_string else "") + "int64 token_ids (cast to int32)"
    return twin


def _write_twin(ctx, model_or_path, precision, extra) -> Built:
    import onnx

    t = time.perf_counter()
    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, Path) else model_or_path
    path = ctx.out / artifact_filename(FORMAT, precision, input_dtype=INT64)
    save_checked(int64_twin(model), path)
    return Built(FORMAT, precision, path.name, time.perf_counter() - t, {**extra, "input_dtype": INT64})


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


def export(ctx: ExportContext, precisions) -> list:
    """fp32 from the traced function, then fp16 and int8 derived from it. A derived
    precision that fails goes to ``ctx.failed`` (when set) and the others go on."""
    opset = check_opset(ctx.opset)
    built = []

    def attempt(precision, make):
        try:
            make()
        except UsageError as e:
            if ctx.failed is None:
                raise
            ctx.failed(FORMAT, precision, str(e))

    t = time.perf_counter()
    fp32 = convert_fp32(ctx.module, opset, ctx.output_names, ctx.fixed_length, ctx.head_units)
    fp32_path = ctx.out / artifact_filename(FORMAT, "fp32")
    save_checked(fp32, fp32_path)
    base_seconds = time.perf_counter() - t
    twins = ctx.onnx_int64
    if "fp32" in precisions:
        built.append(Built(FORMAT, "fp32", fp32_path.name, base_seconds, {"opset": opset}))
        if twins:
            built.append(_write_twin(ctx, fp32, "fp32", {"opset": opset}))
    if "fp16" in precisions:
        def fp16():
            t = time.perf_counter()
            path = ctx.out / artifact_filename(FORMAT, "fp16")
            half = convert_fp16(fp32)
            save_checked(half, path)
            extra = {"opset": opset, "recipe": FP16_RECIPE}
            built.append(Built(FORMAT, "fp16", path.name, time.perf_counter() - t, extra))
            if twins:
                built.append(_write_twin(ctx, half, "fp16", extra))

        attempt("fp16", fp16)
    if "int8" in precisions:
        def int8():
            t = time.perf_counter()
            path = ctx.out / artifact_filename(FORMAT, "int8")
            convert_int8(fp32_path, path, fp32)
            check(path)
            extra = {"opset": opset, "recipe": INT8_RECIPE, "quantization": INT8_QUANTIZATION}
            built.append(Built(FORMAT, "int8", path.name, time.perf_counter() - t, extra))
            if twins:
                built.append(_write_twin(ctx, path, "int8", extra))

        attempt("int8", int8)
    if "fp32" not in precisions:
        fp32_path.unlink()
    return built

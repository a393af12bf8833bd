"""Audit an ONNX model from its bytes before a runtime loads it.

``audit(data, ...)`` reads the protobuf with the small reader below (no ``import onnx``:
``predict`` never pays for it) and refuses, in one line:

* opset domains other than the standard ones, model-local functions, training info;
* ops outside ``ALLOWED_OPS`` (the union of what the exports of probattn's classifiers
  and of the user models it exports hold, plus element-wise and reduction ops that cannot
  make a tensor bigger than their inputs; no ``Scan``); a ``Conv`` padding more than
  ``MAX_CONV_PAD`` per side; a ``Loop`` whose iterations are not bounded by a constant or the
  input's dims: its trip count, or, without one, a condition ``counter < limit`` where the
  counter starts at a constant and grows each step (what converters make of a while loop);
* initializers and ``Constant`` tensors over ``MAX_ELEMENTS`` values, over
  ``MAX_TENSOR_BYTES``, or whose data disagrees with their declared shape; external data
  outside the model's folder, through a link, or not a regular file;
* an I/O signature other than one ``token_ids`` int32 ``[batch, sequence]`` input and a
  ``probabilities`` float ``[batch, classes]`` output (and optionally ``attention_weights``);
  ``classes`` other than the bundle's label count;
* an embedding (the ``Gather`` fed by ``token_ids``) with fewer rows than the bundle's
  vocabulary (ids would index past it).

It also reports the precision the graph holds (float16 tensors, quantized ops), so a
manifest that serves an int8 file as fp32 is caught.

``shape_check(data, dim_caps)`` (needs ``onnx``; export and verify run it) runs ONNX shape
inference with data propagation after replacing the input's symbolic dims by their caps:
constant bombs (``ConstantOfShape``, ``Expand``, ``Tile``, ``Range``, ...) and shapes
computed from the input show up as static sizes and are refused over ``MAX_ELEMENTS``.
What inference cannot size is bounded at run time by onnxruntime's capped arena
(``export/limits.py``).
"""
from __future__ import annotations

import math
import os
import stat

from probattn.models.errors import UsageError

from ..contract import ATTENTION, INPUT, PROBABILITIES, is_head

#: values per tensor at most: 2**27 = 134 M values, 512 MB in float32 (an fp32 embedding of
#: 2 M words x 64 dims is 128 M values)
MAX_ELEMENTS = 1 << 27
#: bytes per initializer / constant, and for all of them together
MAX_TENSOR_BYTES = 1 << 30
MAX_TOTAL_BYTES = 2 << 30
#: the biggest ONNX file read into memory (protobuf's own limit is 2 GB)
MAX_FILE_BYTES = 2 << 30
#: a Loop may run at most this many times (it must be a constant or one of the input's dims)
MAX_LOOP_TRIPS = 100_000
#: subgraph nesting (If / Loop / Scan bodies)
MAX_DEPTH = 4
#: a ``Conv``'s explicit padding per side at most (a user's Conv1D with ``padding="same"``
#: pads ``dilation * (kernel - 1)`` in all): padding is the one way a Conv makes its output
#: longer than its input
MAX_CONV_PAD = 1024

ALLOWED_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")

#: Ops of the tf2onnx exports of probattn's classifiers and of the user models probattn
#: exports (``Conv`` for Conv1D: its padding is checked, ``MAX_CONV_PAD``) (ProbAttention,
#: the int8-safe pooling, BiLSTM (the ``lstm_loop`` rewrite: a ``Loop`` whose body writes each step with
#: ``ScatterND``, whose output has its data input's shape; onnxruntime refuses indices out
#: of range) and MultiHeadAttention models; tf_keras and Keras 3) in fp32, fp16
#: (onnxruntime.transformers.float16) and int8 (quantize_dynamic: today the embedding Gather
#: and its DequantizeLinear; bundles exported before also MatMulInteger and
#: DynamicQuantizeLinear), plus element-wise, comparison and reduction ops, whose outputs are never bigger than
#: their (broadcast) inputs. Expanding ops (ConstantOfShape, Expand, Tile, Range, Pad) are
#: listed because tf2onnx emits them; their sizes are checked by ``shape_check`` and the
#: runtime arena.
ALLOWED_OPS = frozenset({
    # what the exports hold
    "Add", "And", "BatchNormalization", "Cast", "Concat", "ConstantOfShape", "Conv", "DequantizeLinear", "Div",
    "DynamicQuantizeLinear", "Equal", "Exp", "Expand", "Gather", "Gemm", "GlobalAveragePool", "Identity", "If",
    "Less", "Log", "Loop", "MatMul", "MatMulInteger", "Max", "Min", "Mul", "Neg", "Not", "Reciprocal",
    "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSumSquare", "Relu", "Reshape",
    "ReverseSequence", "ScatterND", "Shape", "Sigmoid", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub",
    "Tanh", "Transpose", "Unsqueeze",
    # ProbSparse self-attention (models/probsparse.py): the kept queries (TopK, k at most the
    # length), causal means (CumSum), the sampled keys' max (GlobalMaxPool)
    "CumSum", "GlobalMaxPool", "TopK",
    # element-wise, comparisons, reductions: never bigger than their inputs
    "Abs", "ArgMax", "ArgMin", "Ceil", "Clip", "Constant", "Erf", "Flatten", "Floor", "Greater",
    "GreaterOrEqual", "HardSigmoid", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "LessOrEqual",
    "LogSoftmax", "Mean", "Or", "Pow", "QuantizeLinear", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
    "ReduceSum", "Round", "Sign", "Softplus", "Sum", "Where", "Xor", "Elu", "Selu", "Gelu", "Size",
    "Pad", "Tile", "Range",
})
#: ops whose presence says "quantized"
QUANTIZED_OPS = frozenset({"MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
                           "QLinearMatMul", "ConvInteger", "QLinearConv"})

#: TensorProto.DataType -> (name, bytes per element)
ELEM_TYPES = {1: ("float", 4), 2: ("uint8", 1), 3: ("int8", 1), 4: ("uint16", 2), 5: ("int16", 2),
              6: ("int32", 4), 7: ("int64", 8), 8: ("string", None), 9: ("bool", 1), 10: ("float16", 2),
              11: ("double", 8), 12: ("uint32", 4), 13: ("uint64", 8), 14: ("complex64", 8),
              15: ("complex128", 16), 16: ("bfloat16", 2), 17: ("float8e4m3fn", 1), 18: ("float8e4m3fnuz", 1),
              19: ("float8e5m2", 1), 20: ("float8e5m2fnuz", 1), 21: ("uint4", 0.5), 22: ("int4", 0.5)}


def _refuse(what, msg):
    raise UsageError(f"{what}: {msg}")


def _invalid(what, detail):
    raise UsageError(f"{what} is not a valid ONNX model ({detail})")


# ----------------------------------------------------------------------------- protobuf reader

def _varint(b, i, what):
    shift = result = 0
    while True:
        if i >= len(b):
            _invalid(what, "truncated protobuf")
        c = b[i]
        i += 1
        result |= (c & 0x7F) << shift
        if not c & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            _invalid(what, "malformed protobuf")


def _fields(b, what):
    """(field number, wire type, value): an int for varints, a memoryview slice otherwise."""
    i, end = 0, len(b)
    while i < end:
        key, i = _varint(b, i, what)
        fn, wt = key >> 3, key & 7
        if fn == 0:
            _invalid(what, "field number 0")
        if wt == 0:
            v, i = _varint(b, i, what)
        elif wt == 1:
            v, i = b[i:i + 8], i + 8
        elif wt == 5:
            v, i = b[i:i + 4], i + 4
        elif wt == 2:
            n, i = _varint(b, i, what)
            if i + n > end:
                _invalid(what, "truncated protobuf")
            v, i = b[i:i + n], i + n
        else:
            _invalid(what, f"protobuf wire type {wt}")
        if i > end:
            _invalid(what, "truncated protobuf")
        yield fn, wt, v


def _str(v) -> str:
    return bytes(v).decode("utf-8", "replace")


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _packed_varints(v, what) -> list:
    out, i = [], 0
    while i < len(v):
        x, i = _varint(v, i, what)
        out.append(_signed(x))
    return out


class _Record:
    """A parsed message: fields with defaults (plain classes: a ``dataclass`` costs ~1 ms of
    import time each, and this module is on ``predict``'s cold-start path)."""
    __slots__ = ()
    _defaults: dict = {}

    def __init__(self, **values):
        for k, v in self._defaults.items():
            setattr(self, k, v() if callable(v) else v)
        for k, v in values.items():
            setattr(self, k, v)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self._defaults)})"


class Tensor(_Record):
    # held: values in the typed fields (float_data, int32_data, ...); ints: a small integer tensor's values
    _defaults = {"name": "", "dims": list, "data_type": 0, "raw_len": None, "held": 0, "string_bytes": 0,
                 "external": None, "ints": None}
    __slots__ = tuple(_defaults)


class Attr(_Record):
    _defaults = {"name": "", "i": None, "ints": list, "floats": 0, "t": None, "tensors": list, "graphs": list,
                 "sparse": False}
    __slots__ = tuple(_defaults)


class Node(_Record):
    _defaults = {"op_type": "", "domain": "", "name": "", "inputs": list, "outputs": list, "attrs": list}
    __slots__ = tuple(_defaults)


class Graph(_Record):
    # inputs / outputs: (name, elem type name, dims or None)
    _defaults = {"nodes": list, "initializers": list, "inputs": list, "outputs": list, "sparse_initializers": 0}
    __slots__ = tuple(_defaults)


class Model(_Record):
    _defaults = {"graph": None, "opsets": list, "functions": 0, "training_info": 0}
    __slots__ = tuple(_defaults)


def _count_varints(v) -> int:
    import numpy as np

    return int(np.count_nonzero(np.frombuffer(v, np.uint8) < 0x80))


def _tensor(b, what) -> Tensor:
    t = Tensor()
    raw_small, typed = None, []
    for fn, wt, v in _fields(b, what):
        if fn == 1:
            t.dims.extend(_packed_varints(v, what) if wt == 2 else [_signed(v)])
        elif fn == 2 and wt == 0:
            t.data_type = v
        elif fn == 8 and wt == 2:
            t.name = _str(v)
        elif fn == 9 and wt == 2:
            t.raw_len = len(v)
            raw_small = bytes(v) if len(v) <= 128 else None
        elif fn == 4:  # float_data
            t.held += len(v) // 4 if wt == 2 else 1
        elif fn == 10:  # double_data
            t.held += len(v) // 8 if wt == 2 else 1
        elif fn in (5, 7, 11):  # int32_data, int64_data, uint64_data (varints)
            if wt == 2 and len(v) > 160:
                t.held += _count_varints(v)
                typed = None
            else:
                vals = _packed_varints(v, what) if wt == 2 else [_signed(v)]
                t.held += len(vals)
                if typed is not None and fn in (5, 7):
                    typed.extend(vals)
        elif fn == 6 and wt == 2:  # string_data
            t.held += 1
            t.string_bytes += len(v)
        elif fn == 13 and wt == 2:
            key = val = None
            for f2, w2, v2 in _fields(v, what):
                if f2 == 1 and w2 == 2:
                    key = _str(v2)
                elif f2 == 2 and w2 == 2:
                    val = _str(v2)
            t.external = t.external or {}
            if key is not None:
                t.external[key] = val
        elif fn == 14 and wt == 0 and v == 1:
            t.external = t.external or {}
    width = {6: 4, 7: 8}.get(t.data_type)
    if raw_small is not None and width and len(raw_small) % width == 0:
        t.ints = [int.from_bytes(raw_small[k:k + width], "little", signed=True) for k in range(0, len(raw_small), width)]
    elif typed and len(typed) <= 16 and width:
        t.ints = typed
    return t


def _value_info(b, what):
    name, elem, dims = "", None, None
    for fn, wt, v in _fields(b, what):
        if fn == 1 and wt == 2:
            name = _str(v)
        elif fn == 2 and wt == 2:
            for f2, w2, v2 in _fields(v, what):
                if f2 == 1 and w2 == 2:  # tensor_type
                    for f3, w3, v3 in _fields(v2, what):
                        if f3 == 1 and w3 == 0:
                            elem = v3
                        elif f3 == 2 and w3 == 2:
                            dims = []
                            for f4, w4, v4 in _fields(v3, what):
                                if f4 == 1 and w4 == 2:
                                    d = None
                                    for f5, w5, v5 in _fields(v4, what):
                                        if f5 == 1 and w5 == 0:
                                            d = _signed(v5)
                                        elif f5 == 2 and w5 == 2:
                                            d = _str(v5)
                                    dims.append(d)
                else:
                    elem = -1  # a sequence, map, optional or sparse type: not a tensor
    return name, ELEM_TYPES.get(elem, (str(elem),))[0], dims


def _attr(b, what, depth) -> Attr:
    a = Attr()
    for fn, wt, v in _fields(b, what):
        if fn == 1 and wt == 2:
            a.name = _str(v)
        elif fn == 3 and wt == 0:
            a.i = _signed(v)
        elif fn == 8:
            a.ints.extend(_packed_varints(v, what) if wt == 2 else [_signed(v)])
        elif fn == 7:
            a.floats += len(v) // 4 if wt == 2 else 1
        elif fn == 5 and wt == 2:
            a.t = _tensor(v, what)
        elif fn == 10 and wt == 2:
            a.tensors.append(_tensor(v, what))
        elif fn in (6, 11) and wt == 2:
            a.graphs.append(_graph(v, what, depth + 1))
        elif fn in (22, 23):
            a.sparse = True
    return a


def _node(b, what, depth) -> Node:
    n = Node()
    for fn, wt, v in _fields(b, what):
        if fn == 1 and wt == 2:
            n.inputs.append(_str(v))
        elif fn == 2 and wt == 2:
            n.outputs.append(_str(v))
        elif fn == 3 and wt == 2:
            n.name = _str(v)
        elif fn == 4 and wt == 2:
            n.op_type = _str(v)
        elif fn == 7 and wt == 2:
            n.domain = _str(v)
        elif fn == 5 and wt == 2:
            n.attrs.append(_attr(v, what, depth))
    return n


def _graph(b, what, depth=0) -> Graph:
    if depth > MAX_DEPTH:
        _refuse(what, f"subgraphs nest deeper than {MAX_DEPTH} levels")
    g = Graph()
    for fn, wt, v in _fields(b, what):
        if wt != 2:
            continue
        if fn == 1:
            g.nodes.append(_node(v, what, depth))
        elif fn == 5:
            g.initializers.append(_tensor(v, what))
        elif fn == 11:
            g.inputs.append(_value_info(v, what))
        elif fn == 12:
            g.outputs.append(_value_info(v, what))
        elif fn == 15:
            g.sparse_initializers += 1
    return g


def parse(data, what: str = "ONNX model") -> Model:
    """The parts of an ONNX ModelProto the audit needs (large payloads are sliced, not copied)."""
    b = memoryview(data)
    m = Model()
    for fn, wt, v in _fields(b, what):
        if fn == 7 and wt == 2:
            m.graph = _graph(v, what)
        elif fn == 8 and wt == 2:
            dom, ver = "", None
            for f2, w2, v2 in _fields(v, what):
                if f2 == 1 and w2 == 2:
                    dom = _str(v2)
                elif f2 == 2 and w2 == 0:
                    ver = v2
            m.opsets.append((dom, ver))
        elif fn == 25:
            m.functions += 1
        elif fn == 20:
            m.training_info += 1
    if m.graph is None or not (m.graph.nodes or m.graph.outputs):
        _invalid(what, "no graph")
    return m


def read_io_signature(data, what: str = "ONNX model"):
    """``(inputs, outputs)`` as ``[(name, dtype, dims)]``; inputs that are initializers are left out."""
    g = parse(data, what).graph
    inits = {t.name for t in g.initializers}
    return [i for i in g.inputs if i[0] not in inits], list(g.outputs)


# ----------------------------------------------------------------------------- the audit

def _graphs(g, path="graph"):
    yield path, g
    for n in g.nodes:
        for a in n.attrs:
            for k, sub in enumerate(a.graphs):
                yield from _graphs(sub, f"{path}/{n.op_type} {n.name!r}.{a.name}" + (f"[{k}]" if len(a.graphs) > 1 else ""))


def _numel(dims):
    n = 1
    for d in dims:
        if not isinstance(d, int) or d < 0:
            return None
        n *= d
    return n


def _check_tensor(t: Tensor, where, what, model_dir, totals):
    name = t.name or where
    n = _numel(t.dims)
    if n is None:
        _refuse(what, f"tensor {name!r} declares a negative dimension {t.dims}")
    if n > MAX_ELEMENTS:
        _refuse(what, f"tensor {name!r} ({where}) declares {n:,} values {t.dims}; at most {MAX_ELEMENTS:,} allowed")
    et = ELEM_TYPES.get(t.data_type)
    if et is None:
        _refuse(what, f"tensor {name!r} has unknown data type {t.data_type}")
    size = et[1]
    nbytes = math.ceil(n * size) if size else t.string_bytes
    if t.external is not None:
        if size is None:
            _refuse(what, f"tensor {name!r}: external string data is not allowed")
        _check_external(name, t.external, nbytes, what, model_dir)
    elif t.raw_len is not None:
        if size is not None and t.raw_len != nbytes:
            _refuse(what, f"tensor {name!r} declares {t.dims} ({nbytes:,} bytes) but holds {t.raw_len:,} bytes")
    elif t.held != n and not (n == 0 and t.held == 0):
        _refuse(what, f"tensor {name!r} declares {n:,} values but holds {t.held:,}")
    if nbytes > MAX_TENSOR_BYTES:
        _refuse(what, f"tensor {name!r} is {nbytes:,} bytes; at most {MAX_TENSOR_BYTES:,} allowed")
    totals[0] += nbytes
    if totals[0] > MAX_TOTAL_BYTES:
        _refuse(what, f"the model's tensors add up to more than {MAX_TOTAL_BYTES:,} bytes")


def _check_external(name, info, nbytes, what, model_dir):
    loc = info.get("location") or ""
    if not loc or os.path.isabs(loc) or "\\" in loc or "\0" in loc or any(p in ("..", "", ".") for p in loc.split("/")):
        _refuse(what, f"external data '{loc}' of tensor {name!r} points outside the model's folder; refusing it "
                      "(only a plain relative path inside it is allowed)")
    if model_dir is None:
        _refuse(what, f"tensor {name!r} uses external data '{loc}'; not allowed here")
    cur = os.fspath(model_dir)
    st = None
    for part in loc.split("/"):
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            _refuse(what, f"external data file '{loc}' of tensor {name!r} does not exist")
        if stat.S_ISLNK(st.st_mode):
            _refuse(what, f"external data '{loc}' of tensor {name!r} goes through a symbolic link, which may point "
                          "outside the model's folder; refusing it")
    if not stat.S_ISREG(st.st_mode):
        _refuse(what, f"external data '{loc}' of tensor {name!r} is not a regular file")
    try:
        off = int(info.get("offset") or 0)
        length = int(info["length"]) if info.get("length") is not None else st.st_size - off
    except ValueError:
        _refuse(what, f"external data of tensor {name!r} has a non-integer offset or length")
    if off < 0 or length < 0 or off + length > st.st_size:
        _refuse(what, f"external data of tensor {name!r} reads bytes {off}..{off + length} of '{loc}', which "
                      f"holds {st.st_size}")
    if length != nbytes:
        _refuse(what, f"external data of tensor {name!r} is {length:,} bytes; its shape needs {nbytes:,}")


def _expected_signature(g: Graph, what, n_classes):
    inits = {t.name for t in g.initializers}
    ins = [i for i in g.inputs if i[0] not in inits]
    # int64: the twins of ``--onnx-int64`` (ids widened exactly by the runner)
    if [(n, t in ("int32", "int64"), None if d is None else len(d)) for n, t, d in ins] != [(INPUT, True, 2)]:
        got = ", ".join(f"{n} {t} rank {None if d is None else len(d)}" for n, t, d in ins) or "none"
        _refuse(what, f"inputs are [{got}]; expected exactly one: {INPUT} int32 (or int64) rank 2 [batch, sequence]")
    outs = {n: (t, d) for n, t, d in g.outputs}
    if len(outs) != len(g.outputs) or PROBABILITIES not in outs \
            or any(n != ATTENTION and not is_head(n) for n in outs):
        _refuse(what, f"outputs are {[o[0] for o in g.outputs]}; expected {PROBABILITIES}, further heads "
                      f"{PROBABILITIES}_NAME and optionally {ATTENTION}")
    for name, (t, d) in outs.items():
        if t != "float" or d is None or len(d) != 2:
            _refuse(what, f"output {name} is {t} rank {None if d is None else len(d)}; expected float rank 2")
    classes = outs[PROBABILITIES][1][1]
    if n_classes is not None and isinstance(classes, int) and classes != n_classes:
        _refuse(what, f"output {PROBABILITIES} has {classes} classes; the bundle has {n_classes} labels")
    return ins, list(g.outputs)


_SAME_SHAPE = {"Cast", "Identity", "Relu", "Sigmoid", "Tanh", "Neg", "Not", "Exp", "Log", "Sqrt", "Abs",
               "Softmax", "LogSoftmax", "Reciprocal", "Transpose", "Erf", "Clip", "LeakyRelu", "Softplus",
               "Dropout", "IsNaN", "IsInf", "Sign", "Floor", "Ceil", "Round", "ReverseSequence",
               "LayerNormalization", "BatchNormalization", "DequantizeLinear", "QuantizeLinear", "ReduceMax",
               "ReduceMin", "ReduceMean", "ReduceSum", "ReduceProd", "Squeeze", "Unsqueeze", "ScatterND"}
_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
              "And", "Or", "Xor", "Where", "Max", "Min", "MatMul", "MatMulInteger", "Concat", "Gemm"}


class _Bounds:
    """Upper bounds of integer values and of dims, from constants and the input's caps,
    following only ops that cannot raise them."""

    def __init__(self, consts, producers, input_dims, init_dims):
        self.consts, self.producers = consts, producers
        self.input_dims, self.init_dims = input_dims, init_dims

    def max_dim(self, name, depth=0):
        """Largest dim of tensor ``name``, or None."""
        if name in self.input_dims:
            return max(self.input_dims[name], default=1)
        if name in self.init_dims:
            return max(self.init_dims[name], default=1)
        n = self.producers.get(name)
        if n is None or depth > 64:
            return None
        if n.op_type in _SAME_SHAPE:
            d = self.max_dim(n.inputs[0], depth + 1)
            return None if d is None else max(d, 1)
        if n.op_type == "Gather" and len(n.inputs) >= 2:
            data = self.init_dims.get(n.inputs[0])
            a = max(data[1:], default=1) if data is not None else self.max_dim(n.inputs[0], depth + 1)
            b = self.max_dim(n.inputs[1], depth + 1)
            return None if a is None or b is None else max(a, b)
        if n.op_type in _BROADCAST:
            dims = [self.max_dim(i, depth + 1) for i in n.inputs if i]
            if n.op_type == "Concat":
                return None  # the concatenated axis adds up
            return None if any(d is None for d in dims) else max(dims, default=1)
        return None

    def value(self, name, depth=0):
        """Largest value of integer tensor ``name``, or None."""
        if name in self.consts:
            return max(self.consts[name]) if self.consts[name] else 0
        n = self.producers.get(name)
        if n is None or depth > 64:
            return None
        if n.op_type == "Shape":
            return self.max_dim(n.inputs[0])
        if n.op_type in ("Gather", "Slice", "Squeeze", "Unsqueeze", "Cast", "Identity", "Reshape", "ReduceMin",
                         "ReduceMax", "Flatten"):
            return self.value(n.inputs[0], depth + 1)
        if n.op_type in ("Concat", "Max"):
            bounds = [self.value(i, depth + 1) for i in n.inputs if i]
            return None if any(b is None for b in bounds) else max(bounds, default=0)
        if n.op_type == "Min":
            known = [b for b in (self.value(i, depth + 1) for i in n.inputs if i) if b is not None]
            return min(known) if known else None
        return None

    def lower(self, name):
        """Smallest value of a constant integer tensor, or None."""
        vals = self.consts.get(name)
        return min(vals) if vals else None


def _through(name, producers, ops=("Cast", "Identity")):
    while name in producers and producers[name].op_type in ops:
        name = producers[name].inputs[0]
    return name


def _loop_trips(n: Node, outer: _Bounds):
    """An upper bound of a Loop's iterations, or None. A trip count input bounded by a
    constant or the input's dims; or, with no trip count, the while-loop pattern converters
    emit: the condition is ``counter < limit`` (possibly and-ed with more), where the counter
    is the iteration number or a loop-carried value that starts at a constant and grows by a
    positive constant each step, and the limit is bounded and passed through unchanged."""
    if n.inputs and n.inputs[0]:
        return outer.value(n.inputs[0])
    body = next((g for a in n.attrs if a.name == "body" for g in a.graphs), None)
    if body is None or len(body.outputs) < 1 or len(body.inputs) < 2:
        return None
    bprod = {o: q for q in body.nodes for o in q.outputs}
    bconsts = {t.name: t.ints for t in body.initializers if t.ints is not None}
    for q in body.nodes:
        for a in q.attrs:
            if q.op_type == "Constant" and a.t is not None and a.t.ints is not None:
                bconsts[q.outputs[0]] = a.t.ints
    b_in = [i[0] for i in body.inputs]
    b_out = [o[0] for o in body.outputs]
    carried = {name: k for k, name in enumerate(b_in[2:])}  # body input -> index of the Loop's initial value

    def const(name):
        name = _through(name, bprod)
        vals = bconsts.get(name) or outer.consts.get(name)
        return min(vals) if vals else None

    def limit(name):
        """Bound of a loop-invariant value: a carried input passed through unchanged, or outer."""
        name = _through(name, bprod)
        if name in carried:
            k = carried[name]
            if k + 1 < len(b_out) and _through(b_out[k + 1], bprod) == name and len(n.inputs) > k + 2:
                return outer.value(n.inputs[k + 2])
            return None
        if name in bprod or name in b_in:
            return None
        return outer.value(name) if name not in bconsts else max(bconsts[name])

    def counter_trips(less):
        a, b = less.inputs[0], less.inputs[1]
        lim = limit(b)
        if lim is None:
            return None
        a = _through(a, bprod)
        if a == b_in[0]:  # the iteration number: 0, 1, 2, ...
            return lim + 1
        q = bprod.get(a)  # the next value of a carried counter: v + step
        if q is None or q.op_type != "Add":
            return None
        for v, step in ((q.inputs[0], q.inputs[1]), (q.inputs[1], q.inputs[0])):
            v = _through(v, bprod)
            s = const(step)
            if v in carried and s is not None and s >= 1:
                k = carried[v]
                if k + 1 < len(b_out) and _through(b_out[k + 1], bprod) == a and len(n.inputs) > k + 2:
                    start = outer.lower(_through(n.inputs[k + 2], outer.producers))
                    if start is not None:
                        return max(0, (lim - start) // s + 1)
        return None

    def trips(name, depth=0):
        q = bprod.get(_through(name, bprod))
        if q is None or depth > 8:
            return None
        if q.op_type == "Less":
            return counter_trips(q)
        if q.op_type == "And":
            known = [t for t in (trips(i, depth + 1) for i in q.inputs) if t is not None]
            return min(known) if known else None
        return None

    return trips(b_out[0])


def audit(data, *, what: str = "ONNX model", model_dir=None, vocab_size: int | None = None,
          n_classes: int | None = None, dim_caps=(1 << 14, 1 << 15), check_signature: bool = True) -> dict:
    """Refuse what the module docstring lists; return ``{"inputs", "outputs", "ops",
    "embedding_rows", "float16", "quantized", "external_data"}``. ``dim_caps``: the largest
    batch and sequence a caller will feed (bounds ``Loop`` trip counts taken from them)."""
    m = parse(data, what)
    for dom, _ in m.opsets:
        if dom not in ALLOWED_DOMAINS:
            _refuse(what, f"opset domain {dom!r} is not allowed; allowed: the standard ones ('', ai.onnx, ai.onnx.ml)")
    if m.functions:
        _refuse(what, "model-local functions are not allowed (their bodies run like nodes but are not graphs)")
    if m.training_info:
        _refuse(what, "training information (graphs run at initialisation) is not allowed")
    g = m.graph
    ins, outs = _expected_signature(g, what, n_classes) if check_signature else (g.inputs, g.outputs)

    totals, ops, consts, loops = [0], set(), {}, []
    float16 = quantized = external = False
    producers = {}
    for gpath, sub in _graphs(g):
        if sub.sparse_initializers:
            _refuse(what, "sparse initializers are not allowed")
        for t in sub.initializers:
            _check_tensor(t, f"initializer in {gpath}", what, model_dir, totals)
            float16 |= t.data_type == 10
            external |= t.external is not None
            if t.ints is not None and t.data_type in (6, 7):
                consts[t.name] = t.ints
        for n in sub.nodes:
            ops.add(n.op_type)
            for o in n.outputs:
                producers[o] = n
            if n.domain not in ALLOWED_DOMAINS:
                _refuse(what, f"op {n.domain}.{n.op_type} (node {n.name!r}) is not in a standard domain")
            if n.op_type not in ALLOWED_OPS:
                _refuse(what, f"op {n.op_type} (node {n.name!r} in {gpath}) is not allowed; allowed: the "
                              f"{len(ALLOWED_OPS)} ops of probattn's exported classifiers and element-wise ops")
            quantized |= n.op_type in QUANTIZED_OPS
            if n.op_type == "Loop":
                loops.append((n, gpath))
            if n.op_type == "Conv":
                pads = next((a.ints for a in n.attrs if a.name == "pads"), [])
                if any(p < 0 or p > MAX_CONV_PAD for p in pads):
                    _refuse(what, f"Conv {n.name!r} in {gpath} pads {pads}; at most {MAX_CONV_PAD} per side allowed")
            for a in n.attrs:
                if a.sparse:
                    _refuse(what, f"sparse tensor attribute on {n.op_type} {n.name!r} is not allowed")
                for t in ([a.t] if a.t is not None else []) + a.tensors:
                    _check_tensor(t, f"attribute {a.name} of {n.op_type} {n.name!r}", what, model_dir, totals)
                    float16 |= t.data_type == 10
                    external |= t.external is not None
                    if n.op_type == "Constant" and t.ints is not None and t.data_type in (6, 7):
                        consts[n.outputs[0]] = t.ints
                if len(a.ints) + a.floats > MAX_ELEMENTS:
                    _refuse(what, f"attribute {a.name} of {n.op_type} {n.name!r} is too long")

    input_dims = {}
    for name, _, dims in ins:
        if dims is not None:
            input_dims[name] = [d if isinstance(d, int) and d > 0 else dim_caps[min(k, len(dim_caps) - 1)]
                                for k, d in enumerate(dims)]
    for _, sub in _graphs(g):  # expanding ops with constant sizes: refused without running anything
        for n in sub.nodes:
            size = _constant_output_size(n, consts)
            if size is not None and size > MAX_ELEMENTS:
                _refuse(what, f"{n.op_type} {n.name!r} makes {size:,} values; at most {MAX_ELEMENTS:,} allowed")
    bounds = _Bounds(consts, producers, input_dims, {t.name: t.dims for _, sub in _graphs(g) for t in sub.initializers})
    for n, gpath in loops:
        bound = _loop_trips(n, bounds)
        if bound is None or bound > MAX_LOOP_TRIPS:
            _refuse(what, f"Loop {n.name!r} in {gpath} has a trip count "
                          f"{'that cannot be bounded before running it' if bound is None else f'of up to {bound:,}'}; "
                          f"at most {MAX_LOOP_TRIPS:,}, from a constant or the input's dims, allowed")

    # the embedding: a Gather of an initializer [rows, dim] by the token ids
    init_dims = {t.name: t.dims for t in g.initializers}
    rows = [init_dims[n.inputs[0]][0] for n in g.nodes
            if n.op_type == "Gather" and len(n.inputs) >= 2 and n.inputs[1] == INPUT
            and len(init_dims.get(n.inputs[0], ())) == 2]
    embedding_rows = min(rows) if rows else None
    if vocab_size is not None and embedding_rows is not None and vocab_size > embedding_rows:
        _refuse(what, f"the embedding has {embedding_rows:,} rows but the bundle's vocabulary has {vocab_size:,} ids; "
                      "ids past the table would be looked up")
    return {"inputs": [list(i) for i in ins], "outputs": [list(o) for o in outs], "ops": sorted(ops),
            "embedding_rows": embedding_rows, "float16": float16, "quantized": quantized,
            "external_data": external}


def _constant_output_size(n: Node, consts):
    """Values an expanding op makes when its size inputs are constants, else None."""
    def c(k):
        return consts.get(n.inputs[k]) if len(n.inputs) > k and n.inputs[k] else None

    if n.op_type in ("ConstantOfShape", "Expand"):
        shape = c(0 if n.op_type == "ConstantOfShape" else 1)
        return math.prod(max(d, 1) for d in shape) if shape else None
    if n.op_type == "Range":
        start, limit, delta = c(0), c(1), c(2)
        if start and limit and delta and len(start) == len(limit) == len(delta) == 1 and delta[0]:
            return max(0, math.ceil((limit[0] - start[0]) / delta[0]))
    return None


def precision_problem(report: dict, precision: str) -> str | None:
    """Why the graph does not hold ``precision`` (fp32: no float16 tensor and no quantized
    op; fp16: float16 tensors; int8: quantized ops), or None."""
    if precision == "fp32" and (report["float16"] or report["quantized"]):
        return "it holds " + ("float16 tensors" if report["float16"] else "quantized ops") + ", not fp32 weights"
    if precision == "fp16" and not report["float16"]:
        return "it holds no float16 tensor"
    if precision.startswith("int8") and not report["quantized"]:
        return "it holds no quantized op"
    return None


def shape_check(data, dim_caps, what: str = "ONNX model") -> int:
    """With ``onnx`` (export and verify): shape inference with the input's symbolic dims at
    ``dim_caps`` (batch, sequence); refuse a tensor over ``MAX_ELEMENTS`` values. Returns the
    largest static size seen."""
    import onnx

    model = onnx.ModelProto()
    try:
        model.ParseFromString(bytes(data))
    except Exception as e:
        _invalid(what, type(e).__name__)
    for inp in model.graph.input:
        for k, d in enumerate(inp.type.tensor_type.shape.dim):
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = dim_caps[min(k, len(dim_caps) - 1)]
    for t in model.graph.initializer:  # inference needs shapes and small constants only
        if _numel(list(t.dims)) is None or _numel(list(t.dims)) > 64:
            t.ClearField("raw_data")
            for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                t.ClearField(f)
            if t.data_location == onnx.TensorProto.EXTERNAL:
                t.ClearField("external_data")
                t.data_location = onnx.TensorProto.DEFAULT
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:
        _refuse(what, f"shape inference failed ({type(e).__name__}: {' '.join(str(e).split())[:120]})")
    biggest = 0
    values = list(inferred.graph.value_info) + list(inferred.graph.output)
    for v in values:
        tt = v.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        static = math.prod(d for d in dims if d)  # unknown dims count as 1: a lower bound
        biggest = max(biggest, static)
        if static > MAX_ELEMENTS:
            _refuse(what, f"tensor {v.name!r} gets shape {dims} with inputs of at most {list(dim_caps)}: "
                          f"{static:,} values; at most {MAX_ELEMENTS:,} allowed")
    return biggest

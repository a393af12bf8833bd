"""Reading and rewriting TFLite flatbuffers without TensorFlow (numpy, flatbuffers and the
TFLite schema's Python bindings that ship with ``ai-edge-litert``).

Not a format module: the TFLite-family formats and the runtimes share it.

``rewrite_io`` gives raw clients (C++ ``interpreter->outputs()``, TFLite Micro, the
Python ``get_output_details()``) what signature runners already see: every signature
input and output tensor is renamed to its signature name (``serving_default_token_ids:0``
becomes ``token_ids``, ``StatefulPartitionedCall:1`` becomes ``probabilities``) and the
subgraph's and signature's outputs are put in contract order, the primary output first.
Nothing else changes: tensors, buffers, operators and quantization are copied as they are.

Pitfall handled: the generated object API packs ``Buffer.data`` with 1-byte alignment (it
ignores the schema's ``force_align: 16``), while the converter writes 16-byte aligned
buffers and TFLite Micro reads constant data in place. Buffers are re-packed 16-byte
aligned here and the result is checked.
"""
from __future__ import annotations

import numpy as np

#: constant buffers start at a multiple of this many bytes from the file's start
BUFFER_ALIGN = 16
_TFL_IDENTIFIER = b"TFL3"


def schema():
    """The TFLite schema's generated Python module."""
    try:
        from ai_edge_litert import schema_py_generated as s
    except ImportError:  # pragma: no cover - ai-edge-litert is a dependency
        from tflite_micro.tensorflow.lite.python import schema_py_generated as s
    return s


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else x


def _aligned_buffer_class(s):
    class AlignedBufferT(s.BufferT):
        """``BufferT`` whose data vector starts on a ``BUFFER_ALIGN`` boundary."""

        def Pack(self, builder):
            data = None
            if self.data is not None and len(self.data):
                payload = np.asarray(self.data, dtype=np.uint8).tobytes()
                builder.StartVector(1, len(payload), BUFFER_ALIGN)
                builder.head -= len(payload)
                builder.Bytes[builder.head: builder.head + len(payload)] = payload
                builder.vectorNumElems = len(payload)
                data = builder.EndVector()
            s.BufferStart(builder)
            if data is not None:
                s.BufferAddData(builder, data)
            s.BufferAddOffset(builder, self.offset)
            s.BufferAddSize(builder, self.size)
            return s.BufferEnd(builder)

    return AlignedBufferT


def _ordered(maps, order) -> list:
    """``maps`` sorted by ``order``: a sequence of names, or a function that orders names
    (``contract.ordered_outputs``: further heads between probabilities and attention)."""
    if callable(order):
        order = order([_text(m.name) for m in maps])
    rank = {n: i for i, n in enumerate(order)}
    return sorted(maps, key=lambda m: (rank.get(_text(m.name), len(rank)), maps.index(m)))


def rewrite_io(blob: bytes, output_order) -> bytes:
    """Signature names as raw tensor names, outputs in ``output_order``, 16-byte aligned
    constant buffers. Raises ValueError on a file it cannot rewrite faithfully."""
    import flatbuffers

    s = schema()
    model = s.ModelT.InitFromPackedBuf(bytearray(blob), 0)
    if not model.signatureDefs:
        raise ValueError("the model has no signature to take tensor names from")
    if any((b.offset or 0) > 1 for b in model.buffers or []):
        raise ValueError("the model keeps its buffers outside the flatbuffer (a >2 GB layout)")
    for sig in model.signatureDefs:
        sg = model.subgraphs[sig.subgraphIndex]
        sig.outputs = _ordered(list(sig.outputs), output_order)
        for m in list(sig.inputs) + list(sig.outputs):
            sg.tensors[m.tensorIndex].name = _text(m.name)
        order = [m.tensorIndex for m in sig.outputs]
        if sorted(order) != sorted(int(t) for t in sg.outputs):
            raise ValueError("the signature's outputs are not the subgraph's outputs")
        sg.outputs = np.asarray(order, dtype=np.int32)
    aligned = _aligned_buffer_class(s)
    buffers = []
    for b in model.buffers:
        nb = aligned()
        nb.data, nb.offset, nb.size = b.data, b.offset, b.size
        buffers.append(nb)
    model.buffers = buffers
    builder = flatbuffers.Builder(len(blob) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=_TFL_IDENTIFIER)
    out = bytes(builder.Output())
    misaligned = unaligned_buffers(out)
    if misaligned:
        raise ValueError(f"{len(misaligned)} constant buffers are not {BUFFER_ALIGN}-byte aligned after the rewrite")
    return out


def unaligned_buffers(blob: bytes, align: int = BUFFER_ALIGN) -> list:
    """``(offset, length)`` of every non-empty constant buffer whose data does not start on
    an ``align``-byte boundary of the file."""
    s = schema()
    m = s.Model.GetRootAs(blob, 0)
    bad = []
    for i in range(m.BuffersLength()):
        b = m.Buffers(i)
        n = b.DataLength()
        if n:
            start = b._tab.Vector(b._tab.Offset(4))  # where the data vector's bytes begin
            if start % align:
                bad.append((start, n))
    return bad


def describe(blob: bytes, model=None, ops: bool = True) -> dict:
    """What a raw client sees: subgraph 0's inputs and outputs in order (name, dtype, shape,
    shape signature, quantization), the signatures, and (``ops``) the builtin ops in
    first-use order. ``model``: the blob's ``tflite_read.read`` when the caller has it."""
    from .tflite_read import read, type_name

    m = model if model is not None else read(blob)
    sg = m.subgraphs[0]

    def tensor(i):
        t = sg.tensors[i]
        q = t.quantization
        quant = None
        if q is not None and q.scale is not None and len(q.scale):
            quant = {"scale": [float(x) for x in q.scale], "zero_point": [int(x) for x in q.zeroPoint or ()]}
        shape = [int(x) for x in t.shape] if t.shape is not None else []
        sig = [int(x) for x in t.shapeSignature] if t.shapeSignature is not None else shape
        return {"name": _text(t.name), "dtype": type_name(t.type), "shape": shape,
                "shape_signature": sig, "quantization": quant}

    info = {
        "inputs": [tensor(i) for i in sg.inputs or ()],
        "outputs": [tensor(i) for i in sg.outputs or ()],
        "signatures": {_text(d.signatureKey): {"inputs": [_text(x.name) for x in d.inputs or ()],
                                                "outputs": [_text(x.name) for x in d.outputs or ()]}
                       for d in (m.signatureDefs or [])},
        "has_metadata": any(_text(md.name) == "TFLITE_METADATA" for md in (m.metadata or [])),
    }
    if ops:
        info["ops"] = op_list(m)
    return info


def op_list(model) -> list:
    """Builtin op names of a model (``tflite_read.read``'s or bytes), in first-use order, with
    counts: what a TFLite Micro op resolver has to register."""
    from .tflite_read import op_code, op_name, read

    if isinstance(model, (bytes, bytearray)):
        model = read(model)
    counts = {}
    for sg in model.subgraphs or []:
        for op in sg.operators or []:
            code = model.operatorCodes[op.opcodeIndex]
            value = op_code(code)
            name = op_name(value) or str(value)
            if name == "CUSTOM":
                name = f"CUSTOM:{_text(code.customCode)}"
            counts[name] = counts.get(name, 0) + 1
    return [{"op": k, "count": v} for k, v in counts.items()]


def op_input_dtypes(blob: bytes) -> dict:
    """Builtin op name -> the set of dtypes of its first input, over every use (which ops a
    full-int8 file runs in float)."""
    from .tflite_read import op_code, op_name, read, type_name

    m = read(blob)
    out = {}
    for sg in m.subgraphs or []:
        for op in sg.operators or []:
            name = op_name(op_code(m.operatorCodes[op.opcodeIndex]))
            if op.inputs is not None and len(op.inputs) and op.inputs[0] >= 0:
                out.setdefault(name, set()).add(type_name(sg.tensors[op.inputs[0]].type))
    return out

"""The struct-level TFLite reader (``export/formats/tflite_read.py``) against the schema's own
Python bindings: the enum values it names, every field it reads on every exported TFLite
file, and damaged bytes (refused with ``FlatbufferError``, never read past the file)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from probattn.export.formats import tflite_read as R
from probattn.export.formats.tflite_flatbuffer import schema


def _enum(cls) -> dict:
    return {k: v for k, v in vars(cls).items() if not k.startswith("_")}


def test_named_enum_values_are_the_installed_schema_s():
    s = schema()
    types = {v: k.lower() for k, v in _enum(s.TensorType).items()}
    assert {i: n for i, n in enumerate(R.TENSOR_TYPES)} == {i: types[i] for i in range(len(R.TENSOR_TYPES))}
    ops = _enum(s.BuiltinOperator)
    assert R.OP_CODES == {k: ops[k] for k in R.OP_CODES}
    # every code up to LAST_KNOWN_OP is a builtin op: the reader's fast "no rule" test is exact
    assert set(range(R.LAST_KNOWN_OP + 1)) <= set(ops.values())
    assert R.WHILE_OPTIONS_TAG == s.BuiltinOptions.WhileOptions
    names = {v: k for k, v in ops.items()}
    assert all(R.op_name(v) == names[v] for v in range(R.LAST_KNOWN_OP + 1))
    assert R.op_name(max(ops.values()) + 1) is None and R.op_name(-1) is None


def _numbers(x):
    return None if x is None else [int(v) if not isinstance(v, float) else float(v) for v in np.asarray(x).tolist()]


def _view(m) -> dict:
    """The fields the reader reads, from either reader, as plain values."""
    def text(x):
        return x.decode() if isinstance(x, bytes) else x

    def tensor(t):
        q = t.quantization
        return (_numbers(t.shape), int(t.type), text(t.name), _numbers(t.shapeSignature),
                None if q is None else (_numbers(q.scale), _numbers(q.zeroPoint)))

    def op(o):
        w = o.builtinOptions
        loop = (w.condSubgraphIndex, w.bodySubgraphIndex) if w is not None and hasattr(w, "bodySubgraphIndex") else None
        return int(o.opcodeIndex), _numbers(o.inputs), _numbers(o.outputs), loop

    return {
        "codes": [(int(c.builtinCode), int(c.deprecatedBuiltinCode), text(c.customCode)) for c in m.operatorCodes or []],
        "subgraphs": [([tensor(t) for t in g.tensors or []], _numbers(g.inputs), _numbers(g.outputs),
                       [op(o) for o in g.operators or []]) for g in m.subgraphs or []],
        "signatures": [(text(d.signatureKey), int(d.subgraphIndex),
                        [(text(x.name), int(x.tensorIndex)) for x in d.inputs or []],
                        [(text(x.name), int(x.tensorIndex)) for x in d.outputs or []]) for d in m.signatureDefs or []],
        "metadata": [text(x.name) for x in m.metadata or []],
    }


def _tflite_files(bundle_dir) -> list:
    files = sorted(bundle_dir.glob("*.tflite"))
    assert len(files) >= 4, files
    return files


def test_reader_reads_what_the_schema_bindings_read(bundle_dir):
    s = schema()
    for path in _tflite_files(bundle_dir):
        blob = path.read_bytes()
        assert _view(R.read(blob)) == _view(s.ModelT.InitFromPackedBuf(bytearray(blob), 0)), path.name


def test_damaged_bytes_are_refused_not_read_past_the_end(bundle_dir):
    """Truncations and overwritten words either read (the damage hit bytes the reader does not
    look at) or raise FlatbufferError; no other exception, and a vector length past the end
    of the file is refused before it is allocated."""
    blob = min(_tflite_files(bundle_dir), key=lambda p: p.stat().st_size).read_bytes()
    for n in (0, 4, 8, 16, 64, 256, len(blob) // 3, len(blob) - 1):
        with pytest.raises(R.FlatbufferError, match="too short|outside|past the file's end"):
            R.read(blob[:n])
    rng = random.Random(0)
    refused, cases = 0, []
    for _ in range(300):
        b = bytearray(blob)
        at = rng.randrange(0, min(len(b) - 4, 4096))  # the tables sit before the weights
        b[at:at + 4] = rng.choice([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", bytes(rng.randrange(256) for _ in range(4))])
        cases.append(bytes(b))
    for case in cases:
        try:
            R.read(case)
        except R.FlatbufferError:
            refused += 1
    assert refused, "no overwritten word was caught"
    # the subgraph vector's length bent to 2**31 - 1: refused before anything is allocated
    r = R._Reader(blob)
    root = r.table(r.target(0))
    start = r.target(root._field(2))
    bent = bytearray(blob)
    bent[start:start + 4] = (2**31 - 1).to_bytes(4, "little")
    with pytest.raises(R.FlatbufferError, match="2,147,483,647 elements of 4 bytes, past the file's end"):
        R.read(bytes(bent))

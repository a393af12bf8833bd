"""A TFLite flatbuffer read field by field with ``struct``: what the byte-level audit and
``describe`` look at (op codes, subgraphs, tensors, operators, signatures, metadata
names), without the schema's generated Python module (30 ms to import) or unpacking the
whole object tree with every weight (another 30 ms for a 4.5 MB model). ``predict``
audits the file it runs on every start, so this is on the cold-start path.

Every read is bounds-checked against the file: a damaged or hostile flatbuffer raises
``FlatbufferError`` (a ``ValueError``), never reads outside the bytes, and a vector's
declared length is checked against the bytes left before anything is allocated. Only
fixed paths are followed (no recursion), so no file makes the reader loop.

Field slots follow the TFLite schema (``schema.fbs``); the numeric enum values this module
names (tensor types, a few builtin op codes, the ``WhileOptions`` union tag) are checked
against the installed schema module by ``tests/test_tflite_read.py``, and every reader
result is compared there with the schema's object API on every exported file.
"""
from __future__ import annotations

import functools
import struct

#: ``TensorType`` names (lower case) by code
TENSOR_TYPES = ("float32", "float16", "int32", "uint8", "int64", "string", "bool", "int16", "complex64", "int8",
                "float64", "complex128", "uint64", "resource", "variant", "uint32", "uint16", "int4", "bfloat16",
                "int2", "uint4", "float8_e4m3fn", "float8_e5m2")
#: ``BuiltinOperator`` codes of the ops the audit names; every code from 0 to
#: ``LAST_KNOWN_OP`` is a builtin op of the schema (a larger code is named by the schema
#: module itself, when it knows it)
OP_CODES = {"CALL": 31, "CUSTOM": 32, "IF": 118, "WHILE": 119, "CALL_ONCE": 129, "HASHTABLE_LOOKUP": 10,
            "HASHTABLE": 136, "HASHTABLE_FIND": 137, "HASHTABLE_IMPORT": 138, "HASHTABLE_SIZE": 139,
            "VAR_HANDLE": 142, "READ_VARIABLE": 143, "ASSIGN_VARIABLE": 144, "STABLEHLO_CUSTOM_CALL": 173,
            "STABLEHLO_REDUCE": 174, "STABLEHLO_SCATTER": 190, "STABLEHLO_REDUCE_WINDOW": 198, "STABLEHLO_SORT": 199,
            "STABLEHLO_WHILE": 200, "STABLEHLO_COMPOSITE": 206, "STABLEHLO_CASE": 209}
LAST_KNOWN_OP = 209
#: the ``BuiltinOptions`` union tag of ``WhileOptions``
WHILE_OPTIONS_TAG = 93


class FlatbufferError(ValueError):
    """The bytes are not a well-formed flatbuffer of the fields read."""


class _Reader:
    __slots__ = ("b", "n")

    def __init__(self, blob):
        self.b, self.n = blob, len(blob)

    def _at(self, pos: int, size: int) -> int:
        if not 0 <= pos <= self.n - size:
            raise FlatbufferError(f"a read of {size} bytes at {pos} is outside the {self.n:,}-byte file")
        return pos

    def scalar(self, fmt: str, pos: int):
        return struct.unpack_from(fmt, self.b, self._at(pos, struct.calcsize(fmt)))[0]

    def table(self, pos: int) -> "_Table":
        vt = pos - self.scalar("<i", pos)
        size = self.scalar("<H", vt)
        if size < 4 or size % 2:
            raise FlatbufferError(f"a vtable at {vt} declares {size} bytes")
        self._at(vt, size)
        return _Table(self, pos, vt, size)

    def target(self, pos: int) -> int:
        """Where the unsigned offset stored at ``pos`` points."""
        return pos + self.scalar("<I", pos)

    def vector(self, pos: int, elem: int) -> tuple:
        """``(first element's position, length)`` of the vector the offset at ``pos`` points to."""
        start = self.target(pos)
        length = self.scalar("<I", start)
        if length * elem > self.n - start - 4:
            raise FlatbufferError(f"a vector at {start} declares {length:,} elements of {elem} bytes, past the file's end")
        return start + 4, length


class _Table:
    __slots__ = ("r", "pos", "vt", "vt_size")

    def __init__(self, r, pos, vt, vt_size):
        self.r, self.pos, self.vt, self.vt_size = r, pos, vt, vt_size

    def _field(self, slot: int) -> int:
        """The field's position, 0 when absent."""
        o = 4 + 2 * slot
        if o + 2 > self.vt_size:
            return 0
        off = self.r.scalar("<H", self.vt + o)
        return self.pos + off if off else 0

    def scalar(self, slot: int, fmt: str, default=0):
        p = self._field(slot)
        return self.r.scalar(fmt, p) if p else default

    def string(self, slot: int):
        p = self._field(slot)
        if not p:
            return None
        start, n = self.r.vector(p, 1)
        return bytes(self.r.b[start:start + n])

    def numbers(self, slot: int, fmt: str):
        """A vector of scalars as a tuple; None when absent."""
        p = self._field(slot)
        if not p:
            return None
        start, n = self.r.vector(p, struct.calcsize(fmt))
        return struct.unpack_from(f"<{n}{fmt}", self.r.b, start)

    def tables(self, slot: int, cls) -> list | None:
        p = self._field(slot)
        if not p:
            return None
        start, n = self.r.vector(p, 4)
        return [cls(self.r.table(self.r.target(start + 4 * i))) for i in range(n)]

    def child(self, slot: int, cls):
        p = self._field(slot)
        return cls(self.r.table(self.r.target(p))) if p else None


def _text(x) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else x


class OperatorCode:
    __slots__ = ("builtinCode", "deprecatedBuiltinCode", "customCode")

    def __init__(self, t):
        self.deprecatedBuiltinCode = t.scalar(0, "<b")
        self.customCode = t.string(1)
        self.builtinCode = t.scalar(3, "<i")


class Quantization:
    __slots__ = ("scale", "zeroPoint")

    def __init__(self, t):
        self.scale, self.zeroPoint = t.numbers(2, "f"), t.numbers(3, "q")


class Tensor:
    __slots__ = ("shape", "type", "name", "quantization", "shapeSignature")

    def __init__(self, t):
        self.shape = t.numbers(0, "i")
        self.type = t.scalar(1, "<b")
        self.name = t.string(3)
        self.quantization = t.child(4, Quantization)
        self.shapeSignature = t.numbers(7, "i")


class WhileOptions:
    __slots__ = ("condSubgraphIndex", "bodySubgraphIndex")

    def __init__(self, t):
        self.condSubgraphIndex, self.bodySubgraphIndex = t.scalar(0, "<i"), t.scalar(1, "<i")


class Operator:
    __slots__ = ("opcodeIndex", "inputs", "outputs", "builtinOptions")

    def __init__(self, t):
        self.opcodeIndex = t.scalar(0, "<I")
        self.inputs, self.outputs = t.numbers(1, "i"), t.numbers(2, "i")
        # only the union member the audit reads is decoded
        self.builtinOptions = t.child(4, WhileOptions) if t.scalar(3, "<B") == WHILE_OPTIONS_TAG else None


class SubGraph:
    __slots__ = ("tensors", "inputs", "outputs", "operators")

    def __init__(self, t):
        self.tensors = t.tables(0, Tensor)
        self.inputs, self.outputs = t.numbers(1, "i"), t.numbers(2, "i")
        self.operators = t.tables(3, Operator)


class TensorMap:
    __slots__ = ("name", "tensorIndex")

    def __init__(self, t):
        self.name, self.tensorIndex = t.string(0), t.scalar(1, "<I")


class SignatureDef:
    __slots__ = ("inputs", "outputs", "signatureKey", "subgraphIndex")

    def __init__(self, t):
        self.inputs, self.outputs = t.tables(0, TensorMap), t.tables(1, TensorMap)
        self.signatureKey, self.subgraphIndex = t.string(2), t.scalar(4, "<I")


class Metadata:
    __slots__ = ("name",)

    def __init__(self, t):
        self.name = t.string(0)


class Model:
    """The fields of a TFLite ``Model`` the audit reads, named as in the schema's object API."""
    __slots__ = ("operatorCodes", "subgraphs", "metadata", "signatureDefs")

    def __init__(self, blob):
        r = _Reader(blob)
        t = r.table(r.target(0))
        self.operatorCodes = t.tables(1, OperatorCode)
        self.subgraphs = t.tables(2, SubGraph)
        self.metadata = t.tables(6, Metadata)
        self.signatureDefs = t.tables(7, SignatureDef)


def read(blob: bytes) -> Model:
    """The audit's view of a TFLite flatbuffer; FlatbufferError when it is damaged."""
    if len(blob) < 8:
        raise FlatbufferError(f"{len(blob)} bytes is too short for a flatbuffer")
    return Model(blob)


def type_name(code: int) -> str:
    return TENSOR_TYPES[code] if 0 <= code < len(TENSOR_TYPES) else str(code)


def op_code(code) -> int:
    """The builtin op code of an ``OperatorCode`` (the larger of the two fields, as TFLite reads it)."""
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def op_name(value: int):
    """A builtin op's schema name; None for a code the installed schema does not know."""
    return _BY_CODE.get(value) or _schema_names().get(value)


_BY_CODE = {v: k for k, v in OP_CODES.items()}


@functools.lru_cache(maxsize=1)
def _schema_names() -> dict:
    from .tflite_flatbuffer import schema

    s = schema()
    return {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}


def is_known_unnamed(value: int) -> bool:
    """A builtin op the audit has no rule for (neither refused nor ``WHILE`` nor ``CUSTOM``):
    checked without importing the schema."""
    return 0 <= value <= LAST_KNOWN_OP and value not in _BY_CODE

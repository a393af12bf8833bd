"""A TFLite-family file (``tflite``, ``tflite-fixed``, ``mediapipe``) checked from its bytes
before LiteRT, TFLite Micro or MediaPipe load it (TensorFlow-free: the flatbuffer is read field
by field, ``formats/tflite_read.py``, nothing runs).

* the file is a TFLite flatbuffer (``TFL3``) of at most ``MAX_FILE_BYTES``;
* builtin ops only, in every subgraph: a custom op (Flex included) runs code the runtimes do
  not ship; no op that keeps state (``CALL_ONCE``, the resource-variable and hash-table
  ops) and no op that runs another subgraph (``IF``, ``CALL``, the StableHLO ones) except
  ``WHILE``;
* subgraphs only in the structure the ``lstm_loop`` rewrite produces (a masked LSTM as a
  ``tf.while_loop``): subgraph 0 is the model, every other subgraph is the condition or
  the body of exactly one ``WHILE`` op of subgraph 0 (no nesting, no sharing, no subgraph
  left over), at most ``MAX_WHILE_LOOPS`` loops; a condition has one bool output, and the
  condition's inputs and the body's inputs and outputs match the ``WHILE``'s; every
  signature runs subgraph 0. The per-op checks apply to every subgraph. A loop's trip
  count is data-dependent and is not bounded here (verify and the export's run check run
  every runtime in a child process with a time limit);
* the tensors all subgraphs declare (dynamic dims counted as 1) fit ``TFLITE_STATIC_BYTES``;
* the I/O is the contract's: one input ``token_ids`` int32 rank 2; ``probabilities`` (and
  optionally ``attention_weights``), rank 2, of the entry's ``output_dtype``, with one column
  per label; a fixed-shape format stores exactly the entry's ``input_shape``, the dynamic
  ``tflite`` a dynamic one; a ``mediapipe`` file has ``probabilities`` only;
* metadata only in a ``mediapipe`` file, and there it must be what probattn writes: the zip
  appended to the flatbuffer holds exactly a vocabulary and a labels file (sizes, ratios and
  names checked before anything is inflated, read with a hard cap), its labels are the
  manifest's labels in order and its vocabulary is ``vocab.txt``'s, id for id (MediaPipe
  tokenizes with the file's vocabulary, not the bundle's tokenizer.json).
"""
from __future__ import annotations

import io
import struct

from probattn.models.errors import UsageError, one_line

from .. import contract as C

#: the largest TFLite file read (flatbuffers address 2 GB)
MAX_FILE_BYTES = 2 << 30
#: ops that keep state or run another subgraph (all but ``WHILE``): refused in every
#: subgraph (probattn's exports contain none)
REFUSED_OPS = ("CALL_ONCE", "IF", "CALL", "VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "HASHTABLE",
               "HASHTABLE_FIND", "HASHTABLE_IMPORT", "HASHTABLE_SIZE", "HASHTABLE_LOOKUP",
               "STABLEHLO_WHILE", "STABLEHLO_CASE", "STABLEHLO_COMPOSITE", "STABLEHLO_REDUCE",
               "STABLEHLO_REDUCE_WINDOW", "STABLEHLO_SCATTER", "STABLEHLO_SORT", "STABLEHLO_CUSTOM_CALL")
#: the one op allowed to run other subgraphs (the ``lstm_loop`` rewrite's ``tf.while_loop``)
LOOP_OP = "WHILE"
#: ``WHILE`` ops per file at most (a BiLSTM holds two); each brings a condition and a body
MAX_WHILE_LOOPS = 8
MAX_SUBGRAPHS = 1 + 2 * MAX_WHILE_LOOPS
#: the metadata zip of a mediapipe file: two entries, each at most this many bytes inflated
MAX_METADATA_ENTRIES = 2
MAX_METADATA_ENTRY_BYTES = 256 << 20
MAX_METADATA_RATIO = 200.0
_DTYPE_BYTES = {"float32": 4, "float16": 2, "int32": 4, "int8": 1, "uint8": 1, "int16": 2, "int64": 8,
                "bool": 1, "float64": 8, "uint32": 4, "uint16": 2, "uint64": 8}


def _structure(m) -> int:
    """Check every subgraph's ops and the ``WHILE`` structure of an unpacked model (see the
    module docstring); returns the bytes of the tensors all subgraphs declare. Raises
    UsageError (without the file's name)."""
    from ..formats import tflite_read as R

    subgraphs = m.subgraphs or []
    n = len(subgraphs)
    if not 1 <= n <= MAX_SUBGRAPHS:
        raise UsageError(f"holds {n} subgraphs; at most {MAX_SUBGRAPHS} allowed (the model and the condition and "
                         f"body of at most {MAX_WHILE_LOOPS} WHILE loops)")
    for d in m.signatureDefs or []:
        if d.subgraphIndex != 0:
            raise UsageError(f"signature {_text(d.signatureKey)!r} runs subgraph {d.subgraphIndex}; every signature "
                             "runs subgraph 0 (the others are loop conditions and bodies)")
    codes = m.operatorCodes or []
    used = {}  # subgraph index -> (role, index of its WHILE in subgraph 0)
    total = 0
    for g, sg in enumerate(subgraphs):
        where = "the model (subgraph 0)" if g == 0 else f"subgraph {g}"
        for k, op in enumerate(sg.operators or []):
            if not 0 <= op.opcodeIndex < len(codes):
                raise UsageError(f"operator {k} of {where} has opcode index {op.opcodeIndex}; the file has "
                                 f"{len(codes)} op codes")
            code = codes[op.opcodeIndex]
            value = R.op_code(code)
            if R.is_known_unnamed(value):  # a builtin op with no rule of its own
                continue
            name = R.op_name(value)
            if name is None or name == "CUSTOM":
                name = f"CUSTOM:{_text(code.customCode)}" if name else f"unknown op {value}"
                raise UsageError(f"{where} uses {name}; custom and unknown ops are refused (probattn's exports use "
                                 "builtin ops only)")
            if name in REFUSED_OPS:
                raise UsageError(f"{where} uses {name}; ops that keep state or run another subgraph (other than "
                                 "WHILE) are refused (probattn's exports hold none)")
            if name != LOOP_OP:
                continue
            if g != 0:
                raise UsageError(f"{where} uses WHILE: loops inside a loop's condition or body are refused "
                                 "(probattn's loops are not nested)")
            opt = op.builtinOptions
            if not isinstance(opt, R.WhileOptions):
                raise UsageError(f"WHILE operator {k} has no WhileOptions")
            cond, body = opt.condSubgraphIndex, opt.bodySubgraphIndex
            for role, idx in (("condition", cond), ("body", body)):
                if not 1 <= idx < n:
                    raise UsageError(f"WHILE operator {k}'s {role} is subgraph {idx}; a loop's condition and body "
                                     f"are subgraphs 1 to {n - 1}")
                if idx in used:
                    raise UsageError(f"subgraph {idx} is the {role} of WHILE operator {k} and the {used[idx][0]} of "
                                     f"WHILE operator {used[idx][1]}; each loop has its own subgraphs")
                used[idx] = (role, k)
            n_in = len(op.inputs) if op.inputs is not None else 0
            n_out = len(op.outputs) if op.outputs is not None else 0
            c, b = subgraphs[cond], subgraphs[body]

            def count(x):
                return len(x) if x is not None else 0

            if not (n_in == n_out == count(c.inputs) == count(b.inputs) == count(b.outputs)):
                raise UsageError(f"WHILE operator {k} has {n_in} inputs and {n_out} outputs, its condition "
                                 f"{count(c.inputs)} inputs, its body {count(b.inputs)} inputs and "
                                 f"{count(b.outputs)} outputs; all must match")
            if count(c.outputs) != 1 or not 0 <= int(c.outputs[0]) < count(c.tensors) \
                    or R.type_name(c.tensors[int(c.outputs[0])].type) != "bool":
                raise UsageError(f"WHILE operator {k}'s condition (subgraph {cond}) must have one bool output")
        for t in sg.tensors or []:
            size = 1
            for d in (t.shape if t.shape is not None else []):
                size *= max(int(d), 1)
            total += size * _DTYPE_BYTES.get(R.type_name(t.type), 8)
    left = sorted(set(range(1, n)) - set(used))
    if left:
        raise UsageError(f"subgraph {left[0]} is neither the condition nor the body of a WHILE of the model; "
                         f"probattn's files hold no other subgraph ({n} subgraphs, {len(used) // 2} loops)")
    return total


def _text(x) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _metadata_zip(blob: bytes, what: str) -> dict:
    """The files of the zip appended to the flatbuffer, checked before they are inflated."""
    tail = blob[-(65536 + 22):]
    i = tail.rfind(b"PK\x05\x06")
    if i < 0:
        raise UsageError(f"{what}: its metadata has no associated files (vocabulary and labels)")
    import zipfile  # only for mediapipe files: not on predict's start-up path

    (count,) = struct.unpack("<H", tail[i + 10:i + 12])
    if count != MAX_METADATA_ENTRIES:
        raise UsageError(f"{what}: its metadata archive declares {count} entries; a mediapipe file holds "
                         f"{MAX_METADATA_ENTRIES} (a vocabulary and labels)")
    try:
        zf = zipfile.ZipFile(io.BytesIO(blob))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise UsageError(f"{what}: its metadata archive is damaged ({one_line(e, 120)})") from None
    files = {}
    with zf:
        for info in infos:
            name = info.filename
            if not name or "/" in name or "\\" in name or "\0" in name or name in (".", "..") or name in files:
                raise UsageError(f"{what}: metadata archive entry {name[:60]!r} is not allowed")
            if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise UsageError(f"{what}: metadata archive entry {name!r} is encrypted or uses compression "
                                 f"method {info.compress_type}; only stored and deflate are allowed")
            if info.file_size > MAX_METADATA_ENTRY_BYTES:
                raise UsageError(f"{what}: metadata archive entry {name} inflates to {info.file_size:,} bytes; at "
                                 f"most {MAX_METADATA_ENTRY_BYTES:,} allowed")
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > (1 << 20) and ratio > MAX_METADATA_RATIO:
                raise UsageError(f"{what}: metadata archive entry {name} inflates {ratio:,.0f}x; at most "
                                 f"{MAX_METADATA_RATIO:.0f}x allowed")
            from .archive import read_member

            try:
                files[name] = read_member(zf, name, MAX_METADATA_ENTRY_BYTES)
            except (zipfile.BadZipFile, zlib_error(), OSError, EOFError) as e:
                raise UsageError(f"{what}: metadata archive entry {name} is damaged ({one_line(e, 120)})") from None
    return files


def zlib_error():
    import zlib

    return zlib.error


def _check_metadata(blob: bytes, what: str, labels, vocabulary) -> None:
    files = _metadata_zip(blob, what)
    text = {}
    for name, data in files.items():
        try:
            text[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{what}: metadata file {name} is not UTF-8") from None
    label_files = [n for n, t in text.items() if t.splitlines() == list(labels)]
    if not label_files:
        raise UsageError(f"{what}: no metadata file lists the bundle's {len(labels)} labels in order; MediaPipe "
                         "would name the classes otherwise")
    vocab_name = next(n for n in text if n != label_files[0])
    if vocabulary is not None:
        want = [f"{w} {i}" for i, w in enumerate(vocabulary)]
        got = [l for l in text[vocab_name].split("\n") if l]
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise UsageError(f"{what}: the metadata vocabulary differs from {C.VOCAB_FILE} at line {first + 1} "
                             f"({len(got):,} lines, {C.VOCAB_FILE} {len(want):,}); MediaPipe would give other ids")


def audit(blob: bytes, entry: dict, *, labels, vocabulary=None, what: str | None = None) -> dict:
    """Check a TFLite-family artifact's bytes against its manifest ``entry``; returns what
    ``describe`` read. ``vocabulary``: the bundle's tokens in id order (checked against a
    mediapipe file's metadata), None to skip that check."""
    from ..formats.tflite_flatbuffer import describe
    from ..formats.tflite_read import read
    from ..limits import TFLITE_STATIC_BYTES

    what = what or entry["path"]
    fmt = entry["format"]
    if len(blob) > MAX_FILE_BYTES:
        raise UsageError(f"{what} is {len(blob):,} bytes; at most {MAX_FILE_BYTES:,} allowed")
    if len(blob) < 8 or blob[4:8] != b"TFL3":
        raise UsageError(f"{what} is not a valid TFLite model (no TFL3 flatbuffer identifier)")
    try:
        model = read(blob)
        static = _structure(model)
        info = describe(blob, model, ops=False)
    except UsageError as e:
        raise UsageError(f"{what}: {e}") from None
    except Exception as e:  # a damaged flatbuffer: struct.error, IndexError, ...
        raise UsageError(f"{what} is not a valid TFLite model (a damaged flatbuffer: {type(e).__name__}: {one_line(e, 120)})") from None
    if static > TFLITE_STATIC_BYTES:
        raise UsageError(f"{what} declares {static:,} bytes of tensors; at most {TFLITE_STATIC_BYTES:,} allowed")

    ins, outs = info["inputs"], info["outputs"]
    if len(ins) != 1 or ins[0]["name"] != C.INPUT or ins[0]["dtype"] != C.INPUT_DTYPE \
            or len(ins[0]["shape_signature"]) != 2:
        raise UsageError(f"{what}: inputs are {[(i['name'], i['dtype'], i['shape_signature']) for i in ins]}; "
                         f"expected exactly {C.INPUT} {C.INPUT_DTYPE} rank 2")
    shape = ins[0]["shape_signature"]
    if fmt in C.FIXED_SHAPE_FORMATS:
        if shape != list(entry.get("input_shape") or []):
            raise UsageError(f"{what}: the file stores input {shape}; the manifest says {entry.get('input_shape')}")
    elif not any(d < 1 for d in shape):
        raise UsageError(f"{what}: a {fmt} file has a dynamic [batch, sequence] input; this one stores {shape} "
                         "(fixed-shape files are tflite-fixed)")
    names = [o["name"] for o in outs]
    allowed = list(C.MEDIAPIPE_OUTPUTS) if fmt == "mediapipe" else list(C.OUTPUT_ORDER)
    dtype = entry.get("output_dtype", C.OUTPUT_DTYPE)
    known = set(allowed) | ({n for n in names if C.is_head(n)} if fmt != "mediapipe" else set())
    if not names or names[0] != C.PROBABILITIES or len(set(names)) != len(names) or not set(names) <= known \
            or any(o["dtype"] != dtype or len(o["shape_signature"]) != 2 for o in outs):
        raise UsageError(f"{what}: outputs are {[(o['name'], o['dtype'], o['shape_signature']) for o in outs]}; "
                         f"expected {' and '.join(allowed)} ({C.PROBABILITIES} first), rank 2, {dtype}")
    classes = outs[0]["shape_signature"][1]
    # one unit between two labels: a binary sigmoid / logit head (the manifest's heads say which)
    if classes != len(labels) and not (classes == 1 and len(labels) == 2):
        raise UsageError(f"{what}: output {C.PROBABILITIES} has {classes} classes; the bundle has {len(labels)} labels")
    if fmt == "mediapipe":
        if not info["has_metadata"]:
            raise UsageError(f"{what}: a mediapipe file carries MediaPipe metadata; this one has none")
        _check_metadata(blob, what, labels, vocabulary)
    elif info["has_metadata"]:
        raise UsageError(f"{what}: a {fmt} file carries no metadata; this one has TFLITE_METADATA (only mediapipe "
                         "files do)")
    return info

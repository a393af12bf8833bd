"""A TFLite-family file (``tflite``, ``tflite-fixed``, ``mediapipe``) checked from its bytes
before LiteRT, TFLite Micro or MediaPipe load it (TensorFlow-free: the flatbuffer is read with
the schema's Python bindings, nothing runs).

* the file is a TFLite flatbuffer (``TFL3``) of at most ``MAX_FILE_BYTES``, one subgraph;
* builtin ops only, and none that loops or keeps state (``WHILE``, ``CALL_ONCE``, the
  resource-variable ops): a custom op (Flex included) runs code the runtimes do not ship, a
  loop can run for ever; probattn's exports contain neither;
* the tensors the graph declares (dynamic dims counted as 1) fit ``TFLITE_STATIC_BYTES``;
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
import zipfile

from probattn.models.errors import UsageError, one_line

from .. import contract as C

#: the largest TFLite file read (flatbuffers address 2 GB)
MAX_FILE_BYTES = 2 << 30
#: ops that loop or keep state: refused (probattn's exports contain none)
REFUSED_OPS = ("WHILE", "CALL_ONCE", "IF", "VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "HASHTABLE",
               "HASHTABLE_FIND", "HASHTABLE_IMPORT", "HASHTABLE_SIZE")
#: the metadata zip of a mediapipe file: two entries, each at most this many bytes inflated
MAX_METADATA_ENTRIES = 2
MAX_METADATA_ENTRY_BYTES = 256 << 20
MAX_METADATA_RATIO = 200.0
_DTYPE_BYTES = {"float32": 4, "float16": 2, "int32": 4, "int8": 1, "uint8": 1, "int16": 2, "int64": 8,
                "bool": 1, "float64": 8, "uint32": 4, "uint16": 2, "uint64": 8}


def _static_bytes(blob: bytes) -> int:
    from ..formats.tflite_flatbuffer import schema

    s = schema()
    m = s.Model.GetRootAs(blob, 0)
    if m.SubgraphsLength() != 1:
        raise UsageError(f"holds {m.SubgraphsLength()} subgraphs; probattn's files hold one")
    types = {v: k.lower() for k, v in vars(s.TensorType).items() if not k.startswith("_")}
    total = 0
    sg = m.Subgraphs(0)
    for i in range(sg.TensorsLength()):
        t = sg.Tensors(i)
        n = 1
        for j in range(t.ShapeLength()):
            n *= max(int(t.Shape(j)), 1)
        total += n * _DTYPE_BYTES.get(types.get(t.Type(), ""), 8)
    return total


def _metadata_zip(blob: bytes, what: str) -> dict:
    """The files of the zip appended to the flatbuffer, checked before they are inflated."""
    tail = blob[-(65536 + 22):]
    i = tail.rfind(b"PK\x05\x06")
    if i < 0:
        raise UsageError(f"{what}: its metadata has no associated files (vocabulary and labels)")
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
    from ..limits import TFLITE_STATIC_BYTES

    what = what or entry["path"]
    fmt = entry["format"]
    if len(blob) > MAX_FILE_BYTES:
        raise UsageError(f"{what} is {len(blob):,} bytes; at most {MAX_FILE_BYTES:,} allowed")
    if len(blob) < 8 or blob[4:8] != b"TFL3":
        raise UsageError(f"{what} is not a valid TFLite model (no TFL3 flatbuffer identifier)")
    try:
        info = describe(blob)
        static = _static_bytes(blob)
    except UsageError as e:
        raise UsageError(f"{what}: {e}") from None
    except Exception as e:  # a damaged flatbuffer: struct.error, IndexError, ...
        raise UsageError(f"{what} is not a valid TFLite model (a damaged flatbuffer: {type(e).__name__}: {one_line(e, 120)})") from None
    ops = [o["op"] if isinstance(o, dict) else str(o) for o in info["ops"]]
    bad = [o for o in ops if o.startswith("CUSTOM") or o in REFUSED_OPS]
    if bad:
        raise UsageError(f"{what} uses {', '.join(bad[:3])}; custom, control-flow and resource-variable ops are "
                         "refused (probattn's exports use builtin ops only)")
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

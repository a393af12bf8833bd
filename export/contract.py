"""The contract every artifact, runtime and client shares: one home for each name.

Input and output names, their dtypes and dims, the output order, the artifact formats and
precisions, which format supports which precision, and the artifact file names. Every
other module reads these; none spells them itself. TensorFlow-free.
"""
from __future__ import annotations

from probattn.models.errors import UsageError

# ------------------------------------------------------------------ signature
#: the one input: token ids, int32 ``[batch, sequence]``
INPUT = "token_ids"
INPUT_DTYPE = "int32"
BATCH_DIM, SEQUENCE_DIM = "batch", "sequence"
#: the primary output: class probabilities ``[batch, classes]``
PROBABILITIES = "probabilities"
#: the explanation: attention weight per step ``[batch, sequence]`` (pads get exactly 0)
ATTENTION = "attention_weights"
#: outputs in the order every format presents them: the primary output first
OUTPUT_ORDER = (PROBABILITIES, ATTENTION)
OUTPUT_DTYPE = "float32"
#: the SavedModel / LiteRT signature key
SIGNATURE_KEY = "serving_default"


def output_dims(name: str, n_classes: int | None = None) -> list:
    """The dims of an output, with named dynamic dims."""
    if name == PROBABILITIES:
        return [BATCH_DIM, n_classes]
    if name == ATTENTION:
        return [BATCH_DIM, SEQUENCE_DIM]
    raise KeyError(name)


def signature(n_classes: int, attention: bool) -> dict:
    """The I/O description written into ``manifest.json``."""
    outputs = [PROBABILITIES] + ([ATTENTION] if attention else [])
    return {
        "inputs": [{"name": INPUT, "dtype": INPUT_DTYPE, "shape": [BATCH_DIM, SEQUENCE_DIM]}],
        "outputs": [{"name": n, "dtype": OUTPUT_DTYPE, "shape": output_dims(n, n_classes)} for n in outputs],
        "savedmodel_signature": SIGNATURE_KEY,
    }


def ordered_outputs(names) -> list:
    """Output names in contract order (unknown names last, alphabetically)."""
    names = list(names)
    known = [n for n in OUTPUT_ORDER if n in names]
    return known + sorted(n for n in names if n not in OUTPUT_ORDER)


# ------------------------------------------------------------------ formats and precisions
#: every artifact format a bundle can hold; ``keras`` is the reference
FORMATS = ("keras", "savedmodel", "tflite", "onnx")
#: the formats ``probattn export --formats`` builds
EXPORT_FORMATS = ("savedmodel", "tflite", "onnx")
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8")
#: which precisions each format has
SUPPORTED = {
    "keras": ("fp32",),
    "savedmodel": ("fp32",),
    "tflite": ("fp32", "fp16", "int8-dynamic", "int8"),
    "onnx": ("fp32", "fp16", "int8"),
}
FORMAT_DESCRIPTIONS = {
    "keras": "the Keras model (the reference)",
    "savedmodel": "TensorFlow SavedModel, signature serving_default",
    "tflite": "TFLite / LiteRT flatbuffer, builtin ops only",
    "onnx": "ONNX (tf2onnx)",
}


def artifact_filename(fmt: str, precision: str) -> str:
    """Where an artifact lives inside a bundle."""
    if fmt not in SUPPORTED:
        raise UsageError(f"unknown format '{fmt}'; allowed: {', '.join(FORMATS)}")
    if precision not in SUPPORTED[fmt]:
        raise UsageError(f"format {fmt} has no precision '{precision}'; allowed: {', '.join(SUPPORTED[fmt])}")
    if fmt == "keras":
        return "model.keras"
    if fmt == "savedmodel":
        return "saved_model"
    return f"model_{precision.replace('-', '_')}.{fmt}"


def selection_is_empty(formats, precisions) -> bool:
    return not any(p in SUPPORTED[f] for f in formats for p in precisions)


def sort_key(fmt: str, precision: str) -> tuple:
    """Artifacts in manifest order: by format, then precision."""
    return FORMATS.index(fmt), PRECISIONS.index(precision)


def parse_list(value, allowed, what) -> tuple:
    """A comma list (or sequence) of names, each one of ``allowed``."""
    items = tuple(x.strip() for x in (value.split(",") if isinstance(value, str) else value) if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise UsageError(f"unknown {what} {', '.join(repr(b) for b in bad) or '(empty)'}; allowed: {', '.join(allowed)}")
    return items

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


def is_head(name: str) -> bool:
    """A per-example score output: ``probabilities`` or a further head ``probabilities_<name>``."""
    return name == PROBABILITIES or name.startswith(PROBABILITIES + "_")


def input_dims(fixed_length: int | None = None) -> list:
    """``[batch, sequence]``; a model with a fixed input length has that length instead."""
    return [BATCH_DIM, int(fixed_length) if fixed_length else SEQUENCE_DIM]


def output_dims(name: str, n_classes: int | None = None, fixed_length: int | None = None) -> list:
    """The dims of an output, with named dynamic dims."""
    if is_head(name):
        return [BATCH_DIM, n_classes]
    if name == ATTENTION:
        return input_dims(fixed_length)
    raise KeyError(name)


def signature(n_classes: int, attention: bool, fixed_length: int | None = None, heads=None) -> dict:
    """The I/O description written into ``manifest.json``. ``heads``: ``[{"output", "units",
    "kind"}, ...]`` for every score output (default: one ``probabilities`` head)."""
    heads = heads or [{"output": PROBABILITIES, "units": n_classes, "kind": "softmax"}]
    outputs = [{"name": h["output"], "dtype": OUTPUT_DTYPE, "shape": output_dims(h["output"], h["units"]),
                "kind": h["kind"]} for h in heads]
    if attention:
        outputs.append({"name": ATTENTION, "dtype": OUTPUT_DTYPE, "shape": output_dims(ATTENTION, None, fixed_length)})
    return {
        "inputs": [{"name": INPUT, "dtype": INPUT_DTYPE, "shape": input_dims(fixed_length)}],
        "outputs": outputs,
        "savedmodel_signature": SIGNATURE_KEY,
    }


def ordered_outputs(names) -> list:
    """Output names in contract order: ``probabilities`` first, further heads by name, then
    ``attention_weights``; anything else last, alphabetically."""
    names = list(names)
    heads = sorted(n for n in names if is_head(n) and n != PROBABILITIES)
    first = [PROBABILITIES] if PROBABILITIES in names else []
    last = [ATTENTION] if ATTENTION in names else []
    return first + heads + last + sorted(n for n in names if not is_head(n) and n != ATTENTION)


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


#: where the Keras reference lives in a bundle, by the kind of file the user gave (their
#: own file, copied as is; a SavedModel without a Keras model is its own reference)
REFERENCE_FILES = {"keras": "model.keras", "h5": "model.h5", "savedmodel": "reference_saved_model"}
#: the user's --custom-objects file is kept here in a bundle
CUSTOM_OBJECTS_DIR = "custom_objects"


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

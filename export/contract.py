"""The contract every artifact, runtime and client shares: one home for each name.

Input and output names, their dtypes and dims, the output order, the artifact formats and
precisions, which format supports which precision, and the artifact file names. Every
other module reads these; none spells them itself. TensorFlow-free.
"""
from __future__ import annotations

from probattn.models.errors import UsageError
from probattn.models.text.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE  # noqa: F401  (names of the bundle)

# ------------------------------------------------------------------ signature
#: the one input: token ids, int32 ``[batch, sequence]``
INPUT = "token_ids"
INPUT_DTYPE = "int32"
#: input dtypes an artifact may take: the contract's int32, and int64, what Hugging Face
#: convention clients send (transformers.js, ``return_tensors="np"``)
INPUT_DTYPES = (INPUT_DTYPE, "int64")
#: formats that also ship an int64-input twin of each precision (a Cast to int32 in front)
INT64_INPUT_FORMATS = ("onnx",)
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


#: label names in output order, one per line (Triton's label_filename, TF Serving assets)
LABELS_FILE = "labels.txt"


def artifact_filename(fmt: str, precision: str, input_dtype: str = INPUT_DTYPE) -> str:
    """Where an artifact lives inside a bundle."""
    if fmt not in SUPPORTED:
        raise UsageError(f"unknown format '{fmt}'; allowed: {', '.join(FORMATS)}")
    if precision not in SUPPORTED[fmt]:
        raise UsageError(f"format {fmt} has no precision '{precision}'; allowed: {', '.join(SUPPORTED[fmt])}")
    if input_dtype != INPUT_DTYPE and (input_dtype not in INPUT_DTYPES or fmt not in INT64_INPUT_FORMATS):
        raise UsageError(f"format {fmt} has no {input_dtype} input; int64 twins exist for "
                         f"{', '.join(INT64_INPUT_FORMATS)}")
    if fmt == "keras":
        return "model.keras"
    if fmt == "savedmodel":
        return "saved_model"
    suffix = "" if input_dtype == INPUT_DTYPE else f"_{input_dtype}"
    return f"model_{precision.replace('-', '_')}{suffix}.{fmt}"


def input_dtype_of(entry: dict) -> str:
    """The input dtype of a manifest artifact entry (int32 unless it says otherwise)."""
    return entry.get("input_dtype", INPUT_DTYPE)


def selection_is_empty(formats, precisions) -> bool:
    return not any(p in SUPPORTED[f] for f in formats for p in precisions)


def sort_key(fmt: str, precision: str, input_dtype: str = INPUT_DTYPE) -> tuple:
    """Artifacts in manifest order: by format, then input dtype, then precision."""
    return FORMATS.index(fmt), INPUT_DTYPES.index(input_dtype), PRECISIONS.index(precision)


def parse_list(value, allowed, what) -> tuple:
    """A comma list (or sequence) of names, each one of ``allowed``."""
    items = tuple(x.strip() for x in (value.split(",") if isinstance(value, str) else value) if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise UsageError(f"unknown {what} {', '.join(repr(b) for b in bad) or '(empty)'}; allowed: {', '.join(allowed)}")
    return items

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
FORMATS = ("keras", "savedmodel", "tflite", "tflite-fixed", "mediapipe", "onnx")
#: the formats ``probattn export --formats`` builds
EXPORT_FORMATS = ("savedmodel", "tflite", "tflite-fixed", "mediapipe", "onnx")
#: what ``export`` builds when ``--formats`` is not given (``mediapipe`` is added when the
#: tokenizer is MediaPipe's regex tokenizer, the only one MediaPipe's TextClassifier runs)
DEFAULT_EXPORT_FORMATS = ("savedmodel", "tflite", "tflite-fixed", "onnx")
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8")
#: which precisions each format has
SUPPORTED = {
    "keras": ("fp32",),
    "savedmodel": ("fp32",),
    "tflite": ("fp32", "fp16", "int8-dynamic", "int8"),
    # TFLite Micro has no fp16 kernels (DEQUANTIZE from float16) and no hybrid int8 kernels
    "tflite-fixed": ("fp32", "int8"),
    "mediapipe": ("fp32", "int8"),
    "onnx": ("fp32", "fp16", "int8"),
}
FORMAT_DESCRIPTIONS = {
    "keras": "the Keras model (the reference)",
    "savedmodel": "TensorFlow SavedModel, signature serving_default",
    "tflite": "TFLite / LiteRT flatbuffer, builtin ops only, dynamic [batch, sequence]",
    "tflite-fixed": "TFLite flatbuffer with a fixed [1, max_length] input, for devices (TFLite Micro)",
    "mediapipe": "fixed-shape TFLite, probabilities only, with MediaPipe TextClassifier metadata",
    "onnx": "ONNX (tf2onnx)",
}
#: formats whose files store a fixed ``[1, max_length]`` input (TFLite Micro and MediaPipe
#: cannot resize inputs); their manifest entries carry ``input_shape``
FIXED_SHAPE_FORMATS = ("tflite-fixed", "mediapipe")
#: formats that hold a TFLite flatbuffer (raw tensor names are the contract's)
TFLITE_FORMATS = ("tflite", "tflite-fixed", "mediapipe")
#: outputs of the MediaPipe artifact: TextClassifier needs one output per output metadata
MEDIAPIPE_OUTPUTS = (PROBABILITIES,)

# ------------------------------------------------------------------ output dtypes
#: the dtype of an artifact's outputs; float32 unless a device artifact keeps them int8
OUTPUT_DTYPES = ("float32", "int8")
#: the output dtypes each (format, precision) is built with
OUTPUT_VARIANTS = {("tflite-fixed", "int8"): ("float32", "int8")}
#: an int8 softmax output: 256 levels over [0, 1], so scale 1/256 and zero point -128
INT8_PROBABILITIES_SCALE, INT8_PROBABILITIES_ZERO_POINT = 1 / 256, -128


#: where the Keras reference lives in a bundle, by the kind of file the user gave (their
#: own file, copied as is; a SavedModel without a Keras model is its own reference)
REFERENCE_FILES = {"keras": "model.keras", "h5": "model.h5", "savedmodel": "reference_saved_model"}
#: the user's --custom-objects file is kept here in a bundle
CUSTOM_OBJECTS_DIR = "custom_objects"


def output_dtypes(fmt: str, precision: str) -> tuple:
    return OUTPUT_VARIANTS.get((fmt, precision), ("float32",))


def fixed_input_shape(max_length: int) -> list:
    """The stored input shape of the fixed-shape formats: one text of ``max_length`` ids."""
    return [1, int(max_length)]


def artifact_input_shape(fmt: str, fixed_length: int | None = None, device_length: int | None = None):
    """The ``input_shape`` a manifest entry records, the one place it is decided (runners
    read it with ``runtimes.base.fixed_dims``: an int fixes a dim, a name leaves it dynamic):

    * the fixed-shape formats: ``[1, device_length]``, one text per call (``device_length``
      is the model's own input length when it has one, else the training max length);
    * every other format of a model with a fixed input length (``Input(shape=(n,))``):
      ``["batch", n]``;
    * otherwise None: ``[batch, sequence]``, both dynamic."""
    if fmt in FIXED_SHAPE_FORMATS:
        return fixed_input_shape(device_length)
    return input_dims(fixed_length) if fixed_length else None


# ------------------------------------------------------------------ targets
#: where a TFLite-family artifact can run, measured at export (never assumed): LiteRT
#: (``ai_edge_litert``), TensorFlow Lite Micro (``tflite-micro``), MediaPipe TextClassifier
TARGETS = ("litert", "tflm", "mediapipe")

# ------------------------------------------------------------------ plain files in a bundle
#: label names in output order, one per line (MCU builds, Triton's label_filename, TF Serving assets)
LABELS_FILE = "labels.txt"
#: the tokenizer's vocabulary, one token per line, line i holds id i
VOCAB_FILE = "vocab.txt"
#: C sources written by ``export --c-array``
C_ARRAY_DIR = "c"


def artifact_filename(fmt: str, precision: str, output_dtype: str = OUTPUT_DTYPE,
                      input_dtype: str = INPUT_DTYPE) -> str:
    """Where an artifact lives inside a bundle."""
    if fmt not in SUPPORTED:
        raise UsageError(f"unknown format '{fmt}'; allowed: {', '.join(FORMATS)}")
    if precision not in SUPPORTED[fmt]:
        raise UsageError(f"format {fmt} has no precision '{precision}'; allowed: {', '.join(SUPPORTED[fmt])}")
    if input_dtype != INPUT_DTYPE and (input_dtype not in INPUT_DTYPES or fmt not in INT64_INPUT_FORMATS):
        raise UsageError(f"format {fmt} has no {input_dtype} input; int64 twins exist for "
                         f"{', '.join(INT64_INPUT_FORMATS)}")
    if output_dtype not in output_dtypes(fmt, precision):
        raise UsageError(f"format {fmt} {precision} has no {output_dtype} outputs; allowed: "
                         f"{', '.join(output_dtypes(fmt, precision))}")
    if fmt == "keras":
        return "model.keras"
    if fmt == "savedmodel":
        return "saved_model"
    stem = precision.replace("-", "_")
    if fmt == "tflite-fixed":
        return f"model_fixed_{stem}" + ("_int8out" if output_dtype == "int8" else "") + ".tflite"
    if fmt == "mediapipe":
        return f"model_mediapipe_{stem}.tflite"
    suffix = "" if input_dtype == INPUT_DTYPE else f"_{input_dtype}"
    return f"model_{stem}{suffix}.{fmt}"


def input_dtype_of(entry: dict) -> str:
    """The input dtype of a manifest artifact entry (int32 unless it says otherwise)."""
    return entry.get("input_dtype", INPUT_DTYPE)


def output_dtype_of(entry: dict) -> str:
    """The output dtype of a manifest artifact entry (float32 unless it says otherwise)."""
    return entry.get("output_dtype", OUTPUT_DTYPE)


def selection_is_empty(formats, precisions) -> bool:
    return not any(p in SUPPORTED[f] for f in formats for p in precisions)


def sort_key(fmt: str, precision: str, output_dtype: str = OUTPUT_DTYPE, input_dtype: str = INPUT_DTYPE) -> tuple:
    """Artifacts in manifest order: by format, then input dtype, then precision, then
    output dtype."""
    return (FORMATS.index(fmt), INPUT_DTYPES.index(input_dtype), PRECISIONS.index(precision),
            OUTPUT_DTYPES.index(output_dtype))


def entry_sort_key(entry: dict) -> tuple:
    return sort_key(entry["format"], entry["precision"], output_dtype_of(entry), input_dtype_of(entry))


def artifact_key(entry: dict) -> tuple:
    """What tells two manifest entries apart: format, precision, output dtype and input
    dtype (the int64-input ONNX twins)."""
    return entry["format"], entry["precision"], output_dtype_of(entry), input_dtype_of(entry)


def parse_list(value, allowed, what) -> tuple:
    """A comma list (or sequence) of names, each one of ``allowed``."""
    items = tuple(x.strip() for x in (value.split(",") if isinstance(value, str) else value) if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise UsageError(f"unknown {what} {', '.join(repr(b) for b in bad) or '(empty)'}; allowed: {', '.join(allowed)}")
    return items

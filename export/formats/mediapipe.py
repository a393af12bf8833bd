"""MediaPipe ``TextClassifier`` drop-in: a fixed-shape ``[1, max_length]`` TFLite file with
one output, ``probabilities`` (the task needs as many outputs as output metadata), float32
(the task refuses int8 outputs), carrying MediaPipe metadata: a regex tokenizer (the
bundle's delimiter and vocabulary) on the input and the label names on the output.

Only for bundles whose tokenizer is exactly MediaPipe's regex tokenizer
(``probattn train --tokenizer regex``): the task tokenizes texts itself, and any other
tokenizer would give it other ids.

The metadata is written with MediaPipe's own writer
(``mediapipe.tasks.python.metadata.metadata_writers.text_classifier``). In mediapipe 1.x
wheels that writer cannot be imported: ``metadata.py`` imports the compiled module
``mediapipe.tasks.cc.metadata.python._pywrap_metadata_version``, which those wheels no
longer ship. Its one function, ``GetMinimumMetadataParserVersion(buffer)``, returns the
oldest metadata parser that understands the buffer. When the module is missing,
``_install_version_stand_in`` puts a Python module with that one function in its place;
the function accepts only the metadata this module writes (one subgraph, a regex
tokenizer with its vocabulary file, a labels file, nothing else) and returns "1.2.1", the
schema version that introduced ``RegexTokenizerOptions`` (the newest member that metadata
uses); anything else is refused, not guessed. Everything else is MediaPipe's code.
"""
from __future__ import annotations

import gc
import sys
import tempfile
import types
from pathlib import Path

from probattn.models.errors import UsageError, one_line

from ..contract import MEDIAPIPE_OUTPUTS, artifact_filename, fixed_input_shape
from . import Built, ExportContext
from .tflite import conversion, convert_jobs
from .tflite import INT8_RECIPE

FORMAT = "mediapipe"
NEEDS_SAVED_MODEL = True
SAVED_MODEL = "fixed-probabilities"
TFLITE_JOBS = True

#: all int8 (MediaPipe runs LiteRT, which has int8 EXP and LOG), calibrated like tflite-fixed
MEDIAPIPE_INT8_RECIPE = {**INT8_RECIPE,
                         "calibration": "the tflite recipe's rows that fit, one per [1, max_length] input, right-padded"}

_VERSION_MODULE = "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"
#: metadata_schema.fbs added RegexTokenizerOptions in 1.2.1; nothing newer is written here
REGEX_METADATA_PARSER_VERSION = "1.2.1"


def require_regex_tokenizer(tokenizer) -> dict:
    from probattn.models.text.tokenizer import regex_spec

    spec = regex_spec(tokenizer)
    if spec is None:
        raise UsageError("the mediapipe format needs MediaPipe's regex tokenizer (its TextClassifier "
                         "tokenizes texts itself); train with 'probattn train --tokenizer regex'")
    return spec


def conversions(ctx: ExportContext, precisions) -> list:
    require_regex_tokenizer(ctx.tokenizer)
    if "int8" in precisions and not ctx.calibration_fixed:
        raise UsageError("full-integer int8 needs calibration texts (--calibration-data)")
    return [conversion(FORMAT, ctx.saved_models[SAVED_MODEL], p, artifact_filename(FORMAT, p), "fixed")
            for p in precisions]


def finish(ctx: ExportContext, results) -> list:
    from .targets import measure

    spec = require_regex_tokenizer(ctx.tokenizer)
    built = []
    for r in results:
        path = ctx.out / r["path"]
        blob, min_version = write_metadata(path.read_bytes(), ctx.tokenizer, ctx.labels)
        path.write_bytes(blob)
        extra = {"input_shape": fixed_input_shape(ctx.max_length), "output_dtype": "float32",
                 "outputs": list(MEDIAPIPE_OUTPUTS),
                 "metadata": {"task": "MediaPipe TextClassifier", "tokenizer": "regex",
                              "delimiter": spec["delimiter"], "start_token": spec["start"],
                              "min_parser_version": min_version}}
        if r["precision"] == "int8":
            extra["recipe"] = MEDIAPIPE_INT8_RECIPE
        extra.update(measure(path, ctx.max_length))
        built.append(Built(FORMAT, r["precision"], r["path"], r["seconds"], extra))
    return built


def export(ctx: ExportContext, precisions) -> list:
    return finish(ctx, convert_jobs(ctx, conversions(ctx, precisions)))


def write_metadata(model: bytes, tokenizer, labels) -> tuple:
    """``(model with metadata, its min_parser_version)`` from MediaPipe's writer."""
    import json

    from probattn.models.text.tokenizer import REGEX_DELIMITER, vocabulary

    _install_version_stand_in()
    try:
        from mediapipe.tasks.python.metadata.metadata_writers import metadata_writer, text_classifier
    except ImportError as e:
        raise UsageError(f"the mediapipe format needs the mediapipe package (pip install mediapipe): "
                         f"{one_line(e, 200)}") from None
    with tempfile.TemporaryDirectory() as tmp:
        vocab_path = Path(tmp) / "regex_vocab.txt"  # MediaPipe's format: 'token id' per line
        vocab_path.write_text("".join(f"{w} {i}\n" for i, w in enumerate(vocabulary(tokenizer))), encoding="utf-8")
        writer = None
        try:
            writer = text_classifier.MetadataWriter.create_for_regex_model(
                model_buffer=bytearray(model),
                regex_tokenizer=metadata_writer.RegexTokenizer(delim_regex_pattern=REGEX_DELIMITER,
                                                               vocab_file_path=str(vocab_path)),
                labels=metadata_writer.Labels().add(list(labels)))
            blob, meta_json = writer.populate()
        except Exception as e:
            raise UsageError(f"MediaPipe's metadata writer failed: {one_line(e, 300)}") from None
        finally:  # its __del__ removes a temporary folder; run it now, not at interpreter exit
            writer = None
            gc.collect()
    return bytes(blob), json.loads(meta_json).get("min_parser_version")


def _install_version_stand_in() -> None:
    """Put a Python ``_pywrap_metadata_version`` in place when mediapipe lacks the compiled one."""
    if _VERSION_MODULE in sys.modules:
        return
    try:
        __import__(_VERSION_MODULE)
        return
    except ImportError:
        pass
    parts = _VERSION_MODULE.split(".")
    for i in range(3, len(parts)):  # mediapipe.tasks.cc, .metadata, .python: empty packages
        name = ".".join(parts[:i])
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = []
            sys.modules[name] = pkg
            setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], pkg)
    mod = types.ModuleType(_VERSION_MODULE, "probattn's stand-in for mediapipe's missing compiled module")
    mod.GetMinimumMetadataParserVersion = minimum_parser_version
    sys.modules[_VERSION_MODULE] = mod
    setattr(sys.modules[".".join(parts[:-1])], parts[-1], mod)


def minimum_parser_version(buffer: bytes) -> str:
    """The minimum metadata parser version of the metadata ``write_metadata`` produces.

    Checks, with MediaPipe's generated schema classes, that the buffer holds only that
    metadata (a regex tokenizer, vocabulary and label files, no member newer than
    ``RegexTokenizerOptions``) and returns its version; raises ValueError otherwise."""
    from mediapipe.tasks.metadata import metadata_schema_py_generated as mfb

    meta = mfb.ModelMetadataT.InitFromObj(mfb.ModelMetadata.GetRootAs(bytes(buffer), 0))
    subgraphs = meta.subgraphMetadata or []
    files = list(meta.associatedFiles or [])
    units, regex = [], 0
    if len(subgraphs) != 1:
        raise ValueError(f"expected one subgraph's metadata, found {len(subgraphs)}")
    sg = subgraphs[0]
    if sg.inputTensorGroups or sg.outputTensorGroups or getattr(sg, "customMetadata", None):
        raise ValueError("tensor groups or custom metadata: not the metadata probattn writes")
    files += list(sg.associatedFiles or [])
    units += list(sg.inputProcessUnits or []) + list(sg.outputProcessUnits or [])
    for t in list(sg.inputTensorMetadata or []) + list(sg.outputTensorMetadata or []):
        files += list(t.associatedFiles or [])
        units += list(t.processUnits or [])
        props = t.content.contentPropertiesType if t.content is not None else 0
        if props not in (mfb.ContentProperties.NONE, mfb.ContentProperties.FeatureProperties):
            raise ValueError("content properties other than features: not the metadata probattn writes")
    for u in units:
        if u.optionsType == mfb.ProcessUnitOptions.RegexTokenizerOptions:
            regex += 1
            files += list(u.options.vocabFile or [])
        else:
            raise ValueError(f"process unit type {u.optionsType}: not the metadata probattn writes")
    allowed = (mfb.AssociatedFileType.VOCABULARY, mfb.AssociatedFileType.TENSOR_AXIS_LABELS)
    if any(f.type not in allowed or getattr(f, "version", None) for f in files):
        raise ValueError("associated files other than a vocabulary and labels: not the metadata probattn writes")
    if regex != 1:
        raise ValueError(f"expected one regex tokenizer, found {regex}")
    return REGEX_METADATA_PARSER_VERSION

"""Export formats: one module per format, each with one public ``export(ctx, precisions)``
returning the artifacts it built (as in Keras 3's ``keras/src/export/``).

The registry maps a format name (``probattn.export.contract.EXPORT_FORMATS``) to its
module. A format module declares:

* ``FORMAT``: its name in the contract;
* ``NEEDS_SAVED_MODEL``: it converts from a SavedModel (built once, in a temporary
  place when the SavedModel itself was not asked for); ``SAVED_MODEL`` says which trace
  of the serving function: ``"dynamic"`` (``[batch, sequence]``), ``"fixed"``
  (``[1, max_length]``) or ``"fixed-probabilities"`` (``[1, max_length]``, probabilities
  only);
* ``TFLITE_JOBS``: its files come from TFLite conversions. The TFLite family
  (``tflite``, ``tflite-fixed``, ``mediapipe``) offers ``conversions(ctx, precisions)``
  and ``finish(ctx, results)``: the exporter runs every conversion of the export in one
  go (``tflite.convert_jobs``, in the exporting process) after the other formats and hands
  each format its results.

Module names are the format names with ``-`` as ``_`` (``tflite-fixed``: ``tflite_fixed``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..contract import EXPORT_FORMATS


@dataclass
class ExportContext:
    """What every format exporter needs, built once by the exporter."""

    out: Path  # the bundle being written (a temporary directory until the end)
    module: object  # tf.Module whose ``serve`` is the traced serving function
    concrete: object  # its concrete function
    output_names: list  # in contract order
    opset: int = 17
    onnx_int64: bool = True  # also an int64-input twin of each ONNX precision
    calibration: list | None = None  # int32 id batches for full-int8 calibration
    saved_model_dir: Path | None = None  # set by the exporter when a format needs it
    saved_model_seconds: float = 0.0
    max_length: int = 64  # the fixed-shape formats' length
    #: one text per [1, max_length] array, for the fixed-shape formats' full-int8 calibration
    calibration_fixed: list | None = None
    #: SavedModel directory per trace (``SAVED_MODEL`` of the format modules)
    saved_models: dict = field(default_factory=dict)
    labels: list = field(default_factory=list)
    tokenizer: object = None  # the bundle's tokenizers.Tokenizer
    log: Callable = print
    fixed_length: int | None = None  # the model's own input length, or None (dynamic)
    input_dtype: str = "int32"  # the dtype the model takes (the ids are cast to it in the graph)
    head_units: dict = field(default_factory=dict)  # score output name -> units
    #: ``failed(format, precision, reason)``: one precision could not be built; the others go on
    failed: Callable | None = None


@dataclass
class Built:
    """One artifact a format exporter wrote into ``ctx.out``."""

    format: str
    precision: str
    path: str  # relative to the bundle
    seconds: float
    extra: dict = field(default_factory=dict)  # recipe, opset, ... (goes into the manifest)


def get(fmt: str):
    """The module that exports ``fmt``."""
    if fmt not in EXPORT_FORMATS:
        from probattn.models.errors import UsageError

        raise UsageError(f"unknown format '{fmt}'; allowed: {', '.join(EXPORT_FORMATS)}")
    return importlib.import_module(f"{__name__}.{fmt.replace('-', '_')}")

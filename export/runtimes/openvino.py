"""OpenVINO on the CPU. It reads ONNX and TFLite files directly (no conversion step).

Inference precision is pinned to f32 (``INFERENCE_PRECISION_HINT``): on CPUs with bf16 or
fp16 units OpenVINO would otherwise lower float32 models by default, which is a different
model, not the artifact under test.
"""
from __future__ import annotations

import numpy as np

from probattn.models.errors import UsageError, one_line

from . import register
from .base import Runner


@register
class OpenVINORunner(Runner):
    runtime = "openvino"
    formats = ("onnx", "tflite")
    requires = ("openvino",)
    package = "openvino"
    order = 40
    secondary = True
    description = "OpenVINO CPU plugin, reading .onnx and .tflite directly, f32 inference"

    def _load(self):
        import openvino as ov

        from ..contract import INPUT

        data = self.read_model(2 << 30, "model file")
        if self.path.suffix == ".onnx":
            from ..audit import onnx as onnx_audit

            onnx_audit.audit(data, what=self.path.name, model_dir=None if self.content is not None else self.path.parent,
                             vocab_size=self.vocab_size, n_classes=self.n_classes)
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        try:
            core = ov.Core()
            # ONNX from the checked bytes; OpenVINO reads TFLite only from a path
            model = core.read_model(data if self.path.suffix == ".onnx" else str(self.path))
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as e:
            raise UsageError(f"OpenVINO could not load {self.path.name} ({one_line(e, 200)})") from None
        if len(self.compiled.inputs) != 1:
            raise UsageError(f"{self.path.name}: expected one input '{INPUT}', found "
                             f"{[sorted(i.get_names()) for i in self.compiled.inputs]}")
        self.request = self.compiled.create_infer_request()
        self.names = _output_names(self.compiled, self.path)
        # an int64 twin takes int64 ids; ids are checked int32 already, so widening is exact
        self._int64 = self.compiled.inputs[0].get_element_type() == ov.Type.i64

    def _infer(self, ids):
        if self._int64:
            ids = ids.astype(np.int64)
        res = self.request.infer({0: np.ascontiguousarray(ids)})
        return {name: np.array(res[out]) for out, name in zip(self.compiled.outputs, self.names)}

    def _close(self):
        self.request = self.compiled = None


def _output_names(compiled, path) -> list:
    """The contract name of every output. ONNX and TFLite files carry the contract's names
    as their tensor names (the TFLite exporter rewrites the flatbuffer's raw names): the
    heads (``probabilities``, ``probabilities_<name>``) and ``attention_weights``. A file
    whose outputs are named otherwise was not made by probattn's exporter."""
    from ..contract import ATTENTION, OUTPUT_ORDER, is_head

    names = []
    for out in compiled.outputs:
        known = [n for n in out.get_names() if is_head(n) or n == ATTENTION]
        names.append(known[0] if known else None)
    if None in names:
        raise UsageError(f"{path.name}: output names {[sorted(o.get_names()) for o in compiled.outputs]} are not "
                         f"the contract's ({', '.join(OUTPUT_ORDER)}); re-export it with this probattn")
    return names

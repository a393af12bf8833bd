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

        if not self.path.is_file():
            raise UsageError(f"model file not found: {self.path}")
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        try:
            core = ov.Core()
            model = core.read_model(str(self.path))
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as e:
            raise UsageError(f"OpenVINO could not load {self.path.name} ({one_line(e, 200)})") from None
        if len(self.compiled.inputs) != 1:
            raise UsageError(f"{self.path.name}: expected one input '{INPUT}', found "
                             f"{[sorted(i.get_names()) for i in self.compiled.inputs]}")
        self.request = self.compiled.create_infer_request()
        self.names = _output_names(self.compiled, self.path)

    def _infer(self, ids):
        res = self.request.infer({0: np.ascontiguousarray(ids)})
        return {name: np.array(res[out]) for out, name in zip(self.compiled.outputs, self.names)}

    def _close(self):
        self.request = self.compiled = None


def _output_names(compiled, path) -> list:
    """The contract name of every output. ONNX keeps the names; a TFLite flatbuffer may
    carry only converter tensor names, mapped here through its signature."""
    from ..contract import ATTENTION, OUTPUT_ORDER, is_head

    names = []
    for out in compiled.outputs:
        known = [n for n in out.get_names() if is_head(n) or n == ATTENTION]
        names.append(known[0] if known else None)
    if None in names and path.suffix == ".tflite":
        mapping = _tflite_signature_names(path)
        names = [n or next((mapping[t] for t in out.get_names() if t in mapping), None)
                 for n, out in zip(names, compiled.outputs)]
    if None in names:
        raise UsageError(f"{path.name}: cannot tell which output is which "
                         f"({[sorted(o.get_names()) for o in compiled.outputs]}); expected {', '.join(OUTPUT_ORDER)}")
    return names


def _tflite_signature_names(path) -> dict:
    """tensor name -> signature output name, read with the LiteRT interpreter."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return {}
    from ..contract import SIGNATURE_KEY

    interp = Interpreter(model_path=str(path))
    details = interp.get_signature_runner(SIGNATURE_KEY).get_output_details()
    by_index = {t["index"]: t["name"] for t in interp.get_tensor_details()}
    return {by_index[d["index"]]: name for name, d in details.items()}

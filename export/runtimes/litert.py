"""LiteRT (``ai_edge_litert``) on two kernel families: ``xnnpack`` (the default delegate)
and ``reference`` (``BUILTIN_REF``: the kernels microcontroller builds run).

It runs the dynamic ``tflite`` files (what ``predict --runtime litert`` picks) and, in
verify and bench, the fixed-shape ``tflite-fixed`` and ``mediapipe`` files at their
stored shape. int8 outputs are dequantized with their own scale and zero point."""
from __future__ import annotations

import numpy as np

from probattn.models.errors import UsageError, one_line

from . import register
from .base import Runner


@register
class LiteRTRunner(Runner):
    runtime = "litert"
    formats = ("tflite", "tflite-fixed", "mediapipe")  # the first is what predict runs
    variants = ("xnnpack", "reference")
    requires = ("ai_edge_litert",)
    package = "ai-edge-litert"
    order = 20
    description = "ai_edge_litert Interpreter, XNNPACK or reference kernels"

    def _load(self):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        from probattn.models.quiet import quiet_stderr

        from ..contract import INPUT, SIGNATURE_KEY

        resolver = OpResolverType.AUTO if self.variant == "xnnpack" else OpResolverType.BUILTIN_REF
        if not self.path.is_file():
            raise UsageError(f"TFLite file not found: {self.path}")
        try:
            with quiet_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
                self.interp = Interpreter(model_path=str(self.path), num_threads=self.threads or None,
                                          experimental_op_resolver_type=resolver)
            sigs = self.interp.get_signature_list()
            if SIGNATURE_KEY not in sigs:
                raise UsageError(f"{self.path.name} has no '{SIGNATURE_KEY}' signature (found {list(sigs)})")
            self.runner = self.interp.get_signature_runner(SIGNATURE_KEY)
            shape = [int(d) for d in self.runner.get_input_details()[INPUT]["shape_signature"]]
            if len(shape) == 2 and min(shape) >= 1:  # a fixed-shape file: run only that shape
                if (self.fixed_batch, self.fixed_length) not in ((None, None), tuple(shape)):
                    raise UsageError(f"{self.path.name}: the manifest says input [{self.fixed_batch}, "
                                     f"{self.fixed_length}], the file stores {shape}")
                self.fixed_batch, self.fixed_length = shape
            with quiet_stderr():  # the delegate is created, and announces itself, on first use
                self.runner(**{INPUT: np.zeros([max(1, d) for d in shape] if len(shape) == 2 else (1, 1), np.int32)})
            # int8 outputs (a device artifact) come back as float32: (q - zero_point) * scale
            self._quantized = {}
            for name, d in self.runner.get_output_details().items():
                q = d["quantization_parameters"]
                if np.issubdtype(d["dtype"], np.integer) and len(q["scales"]):
                    self._quantized[name] = (np.float32(q["scales"][0]), np.float32(q["zero_points"][0]))
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"{self.path} is not a valid TFLite model ({one_line(e, 200)})") from None
        self._input = INPUT

    def _infer(self, ids):
        out = self.runner(**{self._input: ids})
        for name, (scale, zero_point) in self._quantized.items():
            out[name] = (out[name].astype(np.float32) - zero_point) * scale
        return out

    def _close(self):
        self.runner = self.interp = None

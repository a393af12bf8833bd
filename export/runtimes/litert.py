"""LiteRT (``ai_edge_litert``) on two kernel families: ``xnnpack`` (the default delegate)
and ``reference`` (``BUILTIN_REF``: the kernels microcontroller builds run)."""
from __future__ import annotations

import numpy as np

from probattn.models.errors import UsageError, one_line

from . import register
from .base import Runner


@register
class LiteRTRunner(Runner):
    runtime = "litert"
    formats = ("tflite",)
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
            with quiet_stderr():  # the delegate is created, and announces itself, on first use
                self.runner(**{INPUT: np.zeros((1, self.fixed_length or 1), np.int32)})
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"{self.path} is not a valid TFLite model ({one_line(e, 200)})") from None
        self._input = INPUT

    def _infer(self, ids):
        return self.runner(**{self._input: ids})

    def _close(self):
        self.runner = self.interp = None

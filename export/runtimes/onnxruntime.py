"""onnxruntime on the CPU, with every graph optimisation (``all``) or none (``none``).

Before onnxruntime sees a file, ``audit.onnx`` checks its bytes (ops, loops, tensor sizes,
external data, the I/O signature, the embedding's rows); the session then runs in the
process-wide capped arena with limited constant folding (``limits.ort_session_options``)."""
from __future__ import annotations

import numpy as np

from probattn.models.errors import UsageError, one_line

from . import register
from .base import Runner


@register
class OnnxRuntimeRunner(Runner):
    runtime = "onnxruntime"
    formats = ("onnx",)
    variants = ("all", "none")
    requires = ("onnxruntime",)
    package = "onnxruntime"
    order = 30
    description = "onnxruntime CPUExecutionProvider, graph optimisation all or none"

    def _load(self):
        import onnxruntime as ort

        from ..audit import onnx as onnx_audit
        from ..contract import INPUT
        from ..limits import ort_session_options

        data = self.read_model(onnx_audit.MAX_FILE_BYTES, "ONNX model")
        # a model from a bundle comes as checked bytes: its external data could not be checked, so none is allowed
        self.audit = onnx_audit.audit(data, what=self.path.name,
                                      model_dir=None if self.content is not None else self.path.parent,
                                      vocab_size=self.vocab_size, n_classes=self.n_classes)
        so = ort_session_options(self.threads, optimize=self.variant == "all", spin=self.spin)
        try:
            # with external data, onnxruntime must read the file to find it (checked above: inside its folder)
            model = str(self.path) if self.audit["external_data"] else data
            self.sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise UsageError(f"{self.path} is not a valid ONNX model ({one_line(e, 200)})") from None
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self._input = INPUT
        # an int64 twin takes int64 ids; ids are checked int32 already, so widening is exact
        self._int64 = any(i.name == INPUT and i.type == "tensor(int64)" for i in self.sess.get_inputs())
        #: the session's own run, past ``InferenceSession.run``'s per-call checks of the feed
        #: (names, OrtValue ownership, graph capture), which our one numpy input never needs:
        #: 8-12 us of a 40-50 us single-text call; the public run if a version lacks it
        inner = getattr(self.sess, "_sess", None)
        self._run = (lambda names, feed: inner.run(names, feed, None)) if callable(getattr(inner, "run", None)) \
            else self.sess.run

    def _infer(self, ids):
        return self._infer_outputs(ids, self.outputs)

    def _infer_outputs(self, ids, names):
        return dict(zip(names, self._call(names, ids.astype(np.int64) if self._int64 else ids)))

    def run_row(self, row: list, max_length: int, output: str) -> list:
        return self._call([output], np.array([row], np.int64 if self._int64 else np.int32))[0][0].tolist()

    def _call(self, names, ids) -> list:
        try:
            return self._run(names, {self._input: ids})
        except Exception as e:  # e.g. the capped arena refused an allocation
            raise UsageError(f"onnxruntime failed on {self.path.name} with input {list(ids.shape)} "
                             f"({one_line(e, 240)})") from None

    def precision_problem(self, precision):
        from ..audit.onnx import precision_problem

        return precision_problem(self.audit, precision)

    def _close(self):
        self.sess = None


"""onnxruntime on the CPU, with every graph optimisation (``all``) or none (``none``)."""
from __future__ import annotations

from pathlib import Path

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

        from ..contract import INPUT

        so = ort.SessionOptions()
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if self.variant == "all"
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        if not self.path.is_file():
            raise UsageError(f"ONNX file not found: {self.path}")
        refuse_external_data(self.path)
        try:
            self.sess = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise UsageError(f"{self.path} is not a valid ONNX model ({one_line(e, 200)})") from None
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self._input = INPUT
        # an int64 twin takes int64 ids; ids are checked int32 already, so widening is exact
        self._int64 = any(i.name == INPUT and i.type == "tensor(int64)" for i in self.sess.get_inputs())

    def _infer(self, ids):
        if self._int64:
            ids = ids.astype(np.int64)
        return dict(zip(self.outputs, self.sess.run(self.outputs, {self._input: ids})))

    def _close(self):
        self.sess = None


def refuse_external_data(path: Path) -> None:
    """ONNX external-data locations must stay inside the model's folder."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UsageError(f"{path} is not a valid ONNX model ({one_line(e, 200)})") from None
    base = path.parent.resolve()
    graphs = [model.graph] + [f for f in model.functions]  # functions hold nodes, like graphs
    for t in (t for g in graphs for t in _all_tensors(g)):
        for entry in t.external_data:
            if entry.key == "location":
                target = (base / entry.value).resolve()
                if base != target.parent and base not in target.parents:
                    raise UsageError(f"{path.name}: external data '{entry.value}' points outside the "
                                     "model's folder; refusing it")


def _all_tensors(graph):
    """Every tensor of a graph: initializers, sparse initializers, and tensors held in node
    attributes (``Constant``'s value, subgraphs of ``If``/``Loop``/``Scan``), recursively.
    Any of them can name an external-data file."""
    for t in getattr(graph, "initializer", ()):
        yield t
    for sp in getattr(graph, "sparse_initializer", ()):
        yield sp.values
        yield sp.indices
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("sparse_tensor"):
                yield a.sparse_tensor.values
                yield a.sparse_tensor.indices
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _all_tensors(g)

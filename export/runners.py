"""One small Runner per runtime: load, run token ids, report input/output metadata.

Only the Keras and SavedModel runners import TensorFlow, and only when loaded. Input
checks happen once, in the base class, with a fixed message shape:
``Input 'token_ids' | Received dtype float32. Expected an integer dtype``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .errors import UsageError, one_line

INPUT = "token_ids"


def check_token_ids(ids, vocab_size: int | None) -> np.ndarray:
    """Validate before inference: runtimes differ here (onnxruntime errors, a TFLite
    gather may read out of bounds), so the check is ours. The common case (an int32
    matrix of valid ids) costs one pass over the ids."""
    arr = ids if type(ids) is np.ndarray else np.asarray(ids)
    if arr.dtype != np.int32:
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer):
            raise UsageError(f"Input '{INPUT}' | Received dtype {arr.dtype}. Expected an integer dtype (int32)")
    if arr.ndim != 2:
        raise UsageError(f"Input '{INPUT}' | Received rank {arr.ndim} (shape {arr.shape}). Expected rank 2 [batch, sequence]")
    if arr.size == 0:
        raise UsageError(f"Input '{INPUT}' | Received an empty batch (shape {arr.shape}). Expected at least 1 x 1")
    if arr.dtype != np.int32:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= min(vocab_size or 2**31 - 1, 2**31 - 1):
            _raise_range(lo, hi, vocab_size)
        arr = arr.astype(np.int32)
    elif vocab_size is not None and _max_as_unsigned(arr) >= vocab_size:  # negatives wrap high
        _raise_range(int(arr.min()), int(arr.max()), vocab_size)
    return arr


#: Up to this many ids the range check runs in Python: a NumPy reduction right before an
#: onnxruntime call measured ~11 us slower at batch 1 x 64 (vs ~3 us in Python), which
#: is a third of the call itself. Larger inputs use NumPy.
_PY_CHECK_MAX = 4096


def _max_as_unsigned(arr: np.ndarray) -> int:
    flat = arr.view(np.uint32).ravel()
    return max(flat.tolist()) if flat.size <= _PY_CHECK_MAX else int(flat.max())


def _raise_range(lo, hi, vocab_size):
    bad = lo if lo < 0 else hi
    raise UsageError(f"Input '{INPUT}' | Received id {bad}. Expected ids in [0, {vocab_size})")


class Runner:
    """Base: ``with runner: runner.run(ids) -> {output name: array}``."""

    runtime = "base"
    requires = ()  # import names; a runtime that is missing is skipped with the reason

    def __init__(self, path, vocab_size: int | None = None, threads: int | None = None):
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.threads = threads
        self.loaded = False

    @property
    def name(self) -> str:
        return self.runtime

    @classmethod
    def unavailable(cls) -> str | None:
        """None when the runtime can run here; otherwise the reason it is skipped."""
        missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        return f"{', '.join(missing)} not installed" if missing else None

    def load(self):
        if not self.loaded:
            self._load()
            self.loaded = True
        return self

    def run(self, ids) -> dict:
        self.load()
        ids = check_token_ids(ids, self.vocab_size)
        return {k: np.asarray(v, dtype=np.float32) for k, v in self._run(ids).items()}

    def metadata(self) -> dict:
        self.load()
        return self._metadata()

    def close(self):
        self.loaded = False

    def __enter__(self):
        return self.load()

    def __exit__(self, *exc):
        self.close()

    # subclasses
    def _load(self):
        raise NotImplementedError

    def _run(self, ids) -> dict:
        raise NotImplementedError

    def _metadata(self) -> dict:
        raise NotImplementedError


class KerasRunner(Runner):
    """The reference: ``model.keras`` called directly (not ``predict``), safe mode on."""

    runtime = "keras"
    requires = ("tensorflow", "tf_keras")

    def __init__(self, path, vocab_size=None, threads=None, unsafe=False, attention=True):
        super().__init__(path, vocab_size, threads)
        self.unsafe = unsafe
        self.attention = attention

    def _load(self):
        from .keras_io import load_keras_model
        from .serving import PROBABILITIES, with_attention_output

        if self.threads:
            _tf_threads(self.threads)
        model = load_keras_model(self.path, unsafe=self.unsafe)
        self.model = (with_attention_output(model) if self.attention else None) or model
        self._single = PROBABILITIES

    def _run(self, ids):
        out = self.model(ids, training=False)
        if isinstance(out, dict):
            return {k: v.numpy() for k, v in out.items()}
        return {self._single: out.numpy()}

    def _metadata(self):
        outs = self.model.output
        names = sorted(outs) if isinstance(outs, dict) else [self._single]
        return {"inputs": [{"name": INPUT, "dtype": "int32", "shape": [None, None]}],
                "outputs": [{"name": n} for n in names]}


def _tf_threads(n):
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # already initialised in this process


class SavedModelRunner(Runner):
    runtime = "savedmodel"
    requires = ("tensorflow",)

    def _load(self):
        from .quiet import import_tensorflow

        tf = import_tensorflow()
        if self.threads:
            _tf_threads(self.threads)
        try:
            self.obj = tf.saved_model.load(str(self.path))
        except Exception as e:
            raise UsageError(f"could not load SavedModel {self.path}: {one_line(e, 200)}") from None
        if "serving_default" not in self.obj.signatures:
            raise UsageError(f"SavedModel {self.path} has no 'serving_default' signature")
        self.fn = self.obj.signatures["serving_default"]

    def _run(self, ids):
        import tensorflow as tf

        return {k: v.numpy() for k, v in self.fn(token_ids=tf.constant(ids)).items()}

    def _metadata(self):
        spec = self.fn.structured_input_signature[1]
        return {"inputs": [{"name": k, "dtype": v.dtype.name, "shape": v.shape.as_list()} for k, v in spec.items()],
                "outputs": [{"name": k, "dtype": v.dtype.name, "shape": v.shape.as_list()}
                            for k, v in self.fn.structured_outputs.items()]}


class LiteRTRunner(Runner):
    """``ai_edge_litert`` interpreter. ``kernels='xnnpack'`` (default delegate) or
    ``'reference'`` (``BUILTIN_REF``: the kernels microcontroller builds run)."""

    runtime = "litert"
    requires = ("ai_edge_litert",)
    KERNELS = ("xnnpack", "reference")

    def __init__(self, path, vocab_size=None, threads=None, kernels="xnnpack"):
        super().__init__(path, vocab_size, threads)
        if kernels not in self.KERNELS:
            raise UsageError(f"unknown LiteRT kernels '{kernels}'; allowed: {', '.join(self.KERNELS)}")
        self.kernels = kernels

    @property
    def name(self):
        return f"litert-{self.kernels}"

    def _load(self):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        resolver = OpResolverType.AUTO if self.kernels == "xnnpack" else OpResolverType.BUILTIN_REF
        if not self.path.is_file():
            raise UsageError(f"TFLite file not found: {self.path}")
        from .quiet import quiet_stderr

        try:
            with quiet_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
                self.interp = Interpreter(model_path=str(self.path), num_threads=self.threads or None,
                                          experimental_op_resolver_type=resolver)
            sigs = self.interp.get_signature_list()
            if "serving_default" not in sigs:
                raise UsageError(f"{self.path.name} has no 'serving_default' signature (found {list(sigs)})")
            self.runner = self.interp.get_signature_runner("serving_default")
            with quiet_stderr():  # the delegate is created, and announces itself, on first use
                self.runner(token_ids=np.zeros((1, 1), np.int32))
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"{self.path} is not a valid TFLite model ({one_line(e, 200)})") from None

    def _run(self, ids):
        return self.runner(token_ids=ids)

    def _metadata(self):
        ins = self.runner.get_input_details()
        outs = self.runner.get_output_details()

        def desc(name, d):
            return {"name": name, "dtype": np.dtype(d["dtype"]).name,
                    "shape": [int(x) if x >= 0 else None for x in d["shape_signature"]]}

        return {"inputs": [desc(k, v) for k, v in ins.items()],
                "outputs": [desc(k, v) for k, v in outs.items()]}

    def close(self):
        self.runner = self.interp = None
        super().close()


class OnnxRunner(Runner):
    """onnxruntime CPU, ``optimization='all'`` (every graph optimization) or ``'none'``."""

    runtime = "onnxruntime"
    requires = ("onnxruntime",)
    LEVELS = ("all", "none")

    def __init__(self, path, vocab_size=None, threads=None, optimization="all"):
        super().__init__(path, vocab_size, threads)
        if optimization not in self.LEVELS:
            raise UsageError(f"unknown onnxruntime optimization '{optimization}'; allowed: {', '.join(self.LEVELS)}")
        self.optimization = optimization

    @property
    def name(self):
        return f"onnxruntime-{self.optimization}"

    def _load(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if self.optimization == "all"
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        if not self.path.is_file():
            raise UsageError(f"ONNX file not found: {self.path}")
        _refuse_external_data(self.path)
        try:
            self.sess = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise UsageError(f"{self.path} is not a valid ONNX model ({one_line(e, 200)})") from None
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def _run(self, ids):
        return dict(zip(self.outputs, self.sess.run(self.outputs, {INPUT: ids})))

    def _metadata(self):
        def desc(v):
            return {"name": v.name, "dtype": v.type, "shape": [d if isinstance(d, int) else d for d in v.shape]}

        return {"inputs": [desc(v) for v in self.sess.get_inputs()],
                "outputs": [desc(v) for v in self.sess.get_outputs()]}

    def close(self):
        self.sess = None
        super().close()


def _refuse_external_data(path: Path) -> None:
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


def runner_for(fmt: str, path, vocab_size=None, threads=None, variant=None) -> Runner:
    if fmt == "keras":
        return KerasRunner(path, vocab_size, threads)
    if fmt == "savedmodel":
        return SavedModelRunner(path, vocab_size, threads)
    if fmt == "tflite":
        return LiteRTRunner(path, vocab_size, threads, kernels=variant or "xnnpack")
    if fmt == "onnx":
        return OnnxRunner(path, vocab_size, threads, optimization=variant or "all")
    raise UsageError(f"unknown format '{fmt}'; allowed: keras, savedmodel, tflite, onnx")


#: The runtimes each format is verified on.
VARIANTS = {"keras": [None], "savedmodel": [None], "tflite": ["xnnpack", "reference"], "onnx": ["all", "none"]}

"""LiteRT (``ai_edge_litert``) on two kernel families: ``xnnpack`` (the default delegate)
and ``reference`` (``BUILTIN_REF``: the kernels microcontroller builds run).

The interpreter gets the file's bytes (hash-checked by the caller when they come from a
bundle), and before anything runs: the tensors the graph declares must fit
``limits.TFLITE_STATIC_BYTES``, the signature must be the contract's, and the embedding (the
``GATHER`` fed by the input) must have a row for every id of the vocabulary: LiteRT's gather
does not check its indices.

It runs the dynamic ``tflite`` files (what ``predict --runtime litert`` picks) and, in
verify and bench, the fixed-shape ``tflite-fixed`` and ``mediapipe`` files at their
stored shape. int8 outputs are dequantized with their own scale and zero point."""
from __future__ import annotations

import numpy as np

from probattn.models.errors import UsageError, one_line

from . import register
from .base import Runner

#: the largest .tflite file read into memory (flatbuffers address 2 GB)
MAX_FILE_BYTES = 2 << 30
#: output dtypes a TFLite artifact may have (float32; int8 for device artifacts with quantized outputs)
OUTPUT_DTYPES = ("float32", "int8")


@register
class LiteRTRunner(Runner):
    runtime = "litert"
    formats = ("tflite", "tflite-fixed", "mediapipe")  # the first is what predict runs
    variants = ("xnnpack", "reference")
    requires = ("ai_edge_litert",)
    package = "ai-edge-litert"
    order = 20
    single_lengths = (64, 256, 1024, 4096)
    description = "ai_edge_litert Interpreter, XNNPACK or reference kernels"

    def _load(self):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        from probattn.models.quiet import quiet_stderr

        from ..contract import INPUT, SIGNATURE_KEY
        from ..limits import TFLITE_STATIC_BYTES, tflite_static_bytes

        resolver = OpResolverType.AUTO if self.variant == "xnnpack" else OpResolverType.BUILTIN_REF
        data = self.read_model(MAX_FILE_BYTES, "TFLite model")
        try:
            with quiet_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
                self.interp = Interpreter(model_content=data, num_threads=self.threads or None,
                                          experimental_op_resolver_type=resolver)
            static = tflite_static_bytes(self.interp)
            if static > TFLITE_STATIC_BYTES:
                raise UsageError(f"{self.path.name} declares tensors of {static:,} bytes; at most "
                                 f"{TFLITE_STATIC_BYTES:,} allowed")
            sigs = self.interp.get_signature_list()
            if SIGNATURE_KEY not in sigs:
                raise UsageError(f"{self.path.name} has no '{SIGNATURE_KEY}' signature (found {list(sigs)})")
            self.runner = self.interp.get_signature_runner(SIGNATURE_KEY)
            self._check_signature()
            shape = [int(d) for d in self.runner.get_input_details()[INPUT]["shape_signature"]]
            if len(shape) == 2 and min(shape) >= 1:  # a fixed-shape file: run only that shape
                if (self.fixed_batch, self.fixed_length) not in ((None, None), tuple(shape)):
                    raise UsageError(f"{self.path.name}: the manifest says input [{self.fixed_batch}, "
                                     f"{self.fixed_length}], the file stores {shape}")
                self.fixed_batch, self.fixed_length = shape
            # int8 outputs (a device artifact) come back as float32: (q - zero_point) * scale
            self._quantized = {}
            for name, d in self.runner.get_output_details().items():
                q = d["quantization_parameters"]
                if np.issubdtype(d["dtype"], np.integer) and len(q["scales"]):
                    self._quantized[name] = (np.float32(q["scales"][0]), np.float32(q["zero_points"][0]))
            self._input = INPUT
            self._raw = self._raw_indexes(sigs)
            self._shape = None
            if self._raw is not None:  # the SignatureRunner holds the interpreter: resizing needs it gone
                self.runner = None
                # ``tensor(i)()``: a view of tensor i's buffer as it is now (None: the input)
                self._views = {None: self.interp.tensor(self._raw[0]),
                               **{k: self.interp.tensor(i) for k, i in self._raw[1].items()}}
            with quiet_stderr():  # the delegate is created, and announces itself, on first use
                self._infer(np.zeros([max(1, d) for d in shape] if len(shape) == 2 else (1, 1), np.int32))
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"{self.path} is not a valid TFLite model ({one_line(e, 200)})") from None

    def _check_signature(self):
        from ..contract import ATTENTION, INPUT, PROBABILITIES, is_head

        ins = self.runner.get_input_details()
        got = {k: (np.dtype(v["dtype"]).name, len(v["shape_signature"])) for k, v in ins.items()}
        if got != {INPUT: ("int32", 2)}:
            raise UsageError(f"{self.path.name}: inputs are {got}; expected exactly {INPUT} int32 rank 2")
        outs = self.runner.get_output_details()
        shown = {k: (np.dtype(v["dtype"]).name, list(v["shape_signature"])) for k, v in outs.items()}
        if PROBABILITIES not in outs or any(k != ATTENTION and not is_head(k) for k in outs) or \
                any(d not in OUTPUT_DTYPES or len(s) != 2 for d, s in shown.values()):
            raise UsageError(f"{self.path.name}: outputs are {shown}; expected {PROBABILITIES}, further heads "
                             f"{PROBABILITIES}_NAME and optionally {ATTENTION}, rank 2, float32")
        classes = shown[PROBABILITIES][1][1]
        if self.n_classes is not None and classes > 0 and classes != self.n_classes:
            raise UsageError(f"{self.path.name}: output {PROBABILITIES} has {classes} classes; the bundle has "
                             f"{self.n_classes} labels")
        rows = self.embedding_rows(ins[INPUT]["index"])
        if self.vocab_size is not None and rows is not None and self.vocab_size > rows:
            raise UsageError(f"{self.path.name}: the embedding has {rows:,} rows but the bundle's vocabulary has "
                             f"{self.vocab_size:,} ids; ids past the table would be read (LiteRT's gather does not "
                             "check them)")

    def embedding_rows(self, input_index) -> int | None:
        """Rows of the table a GATHER / EMBEDDING_LOOKUP reads with the input ids, if any."""
        try:
            ops = self.interp._get_ops_details()
        except AttributeError:  # pragma: no cover - an interpreter without op details
            return None
        shapes = {t["index"]: list(t["shape"]) for t in self.interp.get_tensor_details()}
        rows = []
        for op in ops:
            ins = list(op.get("inputs", []))
            if op.get("op_name") == "GATHER" and len(ins) >= 2 and ins[1] == input_index:
                rows.append(shapes.get(ins[0], [0])[0])
            elif op.get("op_name") == "EMBEDDING_LOOKUP" and len(ins) >= 2 and ins[0] == input_index:
                rows.append(shapes.get(ins[1], [0])[0])
        return min(rows) if rows else None

    def precision_problem(self, precision):
        types = {np.dtype(t["dtype"]).name for t in self.interp.get_tensor_details()}
        if precision == "fp32" and types & {"float16", "int8", "uint8"}:
            return "it holds " + ", ".join(sorted(types & {"float16", "int8", "uint8"})) + " tensors, not fp32 weights"
        if precision == "fp16" and "float16" not in types:
            return "it holds no float16 tensor"
        if precision.startswith("int8") and not types & {"int8", "uint8"}:
            return "it holds no int8 tensor"
        return None

    def _raw_indexes(self, sigs):
        """``(input index, {output name: index})`` when the file's one signature is its main
        subgraph's inputs and outputs: then calls go through the interpreter itself
        (``set_tensor``, ``invoke``, ``get_tensor``: 2 us less a call than the
        SignatureRunner), else None."""
        from ..contract import INPUT

        full = self.interp._get_full_signature_list() if hasattr(self.interp, "_get_full_signature_list") else None
        if not full or len(full) != 1:
            return None
        sig = next(iter(full.values()))
        main_in = {d["index"] for d in self.interp.get_input_details()}
        main_out = {d["index"] for d in self.interp.get_output_details()}
        if set(sig["inputs"]) != {INPUT} or set(sig["inputs"].values()) != main_in or \
                set(sig["outputs"].values()) != main_out:
            return None
        return sig["inputs"][INPUT], dict(sig["outputs"])

    def _infer(self, ids):
        return self._infer_outputs(ids, None)

    def _infer_outputs(self, ids, names):
        if self._raw is None:
            out = self.runner(**{self._input: ids})
            if names is not None:
                out = {k: out[k] for k in names}
        else:
            interp, (index, outputs) = self.interp, self._raw
            self._input_shape(ids.shape)
            interp.set_tensor(index, ids)
            interp.invoke()
            get = interp.get_tensor
            out = {k: get(outputs[k]) for k in (outputs if names is None else names)}
        for name, (scale, zero_point) in self._quantized.items():
            if name in out:
                out[name] = (out[name].astype(np.float32) - zero_point) * scale
        return out

    def _input_shape(self, shape):
        """The raw interpreter's input resized to ``shape`` (and its tensors reallocated) when
        it has another shape."""
        shape = tuple(shape)
        if shape != self._shape:
            self.interp.resize_tensor_input(self._raw[0], shape, strict=True)
            self.interp.allocate_tensors()
            self._shape = shape

    def run_row(self, row: list, max_length: int, output: str) -> list:
        """The raw interpreter's own buffers: the ids written into the input tensor and the
        output read from its tensor (no ``set_tensor`` / ``get_tensor`` copies); the base
        class's way for files it does not suit."""
        if self._raw is None or self._quantized or self.fixed_length is not None or self.fixed_batch is not None:
            return super().run_row(row, max_length, output)
        n = len(row)
        self._input_shape((1, self.row_width(n, max_length)))
        view = self._views[None]()
        view[0, :n] = row
        view[0, n:] = 0
        del view  # the interpreter refuses to run while a view of its buffers is held
        self.interp.invoke()
        return self._views[output]()[0].tolist()

    def _close(self):
        self.runner = self.interp = None

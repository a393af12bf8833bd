"""The one traced serving function every artifact is made from, following the model.

Input ``token_ids``: int32 ``[batch, sequence]``. The sequence dim is dynamic, or the
model's own length when its ``Input`` has one (``Input(shape=(64,))``: exported at 64;
runners pad shorter ids). Ids are cast inside the graph to the dtype the model takes
(float32 for the seed page's ``Input(shape=(maxlen,))``), so no converter can round them.

Outputs, named in ``probattn.export.contract``: one per head of the model. The first head
is ``probabilities``; further heads of a multi-output model are
``probabilities_<keras output name>``. Each head has a kind, found by running the model
(``head_kind``): ``softmax`` (rows sum to 1: the decision is the top class), ``sigmoid``
(values in [0, 1] that do not sum to 1: one decision per unit at 0.5; one unit is a
binary head), ``scores`` (unbounded, several units: top class) or ``logit`` (unbounded, one
unit: positive when >= 0). When the model holds one ProbAttention layer in its functional
graph, ``attention_weights`` ``[batch, sequence]`` comes last.

The traced function lives on a ``tf.Module`` that tracks the raw ``tf.Variable`` of every
Keras variable: a Keras 3 model (or its ``keras.Variable`` wrappers) held on a ``tf.Module``
gives TFLite files with ``VAR_HANDLE``/``READ_VARIABLE`` ops that run as NaN on XNNPACK.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

from probattn.models.errors import UsageError, one_line

from .contract import ATTENTION, INPUT, PROBABILITIES

#: head kinds and what a decision is for each
HEAD_KINDS = ("softmax", "sigmoid", "scores", "logit")
#: a head whose rows sum to 1 within this is a softmax (float32 sums of a softmax are
#: within a few ulps of 1; a sigmoid head's rows miss 1 by far more on random ids)
SOFTMAX_SUM_TOLERANCE = 1e-3


@dataclass
class Head:
    output: str  # exported output name
    keras_output: str  # the Keras model's name for it
    kind: str  # HEAD_KINDS
    units: int
    labels: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ServingSpec:
    input_dtype: str  # what the model takes; the int32 ids are cast to it in the graph
    fixed_length: int | None
    heads: list
    attention: bool
    rewrites: list = field(default_factory=list)

    @property
    def output_names(self) -> list:
        return [h.output for h in self.heads] + ([ATTENTION] if self.attention else [])


def head_kind(values: np.ndarray) -> str:
    """The kind of a head, from its outputs on probe ids (finite rows only)."""
    v = np.asarray(values, np.float64)
    v = v.reshape(v.shape[0], -1)
    v = v[np.isfinite(v).all(axis=1)]
    units = v.shape[1]
    if v.size == 0:
        return "softmax" if units > 1 else "sigmoid"
    bounded = bool((v >= 0).all() and (v <= 1).all())
    if bounded and units > 1 and np.abs(v.sum(axis=1) - 1).max() <= SOFTMAX_SUM_TOLERANCE:
        return "softmax"
    if bounded:
        return "sigmoid"
    return "scores" if units > 1 else "logit"


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", str(name)).strip("_") or "output"


def probe_ids(vocab_size: int, length: int | None, seed: int = 0) -> np.ndarray:
    """Ragged right-padded ids (one all-padding row) for probing a model's heads and
    checking rewrites: 16 rows, lengths 1 to ``length`` (default 24)."""
    rng = np.random.default_rng(seed)
    width = length or 24
    ids = np.zeros((16, width), np.int32)
    for i in range(15):
        n = int(rng.integers(1, width + 1))
        ids[i, :n] = rng.integers(1, max(2, vocab_size), n)
    return ids


# ---------------------------------------------------------------------------- Keras models

def model_input(model):
    """The model's one input tensor: rank 2 ``(batch, sequence)``; refused otherwise."""
    inputs = list(getattr(model, "inputs", None) or [])
    if len(inputs) != 1:
        if not inputs:
            return None  # a subclassed model that was never called symbolically
        raise UsageError(f"the model takes {len(inputs)} inputs; probattn exports models with one input of "
                         "token ids [batch, sequence]")
    x = inputs[0]
    if len(x.shape) != 2:
        raise UsageError(f"the model's input has shape {tuple(x.shape)}; expected token ids [batch, sequence]")
    return x


def _dtype_name(dtype) -> str:
    return getattr(dtype, "name", None) or str(dtype)


def keras_outputs(model) -> list:
    """``[(name, tensor), ...]`` of a functional model, in the model's order."""
    outs = model.outputs
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != len(outs):
        names = [getattr(t, "name", f"output_{i}") for i, t in enumerate(outs)]
    return [(str(n).split("/")[0].split(":")[0], t) for n, t in zip(names, outs)]


def _subclassed_input(model, vocab_size) -> tuple:
    """``(dtype, None)`` for a model without a symbolic input (a subclassed model): the ids
    dtype it accepts, int32 first, then float32 (a model that takes neither is refused)."""
    import tensorflow as tf

    ids = probe_ids(vocab_size, None)[:2]
    errors = []
    for dtype in ("int32", "float32"):
        try:
            model(tf.cast(ids, dtype), training=False)
            return dtype, None
        except Exception as e:
            errors.append(f"{dtype}: {one_line(e, 120)}")
    raise UsageError("the model has no Input and cannot be called with token ids [batch, sequence] ("
                     + "; ".join(errors) + ")")


def _call_outputs(out) -> list:
    """A model call's result as a list of tensors in a stable order."""
    if isinstance(out, dict):
        return [out[k] for k in out]
    if isinstance(out, (list, tuple)):
        return list(out)
    return [out]


def with_attention_output(model):
    """A functional model with outputs ``[*model outputs, attention weights]`` sharing the
    original weights, or None when the model has no single ProbAttention layer reachable in
    its functional graph."""
    from probattn.models.classifier import find_attention_layer
    from probattn.models.keras_compat import flavour_of, get_keras
    from probattn.models.layers import layer_call_input, layer_classes

    layer = find_attention_layer(model)
    if layer is None or model_input(model) is None:
        return None
    flavour = flavour_of(model)
    keras = get_keras(flavour)
    try:
        x, mask = layer_call_input(layer)
        view = layer_classes(flavour).AttentionWeightsView(layer, name="probattn_attention_weights")
        weights = view(x, **({} if mask is None else {"mask": mask}))
        outs = [t for _, t in keras_outputs(model)]
        return keras.Model(model_input(model), outs + [weights])
    except Exception:  # nested or shared layers without one functional path
        return None


class KerasServing:
    """How one Keras model is called to produce the exported outputs (used both to trace
    the serving function and to run the reference)."""

    def __init__(self, model, attention: bool, vocab_size: int, labels: list | None = None):
        from probattn.models.keras_compat import flavour_of

        self.model = model
        self.flavour = flavour_of(model)
        x = model_input(model)
        if x is None:  # a subclassed model: no symbolic input; it is called with ids as they come
            self.input_dtype, self.fixed_length = _subclassed_input(model, vocab_size)
        else:
            self.input_dtype = _dtype_name(x.dtype)
            length = x.shape[1]
            self.fixed_length = int(length) if length is not None else None
        if self.input_dtype == "string":
            raise UsageError("the model takes text (a TextVectorization layer?) that probattn could not strip")
        self.explained = with_attention_output(model) if attention else None
        self.target = self.explained or model
        self.attention = self.explained is not None
        names = [n for n, _ in keras_outputs(model)] if getattr(model, "outputs", None) else []
        probe = probe_ids(vocab_size, self.fixed_length)
        outs = [np.asarray(o) for o in self._raw(probe)]
        n_heads = len(outs) - (1 if self.attention else 0)
        if len(names) != n_heads:
            names = [f"output_{i}" for i in range(n_heads)]
        self.heads = []
        used = set()
        for i, (name, values) in enumerate(zip(names, outs[:n_heads])):
            if values.ndim != 2:
                raise UsageError(f"the model's output {name!r} has shape {values.shape[1:]} per example; "
                                 "probattn exports per-example score vectors [batch, units]")
            out_name = PROBABILITIES if i == 0 else f"{PROBABILITIES}_{_sanitize(name)}"
            while out_name in used or out_name == ATTENTION:
                out_name += "_"
            used.add(out_name)
            self.heads.append(Head(out_name, name, head_kind(values), int(values.shape[1])))
        self.probe = probe
        self.probe_outputs = outs

    def _raw(self, ids):
        import tensorflow as tf

        x = tf.cast(tf.convert_to_tensor(ids), self.input_dtype)
        return _call_outputs(self.target(x, training=False))

    def __call__(self, ids) -> dict:
        """Exported name -> float32 tensor, for int32 ids."""
        import tensorflow as tf

        outs = self._raw(ids)
        return {name: tf.cast(t, tf.float32) for name, t in zip(self.output_names, outs)}

    @property
    def output_names(self) -> list:
        return [h.output for h in self.heads] + ([ATTENTION] if self.attention else [])

    def variables(self) -> list:
        """The raw ``tf.Variable`` behind every Keras variable (see the module docstring)."""
        out, seen = [], set()
        for v in self.target.variables:
            raw = v if callable(getattr(v, "value", None)) else v.value
            if id(raw) not in seen:
                seen.add(id(raw))
                out.append(raw)
        return out


class SignatureServing:
    """A SavedModel without a Keras model: its ``serving_default`` signature."""

    def __init__(self, sig, vocab_size: int):
        self.sig = sig
        self.input_dtype = sig.input_dtype.name
        length = sig.input_shape[1]
        self.fixed_length = int(length) if length is not None else None
        self.attention = False
        probe = probe_ids(vocab_size, self.fixed_length)
        outs = [np.asarray(o) for o in sig(probe)]
        self.heads = []
        for i, (name, values) in enumerate(zip(sig.output_names, outs)):
            if values.ndim != 2:
                raise UsageError(f"the SavedModel's output {name!r} has shape {values.shape[1:]} per example; "
                                 "expected [batch, units]")
            out_name = PROBABILITIES if i == 0 else f"{PROBABILITIES}_{_sanitize(name)}"
            self.heads.append(Head(out_name, name, head_kind(values), int(values.shape[1])))
        self.probe = probe
        self.probe_outputs = outs

    def __call__(self, ids) -> dict:
        import tensorflow as tf

        return {h.output: tf.cast(t, tf.float32) for h, t in zip(self.heads, self.sig(ids))}

    @property
    def output_names(self) -> list:
        return [h.output for h in self.heads]

    def variables(self) -> list:
        return []


def serving_for(loaded, attention: bool, vocab_size: int):
    """A KerasServing or SignatureServing for a ``loading.Loaded``."""
    if loaded.keras_model is not None:
        return KerasServing(loaded.keras_model, attention, vocab_size)
    return SignatureServing(loaded.signature, vocab_size)


# ---------------------------------------------------------------------------- tracing

def apply_rewrites(serving) -> list:
    """Patch the model for builtin-only export (``probattn.export.rewrites``) and keep each
    rewrite only if the model still computes the same outputs on the probe ids."""
    if not isinstance(serving, KerasServing):
        return []
    from probattn.models.keras_compat import get_keras

    from . import rewrites as R

    keras = get_keras(serving.flavour)
    kept = []
    for name, undo in R.apply_all(serving.model, keras, serving.flavour):
        try:
            got = [np.asarray(o) for o in serving._raw(serving.probe)]
            same = all(np.allclose(a, b, rtol=0, atol=REWRITE_MAX_ABS, equal_nan=True)
                       for a, b in zip(got, serving.probe_outputs))
        except Exception as e:
            same, why = False, one_line(e, 120)
        else:
            why = "outputs changed"
        if same:
            kept.append(name)
        else:
            undo()
            import sys

            print(f"  rewrite {name} not applied ({why})", file=sys.stderr)
    return kept


#: a rewrite runs the same float32 math in another op order: a few ulps, far below this
REWRITE_MAX_ABS = 1e-5


def trace(serving, batch: int | None = None, length: int | None = None, outputs=None, float_only: bool = False):
    """``(module, concrete)``: a ``tf.Module`` tracking the raw variables, whose ``serve`` is
    the traced serving function with the explicit input signature ``[batch, length]``.

    The one place an input shape is traced. ``length`` defaults to the model's own fixed
    length (None: dynamic) and cannot differ from it; ``batch=1, length=n`` is the trace of
    the fixed-shape device formats. ``outputs``: keep only these outputs (MediaPipe takes
    the probabilities alone). ``float_only``: ProbAttention layers are traced with their
    float math (``probattn.models.layers.lean_pool``), for artifacts that are never
    quantized to full int8; ``module.float_trace`` counts the calls that took it."""
    import contextlib

    import tensorflow as tf

    from probattn.models.layers import float_trace

    if length is None:
        length = serving.fixed_length
    elif serving.fixed_length is not None and int(length) != serving.fixed_length:
        raise UsageError(f"the model's input has a fixed length of {serving.fixed_length}; it cannot be traced "
                         f"at length {length}")
    spec = tf.TensorSpec([batch, length], tf.int32, name=INPUT)
    keep = None if outputs is None else set(outputs)

    counts = {"pooled": 0, "tables": 0}

    @tf.function(input_signature=[spec], autograph=False)  # Keras converts its own layers' calls
    def serve(token_ids):
        # every trace of this function, a later retrace too, takes the same math
        with float_trace() if float_only else contextlib.nullcontext() as state:
            out = serving(token_ids)
        if state is not None:
            counts.update(state)
        return out if keep is None else {k: v for k, v in out.items() if k in keep}

    module = tf.Module()
    module.variables_ = serving.variables()
    if isinstance(serving, SignatureServing):
        module.source = serving.sig.obj  # the loaded SavedModel and its variables
    module.serve = serve
    try:
        concrete = serve.get_concrete_function()
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"the model could not be traced with int32 token ids {spec.shape}: "
                         f"{type(e).__name__}: {one_line(e, 300)}") from None
    module.float_trace = dict(counts)
    return module, concrete


def float_trace_for(serving, module, concrete):
    """The dynamic trace with ProbAttention's float math (``trace(float_only=True)``), kept
    when it took that math somewhere and computes the outputs of ``concrete`` (the int8-safe
    trace) on the probe ids within ``REWRITE_MAX_ABS``; else None, with the reason on stderr."""
    import sys

    import tensorflow as tf

    if not isinstance(serving, KerasServing):
        return None
    try:
        lean_module, lean_concrete = trace(serving, float_only=True)
    except UsageError as e:  # the int8-safe trace worked: export goes on with it
        print(f"  float graph not used (its trace failed: {one_line(str(e), 160)})", file=sys.stderr)
        return None
    if not lean_module.float_trace["pooled"]:
        return None
    try:
        ids = tf.constant(serving.probe, tf.int32)
        want, got = concrete(ids), lean_concrete(ids)
        same = set(got) == set(want) and all(
            np.asarray(got[k]).shape == np.asarray(want[k]).shape
            and np.allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=0, atol=REWRITE_MAX_ABS) for k in want)
        why = "outputs changed"
    except Exception as e:
        same, why = False, one_line(e, 120)
    if not same:
        print(f"  float graph not used ({why}): every artifact takes the int8-safe graph", file=sys.stderr)
        return None
    return lean_module, lean_concrete


def serving_module(model, attention: bool = False, shape=(None, None), vocab_size: int | None = None):
    """``(module, concrete)`` for a Keras model as it is (no rewrites): ``trace`` of its
    ``KerasServing`` with the input ``shape`` ``[batch, sequence]`` (tools and tests)."""
    from .loading import vocab_size_of

    serving = KerasServing(model, attention, vocab_size or vocab_size_of(model) or 2)
    batch, length = shape
    return trace(serving, batch=batch, length=length)

"""The ProbAttention layer: attention pooling with padding-aware, quantization-safe math.

The layer scores every time step with a learned vector, takes a softmax over the valid
steps and returns the weighted sum of the inputs. The arithmetic is chosen so that one
graph behaves in float32, float16 and full-integer int8, on LiteRT's XNNPACK *and*
reference kernels (what microcontroller builds run), for texts of 1 token and of 4x the
training length alike:

* Masking uses the incoming Keras mask (``Embedding(mask_zero=True)``).
* Scores are centred on the best *valid* score (picked with a select, so the best step's
  centred score is exactly 0) and multiplied by the mask: valid steps are <= 0 and pads
  sit at 0 too, so no mask constant stretches the int8
  range of the scores (a -1e4 or -1e12 constant leaves the real scores a handful of int8
  levels; -1e12 is even ``inf`` in float16).
* ``e = exp(c) * mask``: pads get exactly 0, the best step exactly 1.
* No SOFTMAX, DIV or SUM over time, each for a measured int8 reason: the int8 SOFTMAX
  output has a fixed 1/256 step (a text of n near-uniform steps gets ~256/n codes per
  weight) and LiteRT's reference int8 SOFTMAX aborts the process once its exponent sum
  reaches 512; LiteRT's int8 DIV saturates when the numerator is a few codes; the
  reference int8 SUM over the time axis is wrong. Sums over time are batched matmuls and
  ``e / s`` is ``exp(c - log s)``, which keeps each weight's *relative* error the same
  whatever its size (EXP and LOG are int8 lookup tables).
* Two normalisations, gated by the row's attention mass ``s = sum(e)``: rows with
  ``s < GATE`` (few steps share the attention, e.g. 1-token texts: one weight of 1.0) use
  coarse weights in [0, 1]; rows with ``s >= GATE`` (many steps) use fine weights in
  [0, 1/GATE], a GATE-times finer int8 grid. In float both paths are exactly ``e / s``.
* Only ops with TFLite builtins and ONNX equivalents (``tf.expand_dims``, not
  ``x[..., None]``).
* ``normalize=True`` (what probattn's classifiers use): each path's pooled vector is
  L2-normalised per group of ``NORM_GROUP`` features (``tf.math.l2_normalize``: one
  ``L2_NORMALIZATION`` op in TFLite, with int8 kernels in LiteRT and TFLite Micro) *before*
  the two paths are mixed. In float both paths give the same unit groups, so the output is
  the plain pooled vector ``sum_t w_t x_t`` normalised per group. In int8 this is what makes
  long texts exact enough: the pooled vector of a text whose attention spreads over
  hundreds of steps (an average of many embedding rows) is several times smaller than a
  short text's (nearly one row), and in the one int8 range both shared it kept a few codes
  per feature (full int8 on 20newsgroups: 97.9% top-1 agreement with float on texts over
  256 tokens). Normalised, each path's matmul has its own range and its scale is free, so
  the fine path pools with ``e / sqrt(s)`` (in [0, 1/sqrt(GATE)]) instead of ``e / s``
  (about ``1/s`` in a [0, 1/GATE] range: a few int8 codes a weight on long texts). The
  op normalises in int32; its output step is fixed (1/128), hence groups of 16 features
  (a unit group's features are ~1/4) rather than the whole vector (~1/8 at 64 features).
  The returned ``weights`` stay ``e / s``.

An all-padding row gets all-zero weights and pools to the zero vector, in every precision
(``l2_normalize`` of the zero vector is the zero vector).
"""
from __future__ import annotations

import contextlib
import threading
import types

import numpy as np

from .keras_compat import check_flavour, get_keras
from .quiet import import_tensorflow

tf = import_tensorflow()  # quietly: TensorFlow's native start-up lines stay off stderr

#: Rows whose attention mass ``sum(exp(c))`` is at least GATE use the fine weights, whose
#: int8 range is [0, 1/GATE]. 16 keeps a 16x finer grid for long texts while a row with a
#: few dominant steps (mass < 16) keeps weights up to 1.0 on the coarse path.
GATE = 16.0
#: The coarse path is cut off this far above the gate, so int8 rounding of the mass near
#: the gate can never give weight to a cut-off coarse path (cut-off implies gate fully on).
GATE_MARGIN = 2.0
#: ``normalize=True``: the floor of the squared norm (``tf.math.l2_normalize``'s epsilon).
#: Its default, 1e-12, is 0 in float16, and a cut-off path (or an all-padding row) pools to
#: the zero vector: 0 * rsqrt(0) is NaN. 1e-6 is a float16 number and far below the squared
#: norm of any pooled vector a path keeps.
NORM_EPSILON = 1e-6
#: ``normalize=True`` normalises groups of this many features (each a unit vector): the
#: int8 L2_NORMALIZATION output has the fixed step 1/128, and a unit vector's features are
#: about 1/sqrt(size): 16 features keep ~32 codes for a typical one, 64 only ~16.
NORM_GROUP = 16


def _row_dot(a, b):
    """``sum_t a[:, t] * b[:, t]`` as ``(batch, 1)``, by BATCH_MATMUL (not SUM)."""
    return tf.squeeze(tf.matmul(tf.expand_dims(a, 1), tf.expand_dims(b, 2)), axis=-1)


def _pool(weights, inputs):
    """``sum_t weights[:, t] * inputs[:, t, :]`` as ``(batch, features)``, by BATCH_MATMUL."""
    return tf.squeeze(tf.matmul(tf.expand_dims(weights, 1), inputs), axis=1)


def _normalize(x):
    """L2-normalise each group of ``NORM_GROUP`` features (the whole vector when the feature
    count is not a multiple of it): one ``L2_NORMALIZATION`` op on a ``(batch, groups,
    NORM_GROUP)`` view."""
    f = int(x.shape[-1])
    if f % NORM_GROUP or f == NORM_GROUP:
        return tf.math.l2_normalize(x, axis=-1, epsilon=NORM_EPSILON)
    y = tf.math.l2_normalize(tf.reshape(x, [-1, f // NORM_GROUP, NORM_GROUP]), axis=-1, epsilon=NORM_EPSILON)
    return tf.reshape(y, [-1, f])


def centre_scores(scores, mask):
    """``(m, c, e)`` for scores over time (the last axis) and a mask true on valid steps
    (bool or 0/1, broadcastable to the scores; None: all valid): the mask as 0/1, the
    scores centred on the best *valid* score and masked (``c``: valid <= 0, the best step
    exactly 0, pads 0), and ``e = exp(c) * m`` (valid in (0, 1], pads exactly 0)."""
    dtype = scores.dtype
    m = tf.ones_like(scores) if mask is None else tf.cast(mask, dtype)
    # best valid score: pads are replaced by the row's lowest score (so they never win the
    # max, however negative the real scores) and ``best`` is one of the scores itself, so
    # the best step's ``c`` is exactly 0 (arithmetic such as (s - low) * m + low would round
    # it away from 0 in float16 and int8, and the normalisation relies on it)
    low = tf.reduce_min(scores, axis=-1, keepdims=True)
    valid = tf.ones_like(scores, dtype=tf.bool) if mask is None else tf.cast(mask, tf.bool)
    best = tf.reduce_max(tf.where(valid, scores, low), axis=-1, keepdims=True)
    c = (scores - best) * m
    return m, c, tf.exp(c) * m


def prob_attention_pool(inputs, kernel, mask=None, normalize=False):
    """Attention pooling over time.

    Args:
      inputs: ``(batch, time, features)`` float tensor.
      kernel: ``(features, 1)`` scoring vector, same dtype as ``inputs``.
      mask: optional ``(batch, time)`` boolean/0-1 tensor, true on real steps.
      normalize: L2-normalise the pooled vector (each path before the mix; see the module
        docstring): ``pooled`` is then a unit vector (or the zero vector).

    Returns:
      ``(pooled, weights)``: ``(batch, features)`` and ``(batch, time)``. Padded steps get
      weight exactly 0; an all-padding row gets all-zero weights and the zero vector.
    """
    dtype = inputs.dtype
    one = tf.constant(1.0, dtype)
    gate = tf.constant(GATE, dtype)
    scores = tf.squeeze(tf.matmul(inputs, kernel), axis=-1)  # (B, T)
    m, c, e = centre_scores(scores, mask)
    s = tf.maximum(_row_dot(e, m), one)  # attention mass; 1 on an all-padding row (no 0/0)
    g = tf.clip_by_value(s - gate, 0.0, 1.0)  # 0: coarse path, 1: fine path
    keep = one - tf.clip_by_value(s - (gate + tf.constant(GATE_MARGIN, dtype)), 0.0, 1.0)
    s_coarse = tf.maximum(_row_dot(e * keep, m), one)  # s where used, 1 past the cut
    w_coarse = tf.exp(c - tf.math.log(s_coarse)) * (m * keep)  # in [0, 1]
    w_fine = tf.exp(c - tf.math.log(tf.maximum(s, gate))) * m  # in [0, 1/GATE]
    if normalize:
        # the scale of a normalised path is free: the fine path pools with e / sqrt(s), in
        # [0, 1/sqrt(GATE)], not e / s: a long text's weights keep tens of int8 codes each
        # instead of a few (1/s of a [0, 1/GATE] range), and its pooled vector is no smaller
        pool_fine = tf.exp(c - tf.constant(0.5, dtype) * tf.math.log(tf.maximum(s, gate))) * m
    else:
        pool_fine = w_fine
    pooled_fine, pooled_coarse = _pool(pool_fine, inputs), _pool(w_coarse, inputs)
    if normalize:  # each path in its own int8 range, then the same unit scale for both
        pooled_fine = _normalize(pooled_fine)
        pooled_coarse = _normalize(pooled_coarse)
    pooled = g * pooled_fine + (one - g) * pooled_coarse
    weights = g * w_fine + (one - g) * w_coarse
    return pooled, weights


# ---------------------------------------------------------------- the float-only trace

_FLOAT_TRACE = threading.local()


@contextlib.contextmanager
def float_trace():
    """Trace ProbAttention with its float-only math (``lean_pool``) inside this block.

    The exporter traces the graphs of its float artifacts (SavedModel, ONNX, TFLite fp32 and
    fp16) in this block, and the graphs that are quantized to full int8 outside it. Yields a
    dict that counts the calls that took the lean math (``pooled``) and those that gathered
    their scores from a precomputed table (``tables``)."""
    previous = getattr(_FLOAT_TRACE, "state", None)
    _FLOAT_TRACE.state = state = {"pooled": 0, "tables": 0}
    try:
        yield state
    finally:
        _FLOAT_TRACE.state = previous


def _float_trace_state(inputs):
    """The active ``float_trace`` counts when ``inputs`` is being traced in float32, else None."""
    state = getattr(_FLOAT_TRACE, "state", None)
    if state is None or inputs.dtype != tf.float32 or tf.executing_eagerly():
        return None
    return state


def _gathered_rows(inputs):
    """``(ids, table)`` when ``inputs`` is ``gather(table, ids)`` of a variable captured from
    outside the graph being traced (an embedding lookup: ``tf.gather`` on the variable or on
    its value, through Identity ops), with ``table`` the variable's value read now (a NumPy
    array); else None."""
    t = inputs
    while t.op.type == "Identity":
        t = t.op.inputs[0]
    op = t.op
    if op.type == "ResourceGather":
        handle = op.inputs[0]
    elif op.type == "GatherV2":
        axis = tf.get_static_value(op.inputs[2])
        params = op.inputs[0]
        while params.op.type == "Identity":
            params = params.op.inputs[0]
        if axis is None or int(axis) != 0 or params.op.type != "ReadVariableOp":
            return None
        handle = params.op.inputs[0]
    else:
        return None
    if op.get_attr("batch_dims") != 0:
        return None
    ids = op.inputs[1]
    if ids.shape.rank != 2 or inputs.shape.rank != 3:
        return None
    graph = handle.graph
    external = None
    for outer, inner in getattr(graph, "captures", []) or []:
        if inner is handle:
            external = outer
            break
    # only a variable captured straight from eager code (not from an enclosing graph)
    if external is None or tf.is_symbolic_tensor(external) or external.dtype != tf.resource:
        return None
    try:
        with tf.init_scope():
            table = tf.raw_ops.ReadVariableOp(resource=external, dtype=tf.float32).numpy()
    except (tf.errors.OpError, TypeError, ValueError):  # not a float32 variable: score by matmul
        return None
    if table.ndim != 2 or table.shape[1] != inputs.shape[-1]:
        return None
    return ids, table


def lean_pool(inputs, kernel_variable, mask=None, normalize=False):
    """``prob_attention_pool`` for float graphs: the same outputs, in float32 equal to it up
    to rounding, with one pooling matmul instead of two and a handful of ``(batch, time)``
    ops instead of some thirty.

    The two-path, lookup-table-friendly arithmetic of ``prob_attention_pool`` is there for
    full int8; in float both paths give ``e / s``. So the weights are ``e / s`` and the
    inputs are pooled once, ``P = sum_t e_t x_t``, which is then scaled per path on the
    ``(batch, features)`` vector: ``P / s`` (``normalize=False``), or with
    ``normalize=True`` each path's vector normalised as in ``prob_attention_pool``
    (``P / sqrt(max(s, GATE))`` and ``P / s``) and mixed by the same gate, so even a group
    whose squared norm falls under ``NORM_EPSILON`` is scaled as it is there.

    When ``inputs`` is an embedding lookup ``gather(E, ids)`` (``_gathered_rows``), a
    step's score ``E[id] . kernel`` is gathered from the table ``E @ kernel``, computed once
    at trace time, instead of a ``(batch, time, features) x (features, 1)`` matmul."""
    dtype = inputs.dtype
    one = tf.constant(1.0, dtype)
    gate = tf.constant(GATE, dtype)
    state = _float_trace_state(inputs)
    rows = _gathered_rows(inputs) if state is not None else None
    if rows is not None:
        ids, table = rows
        with tf.init_scope():
            w = np.asarray(tf.convert_to_tensor(kernel_variable).numpy(), np.float32)
        scores = tf.gather(tf.constant((table.astype(np.float32) @ w)[:, 0]), ids)  # (B, T)
        state["tables"] += 1
    else:
        scores = tf.squeeze(tf.matmul(inputs, tf.cast(kernel_variable, dtype)), axis=-1)
    if state is not None:
        state["pooled"] += 1
    _, _, e = centre_scores(scores, mask)  # as in prob_attention_pool: pads exactly 0, the best step 1
    s = tf.maximum(tf.reduce_sum(e, axis=-1, keepdims=True), one)  # (B, 1)
    inv_s = one / s
    p = _pool(e, inputs)  # (B, F): the one pooling matmul
    if normalize:
        g = tf.clip_by_value(s - gate, 0.0, 1.0)
        fine = _normalize(p * tf.math.rsqrt(tf.maximum(s, gate)))
        pooled = g * fine + (one - g) * _normalize(p * inv_s)
    else:
        pooled = p * inv_s
    return pooled, e * inv_s


def _make_prob_attention(keras, flavour):
    @keras.saving.register_keras_serializable(package="probattn")
    class ProbAttention(keras.layers.Layer):
        """Attention pooling: a learned ``(features, 1)`` kernel scores each time step,
        softmax over time, weighted sum. Output ``(batch, features)``.

        Call with ``return_attention_scores=True`` to also get the weights ``(batch, time)``.
        Padded steps (from the incoming Keras mask) get zero weight; a row with no valid step
        pools to the zero vector. The same math and registered name in both Keras flavours.
        ``normalize=True``: the output is L2-normalised (what probattn's classifiers use, for
        full int8 on long texts; see the module docstring). The default, False, keeps the
        plain weighted sum, and every model saved before the option loads as it was.
        """

        probattn_pooling = True  # how find_attention_layer recognises it in either flavour

        def __init__(self, kernel_initializer="uniform", normalize=False, **kwargs):
            super().__init__(**kwargs)
            self.supports_masking = True
            self.kernel_initializer = keras.initializers.get(kernel_initializer)
            if not isinstance(normalize, bool):
                raise ValueError(f"normalize must be True or False; received {normalize!r}")
            self.normalize = normalize

        def build(self, input_shape):
            shape = tf.TensorShape(input_shape)
            if shape.rank != 3 or shape[-1] is None:
                raise ValueError(
                    "ProbAttention expects inputs of shape (batch, time, features) with a known "
                    f"feature size; received shape {shape}."
                )
            self.kernel = self.add_weight(
                name="kernel",
                shape=(int(shape[-1]), 1),
                initializer=self.kernel_initializer,
                trainable=True,
            )
            super().build(input_shape)

        def call(self, inputs, mask=None, return_attention_scores=False):
            if _float_trace_state(inputs) is not None:
                pooled, weights = lean_pool(inputs, self.kernel, mask, self.normalize)
            else:
                pooled, weights = prob_attention_pool(inputs, tf.cast(self.kernel, inputs.dtype), mask,
                                                      self.normalize)
            if return_attention_scores:
                return pooled, weights
            return pooled

        def compute_mask(self, inputs, mask=None):
            return None  # time is pooled away

        def compute_output_shape(self, input_shape):
            shape = tuple(tf.TensorShape(input_shape).as_list())
            out = (shape[0], shape[-1])
            return out if flavour == "3" else tf.TensorShape(out)

        if flavour == "3":
            # Keras 3 builds the symbolic output from compute_output_shape, which knows
            # nothing of return_attention_scores: without this a call asking for the
            # weights silently returns one tensor.
            def compute_output_spec(self, inputs, mask=None, return_attention_scores=False):
                b, t, f = inputs.shape
                pooled = keras.KerasTensor((b, f), dtype=self.compute_dtype)
                if return_attention_scores:
                    return pooled, keras.KerasTensor((b, t), dtype=self.compute_dtype)
                return pooled

        def get_config(self):
            config = super().get_config()
            config["kernel_initializer"] = keras.initializers.serialize(self.kernel_initializer)
            config["normalize"] = self.normalize
            return config

    ProbAttention.__qualname__ = "ProbAttention"
    ProbAttention.__module__ = __name__
    return ProbAttention


def _make_attention_view(keras, flavour):
    class AttentionWeightsView(keras.layers.Layer):
        """The ``(batch, time)`` weights of an existing ProbAttention layer, computed with
        that layer's own kernel (no variables of its own; built for export, never saved).

        Keras 3 cannot call the original layer a second time with
        ``return_attention_scores=True`` inside a functional model ("Output ... is not
        connected to inputs": a layer's outputs are sized from its first call), so the
        weights come from this view, which works in both flavours.
        """

        def __init__(self, attention, **kwargs):
            super().__init__(**kwargs)
            self.attention = attention
            self.supports_masking = True

        def call(self, inputs, mask=None):
            if _float_trace_state(inputs) is not None:
                return lean_pool(inputs, self.attention.kernel, mask)[1]
            return prob_attention_pool(inputs, tf.cast(self.attention.kernel, inputs.dtype), mask)[1]

        def compute_mask(self, inputs, mask=None):
            return None

        def compute_output_shape(self, input_shape):
            shape = tuple(tf.TensorShape(input_shape).as_list())
            return (shape[0], shape[1]) if flavour == "3" else tf.TensorShape(shape[:2])

    AttentionWeightsView.__qualname__ = "AttentionWeightsView"
    AttentionWeightsView.__module__ = __name__
    return AttentionWeightsView


_CLASSES: dict = {}


def layer_classes(flavour=None) -> types.SimpleNamespace:
    """probattn's layers for one Keras flavour (``"3"`` or ``"2"``), built and registered
    with that Keras on first use: ``layer_classes("2").ProbAttention``."""
    flavour = check_flavour(flavour)
    if flavour not in _CLASSES:
        keras = get_keras(flavour)
        from .naive import make_naive_prob_attention
        from .probsparse import make_prob_sparse_attention

        _CLASSES[flavour] = types.SimpleNamespace(
            ProbAttention=_make_prob_attention(keras, flavour),
            NaiveProbAttention=make_naive_prob_attention(keras),
            ProbSparseAttention=make_prob_sparse_attention(keras, flavour),
            AttentionWeightsView=_make_attention_view(keras, flavour),
        )
    return _CLASSES[flavour]


def __getattr__(name):  # ``from probattn.models.layers import ProbAttention``: default flavour
    if name in ("ProbAttention", "NaiveProbAttention"):
        return getattr(layer_classes(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def layer_call_input(layer):
    """``(inputs, mask or None)`` of a layer's first call in a functional graph.

    tf_keras: ``layer.input`` is the tensor and its mask rides on it (``_keras_mask``).
    Keras 3 records an automatically filled ``mask`` as a node input, so ``layer.input`` is
    ``[x, mask]``; the node's ``arguments`` keep args and kwargs apart (``Node.arguments``
    is not public API in Keras 3.15: this is the one place that reads it).
    """
    nodes = getattr(layer, "_inbound_nodes", None)
    if nodes and hasattr(nodes[0], "arguments"):  # Keras 3 Node
        args = nodes[0].arguments
        return args.args[0], args.kwargs.get("mask")
    return layer.input, None

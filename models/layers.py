"""The ProbAttention layer: attention pooling with padding-aware, quantization-friendly math.

The layer scores every time step with a learned vector, takes a softmax over time and
returns the weighted sum of the inputs. The arithmetic is chosen so that the same graph
behaves in float32, float16 and full-integer int8:

* Masking uses the incoming Keras mask (``Embedding(mask_zero=True)``).
* Scores are centred on the largest *valid* score, then padded steps are set to exactly
  ``-MASK_OFFSET`` (20). A padded step therefore carries at most ``exp(-20) ≈ 2e-9`` of
  the softmax mass before the final multiply by the mask sets it to exactly zero. No
  constant exceeds the float16 range and no ``0 * inf`` can occur.
* The small, fixed offset keeps the calibrated int8 range of the score tensor narrow
  (a -1e4 or -1e12 constant spreads the real scores over a handful of int8 levels).
* Pooling is a batched matmul (``BATCH_MATMUL``), not ``reduce_sum(x * a)``: LiteRT's
  reference int8 ``SUM`` kernel is wrong over the time axis.
* Only ops with TFLite builtins and ONNX equivalents (``tf.expand_dims``, not
  ``x[..., None]``).

An all-padding row gets all-zero weights and pools to the zero vector, in every precision.
"""
from __future__ import annotations

import types

from .keras_compat import check_flavour, get_keras
from .quiet import import_tensorflow

tf = import_tensorflow()  # quietly: TensorFlow's native start-up lines stay off stderr

#: Padded steps sit this far below the best valid score. exp(-20) ≈ 2.1e-9 per padded
#: step, so appending 256 pads moves the softmax mass by < 6e-7 before the mask zeroes it.
#: 20 fits in every float type and keeps the int8 score range near [-20, 0].
MASK_OFFSET = 20.0


def prob_attention_pool(inputs, kernel, mask=None):
    """Attention pooling over time.

    Args:
      inputs: ``(batch, time, features)`` float tensor.
      kernel: ``(features, 1)`` scoring vector, same dtype as ``inputs``.
      mask: optional ``(batch, time)`` boolean/0-1 tensor, true on real steps.

    Returns:
      ``(pooled, weights)``: ``(batch, features)`` and ``(batch, time)``.
    """
    dtype = inputs.dtype
    scores = tf.squeeze(tf.matmul(inputs, kernel), axis=-1)  # (B, T)
    if mask is None:
        weights = tf.nn.softmax(scores, axis=-1)
    else:
        m = tf.cast(mask, dtype)  # (B, T), 1 on real steps
        offset = tf.constant(MASK_OFFSET, dtype)
        # best valid score: shift every score to >= 0, zero the pads, take the max. (Pads at
        # -offset would win the max whenever every real score is below -offset.)
        low = tf.reduce_min(scores, axis=-1, keepdims=True)
        best = tf.reduce_max((scores - low) * m, axis=-1, keepdims=True) + low
        centred = (scores - best) * m + (m - 1.0) * offset  # valid <= 0, pads = -offset
        weights = tf.nn.softmax(centred, axis=-1) * m  # pads exactly 0; all-pad row: 0
    pooled = tf.matmul(tf.expand_dims(weights, 1), inputs)  # (B, 1, F): BATCH_MATMUL
    pooled = tf.squeeze(pooled, axis=1)
    return pooled, weights


def _make_prob_attention(keras, flavour):
    @keras.saving.register_keras_serializable(package="probattn")
    class ProbAttention(keras.layers.Layer):
        """Attention pooling: a learned ``(features, 1)`` kernel scores each time step,
        softmax over time, weighted sum. Output ``(batch, features)``.

        Call with ``return_attention_scores=True`` to also get the weights ``(batch, time)``.
        Padded steps (from the incoming Keras mask) get zero weight; a row with no valid step
        pools to the zero vector. The same math and registered name in both Keras flavours.
        """

        probattn_pooling = True  # how find_attention_layer recognises it in either flavour

        def __init__(self, kernel_initializer="uniform", **kwargs):
            super().__init__(**kwargs)
            self.supports_masking = True
            self.kernel_initializer = keras.initializers.get(kernel_initializer)

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
            kernel = tf.cast(self.kernel, inputs.dtype)
            pooled, weights = prob_attention_pool(inputs, kernel, mask)
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
            kernel = tf.cast(self.attention.kernel, inputs.dtype)
            return prob_attention_pool(inputs, kernel, mask)[1]

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

        _CLASSES[flavour] = types.SimpleNamespace(
            ProbAttention=_make_prob_attention(keras, flavour),
            NaiveProbAttention=make_naive_prob_attention(keras),
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

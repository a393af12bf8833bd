"""The masking recipe probattn does NOT use, kept to show what ``probattn verify`` catches.

``NaiveProbAttention`` masks scores with ``tf.where(mask, u, -1e4)`` and pools with
``reduce_sum(x * a, axis=1)``. In float32 it is correct. In full-integer int8 it
collapses on LiteRT's reference kernels: the large constant stretches the calibrated
score range, and the reference int8 ``SUM`` over time is wrong. Use ``ProbAttention``.
"""
from __future__ import annotations

from .quiet import import_tensorflow

tf = import_tensorflow()  # quietly: TensorFlow's native start-up lines stay off stderr


def make_naive_prob_attention(keras):
    """The comparison layer for one Keras module (see ``probattn.models.layers.layer_classes``)."""

    @keras.saving.register_keras_serializable(package="probattn_naive")
    class NaiveProbAttention(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.supports_masking = True

        def build(self, input_shape):
            self.kernel = self.add_weight(name="kernel", shape=(int(input_shape[-1]), 1),
                                          initializer="glorot_uniform")
            super().build(input_shape)

        def call(self, inputs, mask=None):
            u = tf.squeeze(tf.matmul(inputs, self.kernel), -1)
            if mask is not None:
                u = tf.where(mask, u, tf.constant(-1e4, u.dtype))
            a = tf.nn.softmax(u, axis=-1)
            return tf.reduce_sum(inputs * tf.expand_dims(a, -1), axis=1)

        def compute_mask(self, inputs, mask=None):
            return None

    NaiveProbAttention.__qualname__ = "NaiveProbAttention"
    NaiveProbAttention.__module__ = __name__
    return NaiveProbAttention


def __getattr__(name):  # ``from probattn.models.naive import NaiveProbAttention``: default flavour
    if name == "NaiveProbAttention":
        from .layers import layer_classes

        return layer_classes().NaiveProbAttention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

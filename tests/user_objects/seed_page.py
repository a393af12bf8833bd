"""The seed page's ProbAttention, as printed, with its shape bug fixed (the mask is
expanded to the scores' shape). ``tensorflow.keras`` is Keras 3 on TensorFlow 2.16+; the
same file runs with tf_keras when TF_USE_LEGACY_KERAS=1. A fixture, not probattn code."""
import tensorflow as tf
from tensorflow.keras.layers import Layer


class ProbAttention(Layer):
    def __init__(self, **kwargs):
        super(ProbAttention, self).__init__(**kwargs)

    def build(self, input_shape):
        self.w = self.add_weight(name='kernel',
                                 shape=(input_shape[2], 1),
                                 initializer='uniform',
                                 trainable=True)
        super(ProbAttention, self).build(input_shape)

    def call(self, inputs, mask=None):
        u = tf.matmul(inputs, self.w)
        if mask is not None:
            mask = tf.cast(mask, tf.float32)
            u -= (1.0 - tf.expand_dims(mask, -1)) * 1e12  # the fix: (B, T) -> (B, T, 1)
        u = tf.exp(u - tf.reduce_max(u, axis=1, keepdims=True))
        s = tf.reduce_sum(u, axis=1, keepdims=True)
        alpha = u / s
        output = tf.reduce_sum(inputs * alpha, axis=1)
        return output

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

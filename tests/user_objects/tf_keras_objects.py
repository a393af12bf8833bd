"""A user's own classes for a tf_keras (Keras 2) model. A fixture of the user-model
collection, not probattn code."""
import tensorflow as tf
import tf_keras as keras


class ProbAttention(keras.layers.Layer):
    """The user's own class named like probattn's: tanh scores, different math."""

    def __init__(self, scale=4.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale
        self.supports_masking = True

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(int(input_shape[-1]), 1), initializer="glorot_uniform")
        super().build(input_shape)

    def call(self, inputs, mask=None):
        u = tf.squeeze(tf.tanh(tf.matmul(inputs, self.kernel)), -1) * self.scale
        if mask is not None:
            u = tf.where(mask, u, tf.constant(-1e4, u.dtype))
        a = tf.nn.softmax(u, axis=-1)
        return tf.squeeze(tf.matmul(tf.expand_dims(a, 1), inputs), 1)

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


class SeedProbAttention(keras.layers.Layer):
    """The seed page's layer in tf_keras, shape bug fixed."""

    def build(self, input_shape):
        self.w = self.add_weight(name="kernel", shape=(int(input_shape[2]), 1), initializer="uniform",
                                 trainable=True)
        super().build(input_shape)

    def call(self, inputs, mask=None):
        u = tf.matmul(inputs, self.w)
        if mask is not None:
            mask = tf.cast(mask, tf.float32)
            u -= (1.0 - tf.expand_dims(mask, -1)) * 1e12
        u = tf.exp(u - tf.reduce_max(u, axis=1, keepdims=True))
        s = tf.reduce_sum(u, axis=1, keepdims=True)
        return tf.reduce_sum(inputs * (u / s), axis=1)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

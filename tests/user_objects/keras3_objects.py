"""A user's own classes for a Keras 3 model, written the way users write them on
TensorFlow 2.16+ (``from tensorflow import keras`` is Keras 3). Passed to probattn with
``--custom-objects``. Not probattn code: a fixture of the user-model collection."""
import tensorflow as tf
from tensorflow import keras


class ProbAttention(keras.layers.Layer):
    """The user's own attention pooling, under the same name as probattn's layer and with the
    same (features, 1) weight, but different math: tanh scores, scaled."""

    def __init__(self, scale=4.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale
        self.supports_masking = True

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], 1), initializer="glorot_uniform")

    def call(self, inputs, mask=None):
        u = tf.squeeze(tf.tanh(tf.matmul(inputs, self.kernel)), -1) * self.scale
        if mask is not None:
            u = tf.where(mask, u, tf.constant(-1e4, u.dtype))
        a = tf.nn.softmax(u, axis=-1)
        return tf.squeeze(tf.matmul(tf.expand_dims(a, 1), inputs), 1)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


@keras.utils.register_keras_serializable(package="user")
class Scale(keras.layers.Layer):
    """A registered custom layer (saved as 'user>Scale')."""

    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


class Gate(keras.layers.Layer):
    """A plain custom layer with a weight (saved under its bare class name)."""

    def build(self, input_shape):
        self.g = self.add_weight(name="g", shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * tf.sigmoid(self.g)


def swishish(x):
    """A plain function used as an activation."""
    return x * tf.sigmoid(1.5 * x)


class MaskedMean(keras.layers.Layer):
    """Mean over real steps that stays finite on an all-padding row: sum(x * m) / max(sum m, 1)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, x, mask=None):
        if mask is None:
            return tf.reduce_mean(x, axis=1)
        m = tf.expand_dims(tf.cast(mask, x.dtype), -1)
        return tf.reduce_sum(x * m, axis=1) / tf.maximum(tf.reduce_sum(m, axis=1), 1.0)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


class SubclassedClassifier(keras.Model):
    """A subclassed model: embedding, masked attention pooling, two dense layers."""

    def __init__(self, vocab_size=200, dim=16, classes=3, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.dim, self.classes = vocab_size, dim, classes
        self.embed = keras.layers.Embedding(vocab_size, dim)
        self.score = keras.layers.Dense(1, use_bias=False)
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.out = keras.layers.Dense(classes, activation="softmax")

    def call(self, ids):
        mask = tf.not_equal(ids, 0)
        x = self.embed(ids)
        u = tf.squeeze(self.score(x), -1)
        u = tf.where(mask, u, tf.constant(-1e4, u.dtype))
        a = tf.nn.softmax(u, axis=-1) * tf.cast(mask, x.dtype)
        pooled = tf.squeeze(tf.matmul(tf.expand_dims(a, 1), x), 1)
        return self.out(self.hidden(pooled))

    def get_config(self):
        return {"vocab_size": self.vocab_size, "dim": self.dim, "classes": self.classes, "name": self.name}

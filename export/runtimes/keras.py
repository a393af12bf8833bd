"""The reference: the Keras model file called directly (not ``predict``), safe mode on."""
from __future__ import annotations

from . import register
from .base import Runner


def tf_threads(n):
    """Fix TensorFlow's thread pools (possible only before TensorFlow runs anything)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # already initialised in this process


@register
class KerasRunner(Runner):
    runtime = "keras"
    formats = ("keras",)
    requires = ("tensorflow",)
    package = "tensorflow"
    tensorflow_free = False
    order = 0
    description = "the Keras model called directly: the reference"

    def __init__(self, path, vocab_size=None, threads=None, variant=None, input_shape=None, unsafe=False,
                 attention=True, **kw):
        super().__init__(path, vocab_size, threads, variant, input_shape, unsafe=unsafe, **kw)
        self.attention = attention

    def _load(self):
        from ..contract import PROBABILITIES
        from ..loading import load_keras_model
        from ..signature import with_attention_output

        if self.threads:
            tf_threads(self.threads)
        model = load_keras_model(self.path, unsafe=self.unsafe)
        self.model = (with_attention_output(model) if self.attention else None) or model
        self._single = PROBABILITIES

    def _infer(self, ids):
        out = self.model(ids, training=False)
        if isinstance(out, dict):
            return {k: v.numpy() for k, v in out.items()}
        return {self._single: out.numpy()}

    def _close(self):
        self.model = None

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
    is_tensorflow = True
    order = 0
    description = "the Keras model called directly: the reference"

    def __init__(self, path, vocab_size=None, threads=None, variant=None, input_shape=None, unsafe=False,
                 attention=True, custom_objects=None, **kw):
        super().__init__(path, vocab_size, threads, variant, input_shape, unsafe=unsafe, **kw)
        self.attention = attention
        self.custom_objects = custom_objects

    def _load(self):
        from ..loading import load_model
        from ..signature import serving_for

        if self.threads:
            tf_threads(self.threads)
        loaded = load_model(self.path, unsafe=self.unsafe, custom_objects=self.custom_objects)
        # the same outputs, names and id cast as the exported serving function, without rewrites
        self.serving = serving_for(loaded, self.attention, self.vocab_size or 100)
        self.loaded = loaded

    def _infer(self, ids):
        return {k: v.numpy() for k, v in self.serving(ids).items()}

    def diagnose(self, batches=None) -> dict:
        """What the model itself does with padding (``probattn.export.diagnosis``)."""
        from ..diagnosis import diagnose_serving

        return diagnose_serving(self.serving, batches=batches)

    def _close(self):
        self.serving = self.loaded = None

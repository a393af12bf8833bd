"""TensorFlow SavedModel, called through its ``serving_default`` signature.

Loading a SavedModel runs code from it (its restore function, resource initialisers), so
``audit.savedmodel`` checks its files and every op of every function first; ``unsafe``
(``--unsafe``) skips the op check only."""
from __future__ import annotations

from probattn.models.errors import UsageError, one_line

from . import register
from .base import Runner
from .keras import tf_threads


@register
class SavedModelRunner(Runner):
    runtime = "savedmodel"
    formats = ("savedmodel",)
    requires = ("tensorflow",)
    package = "tensorflow"
    tensorflow_free = False
    is_tensorflow = True
    order = 10
    description = "tf.saved_model.load, signature serving_default"

    def _load(self):
        from probattn.models.quiet import import_tensorflow

        from ..audit import savedmodel as audit
        from ..contract import SIGNATURE_KEY

        tf = import_tensorflow()
        audit.audit(self.path, unsafe=self.unsafe, what=f"SavedModel {self.path.name}")
        if self.threads:
            tf_threads(self.threads)
        try:
            self.obj = tf.saved_model.load(str(self.path))
        except Exception as e:
            raise UsageError(f"could not load SavedModel {self.path}: {one_line(e, 200)}") from None
        if SIGNATURE_KEY not in self.obj.signatures:
            raise UsageError(f"SavedModel {self.path} has no '{SIGNATURE_KEY}' signature")
        self.fn = self.obj.signatures[SIGNATURE_KEY]

    def _infer(self, ids):
        import tensorflow as tf

        from ..contract import INPUT

        return {k: v.numpy() for k, v in self.fn(**{INPUT: tf.constant(ids)}).items()}

    def _close(self):
        self.obj = self.fn = None

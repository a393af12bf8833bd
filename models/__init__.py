"""probattn.models: the ProbAttention layer and the text classifier (tf-keras).

Importing this package registers ``probattn>ProbAttention`` with Keras, so saved
models load with plain ``tf_keras.models.load_model``. A model saved with the seed
page's unregistered class loads with::

    tf_keras.models.load_model(path, custom_objects={"ProbAttention": ProbAttention})
"""
from probattn.export.quiet import import_tensorflow as _import_tensorflow

_import_tensorflow()  # before tf_keras loads: TensorFlow's native start-up lines stay off stderr

from .classifier import build_classifier, find_attention_layer  # noqa: E402
from .layers import MASK_OFFSET, ProbAttention, prob_attention_pool  # noqa: E402

__all__ = ["ProbAttention", "prob_attention_pool", "build_classifier",
           "find_attention_layer", "MASK_OFFSET"]

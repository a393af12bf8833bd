"""probattn.models: the ProbAttention layer and the text classifier (tf-keras).

Importing this package registers ``probattn>ProbAttention`` with Keras, so saved
models load with plain ``tf_keras.models.load_model``. A model saved with the seed
page's unregistered class loads with::

    tf_keras.models.load_model(path, custom_objects={"ProbAttention": ProbAttention})
"""
from .classifier import build_classifier, find_attention_layer
from .layers import MASK_OFFSET, ProbAttention, prob_attention_pool

__all__ = ["ProbAttention", "prob_attention_pool", "build_classifier",
           "find_attention_layer", "MASK_OFFSET"]

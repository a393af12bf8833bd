"""The one traced serving function every artifact is made from.

Input ``token_ids``: int32 ``[batch, sequence]``, both dynamic. Outputs ``probabilities``
``[batch, classes]`` and, when asked and the model holds a ProbAttention layer,
``attention_weights`` ``[batch, sequence]`` (names from ``probattn.export.contract``).
"""
from __future__ import annotations

from .contract import ATTENTION, INPUT, PROBABILITIES


def with_attention_output(model):
    """A functional model with outputs ``{probabilities, attention_weights}`` sharing the
    original weights, or None when the model has no single ProbAttention layer reachable
    in its functional graph."""
    from probattn.models.classifier import find_attention_layer
    from probattn.models.keras_compat import keras_of

    layer = find_attention_layer(model)
    if layer is None:
        return None
    keras = keras_of(model)
    try:
        _, weights = layer(layer.input, return_attention_scores=True)
        return keras.Model(model.inputs, {PROBABILITIES: model.output, ATTENTION: weights})
    except Exception:  # subclassed or nested models without a functional graph
        return None


def serving_module(model, attention: bool = False, shape=(None, None)):
    """A ``tf.Module`` whose ``serve`` is traced with an explicit input signature; returns
    ``(module, concrete_function)``. ``attention`` is honoured only when the model has one
    ProbAttention layer in its functional graph (the exporter decides before calling).
    ``shape``: the input's ``[batch, sequence]``; ``(1, max_length)`` traces the same
    function for the fixed-shape device artifacts."""
    import tensorflow as tf

    explained = with_attention_output(model) if attention else None
    target = explained if explained is not None else model

    class Serving(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = target

        @tf.function(input_signature=[tf.TensorSpec(list(shape), tf.int32, name=INPUT)])
        def serve(self, token_ids):
            out = self.model(token_ids, training=False)
            if isinstance(out, dict):
                return {k: tf.cast(v, tf.float32) for k, v in out.items()}
            return {PROBABILITIES: tf.cast(out, tf.float32)}

    module = Serving()
    concrete = module.serve.get_concrete_function()
    return module, concrete

"""The seed page's text classifier, with its bugs fixed, in either Keras flavour."""
from __future__ import annotations

from .keras_compat import get_keras
from .layers import layer_classes


def check_sizes(vocab_size, num_classes, embedding_dim, hidden_units, dropout) -> None:
    """The sizes every classifier of the family takes, checked once (``ValueError``)."""
    for arg, value, low in (("vocab_size", vocab_size, 3), ("num_classes", num_classes, 2),
                            ("embedding_dim", embedding_dim, 1), ("hidden_units", hidden_units, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{arg} must be an integer >= {low}; received {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); received {dropout!r}")


def build_classifier(vocab_size: int, num_classes: int, embedding_dim: int = 64,
                     hidden_units: int = 128, dropout: float = 0.0,
                     name: str = "probattn_classifier", attention_layer=None, flavour=None):
    """int32 token ids of any length -> Embedding(mask_zero=True) -> ProbAttention
    (``normalize=True``: an L2-normalised pooled vector, whose scale no longer depends on
    the text's length, which full int8 needs on long texts) -> Dense(relu) -> Dense(softmax). No ``Masking()`` layer: it would recompute the mask
    from the embedding values and turn masking off (token 0's row is not zero).
    ``attention_layer`` swaps in another pooling layer instance (for comparisons).
    ``flavour``: ``"3"`` (Keras 3) or ``"2"`` (tf_keras); default: the seam's default.
    """
    check_sizes(vocab_size, num_classes, embedding_dim, hidden_units, dropout)
    keras = get_keras(flavour)
    inputs = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    x = keras.layers.Embedding(vocab_size, embedding_dim, mask_zero=True, name="embedding")(inputs)
    if dropout:
        x = keras.layers.Dropout(dropout, name="embedding_dropout")(x)
    x = (attention_layer or layer_classes(flavour).ProbAttention(name="prob_attention", normalize=True))(x)
    x = keras.layers.Dense(hidden_units, activation="relu", name="hidden")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="hidden_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                 name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def find_attention_layer(model):
    """The single ProbAttention layer of a model (searching nested models), or None."""
    found = []

    def walk(layer):
        if getattr(type(layer), "probattn_pooling", False):
            found.append(layer)
        for sub in getattr(layer, "layers", []) or []:
            walk(sub)

    walk(model)
    return found[0] if len(found) == 1 else None

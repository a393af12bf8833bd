"""The seed page's attention family, in either Keras flavour: ``probattn train --model``.

Every architecture reads int32 token ids of any length, embeds them with
``Embedding(mask_zero=True)`` (pad id 0 is masked), runs an encoder that keeps the mask,
pools over time with ``ProbAttention`` (whose weights are the exported
``attention_weights``) and classifies with ``Dense(relu) -> Dense(softmax)``:

* ``probattn``: no encoder (the seed page's model, fixed);
* ``dot``: ``keras.layers.Attention`` self-attention (dot-product scores);
* ``additive``: ``keras.layers.AdditiveAttention`` self-attention (the page's "concat");
* ``mha``: ``keras.layers.MultiHeadAttention`` self-attention; the padding mask reaches it
  from the embedding (query and value masks);
* ``bilstm``: ``Bidirectional(LSTM(return_sequences=True))``, masked steps skipped.

Every layer is a Keras builtin or ours, so the models export with builtin ops only (the
exporter rewrites what would need Select ops: see ``probattn.export.rewrites``).
"""
from __future__ import annotations

from .classifier import check_sizes
from .keras_compat import check_flavour, get_keras
from .layers import layer_classes

ARCHITECTURES = ("probattn", "dot", "additive", "mha", "bilstm", "probsparse")
DESCRIPTIONS = {
    "probattn": "Embedding -> ProbAttention (the seed page's model)",
    "dot": "Embedding -> keras.layers.Attention self-attention -> ProbAttention",
    "additive": "Embedding -> keras.layers.AdditiveAttention self-attention -> ProbAttention",
    "mha": "Embedding -> MultiHeadAttention self-attention (padding mask) -> ProbAttention",
    "bilstm": "Embedding -> Bidirectional(LSTM) -> ProbAttention",
    "probsparse": "Embedding -> ProbSparse self-attention encoder block -> ProbAttention (probattn.models.probsparse)",
}


def check_architecture(name) -> str:
    from .errors import UsageError

    if name not in ARCHITECTURES:
        raise UsageError(f"unknown model {name!r}; allowed: " + ", ".join(ARCHITECTURES))
    return name


def _encoder(keras, architecture: str, x, embedding_dim: int, hidden_units: int):
    """The layers between the embedding and the pooling; each keeps the Keras mask."""
    if architecture == "dot":
        return keras.layers.Attention(name="dot_attention")([x, x])
    if architecture == "additive":
        return keras.layers.AdditiveAttention(name="additive_attention")([x, x])
    if architecture == "mha":
        heads = 2
        return keras.layers.MultiHeadAttention(num_heads=heads, key_dim=max(1, embedding_dim // heads),
                                               name="mha")(x, x)
    if architecture == "bilstm":
        units = max(1, hidden_units // 4)
        return keras.layers.Bidirectional(keras.layers.LSTM(units, return_sequences=True), name="bilstm")(x)
    return x


def build_model(architecture: str, vocab_size: int, num_classes: int, embedding_dim: int = 64,
                hidden_units: int = 128, dropout: float = 0.0, flavour=None, name: str | None = None):
    """One architecture of the family (``ARCHITECTURES``) in Keras flavour ``flavour``."""
    architecture = check_architecture(architecture)
    check_sizes(vocab_size, num_classes, embedding_dim, hidden_units, dropout)
    flavour = check_flavour(flavour)
    if architecture == "probsparse":
        from .probsparse import build_probsparse_classifier

        return build_probsparse_classifier(vocab_size, num_classes, embedding_dim, hidden_units, dropout,
                                           flavour=flavour, **({"name": name} if name else {}))
    keras = get_keras(flavour)
    inputs = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    x = keras.layers.Embedding(vocab_size, embedding_dim, mask_zero=True, name="embedding")(inputs)
    if dropout:
        x = keras.layers.Dropout(dropout, name="embedding_dropout")(x)
    x = _encoder(keras, architecture, x, embedding_dim, hidden_units)
    # the default architecture normalises its pooled vector (int8 on long texts, see
    # build_classifier); the encoder architectures keep the plain weighted sum they were measured with
    x = layer_classes(flavour).ProbAttention(name="prob_attention", normalize=architecture == "probattn")(x)
    x = keras.layers.Dense(hidden_units, activation="relu", name="hidden")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="hidden_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                 name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name or f"{architecture}_classifier")

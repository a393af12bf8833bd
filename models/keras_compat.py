"""The one Keras seam: every probattn module gets Keras from here, never by importing
``keras`` or ``tf_keras`` itself.

Two flavours are supported:

* ``"3"``: Keras 3 (the ``keras`` package with the TensorFlow backend). On TensorFlow
  2.16 and later this is what ``from tensorflow import keras`` gives a user.
* ``"2"``: tf_keras (Keras 2), the ``tf-keras`` package.

A flavour name is what ``--keras`` takes. Models, layers and saved files are told apart by
``flavour_of`` (a live object) and by ``probattn.export.flavour`` (a file).
"""
from __future__ import annotations

import os
import sys

from .errors import UsageError
from .quiet import import_tensorflow, quiet_stderr

#: flavour -> the module that provides it
MODULES = {"3": "keras", "2": "tf_keras"}
FLAVOURS = tuple(MODULES)
#: what a TensorFlow 2.21 user gets from ``tf.keras`` (Keras 3, unless TF_USE_LEGACY_KERAS=1)
DEFAULT_FLAVOUR = "3"
DESCRIPTIONS = {"3": "Keras 3 (keras, TensorFlow backend)", "2": "tf_keras (Keras 2)"}


def check_flavour(flavour) -> str:
    value = str(flavour if flavour is not None else DEFAULT_FLAVOUR)
    if value not in MODULES:
        raise UsageError(f"unknown Keras flavour {flavour!r}; allowed: "
                         + ", ".join(f"{k} ({v})" for k, v in DESCRIPTIONS.items()))
    return value


def get_keras(flavour=None):
    """The Keras module of ``flavour`` (default ``DEFAULT_FLAVOUR``), imported quietly."""
    flavour = check_flavour(flavour)
    import_tensorflow()
    if flavour == "3":
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        with quiet_stderr():
            import keras

        if keras.backend.backend() != "tensorflow":
            raise UsageError(f"Keras 3 runs with the {keras.backend.backend()!r} backend here; probattn "
                             "exports TensorFlow graphs and needs KERAS_BACKEND=tensorflow")
        return keras
    with quiet_stderr():
        import tf_keras

    return tf_keras


def flavour_of(obj) -> str | None:
    """``"3"`` or ``"2"`` for a Keras model or layer, None for anything else. Looks only at
    Keras modules that are already imported (an object cannot come from one that is not)."""
    for flavour, name in MODULES.items():
        mod = sys.modules.get(name)
        if mod is None:
            continue
        base = mod.layers.Layer
        if isinstance(obj, base):
            return flavour
    return None


def keras_of(obj):
    """The Keras module a model or layer belongs to."""
    flavour = flavour_of(obj)
    if flavour is None:
        raise UsageError(f"expected a Keras model or layer, received {type(obj).__name__}")
    return get_keras(flavour)

"""probattn.models: the base layer of probattn.

* Keras models and layers (``ProbAttention``, the classifier, training) behind one Keras
  seam, ``probattn.models.keras_compat``. Importing them imports TensorFlow.
* TensorFlow-free pieces every other part uses: ``probattn.models.text`` (tokenizer,
  datasets), ``errors``, ``fsutil`` (atomic output folders, locks), ``metrics``.

This package never imports ``probattn.export``. Its ``__init__`` imports nothing heavy:
``from probattn.models import ProbAttention`` loads TensorFlow and Keras and registers
``probattn>ProbAttention`` (so saved models load with plain ``load_model``), while
``import probattn.models.text`` stays TensorFlow-free.
"""
from __future__ import annotations

_LAZY = {
    "ProbAttention": "layers",
    "prob_attention_pool": "layers",
    "GATE": "layers",
    "layer_classes": "layers",
    "build_classifier": "classifier",
    "find_attention_layer": "classifier",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

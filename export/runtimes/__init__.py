"""Runtimes as a registry of runners.

Each module in this package defines one ``Runner`` subclass and decorates it with
``@register``; the registry discovers the modules itself, so a new runtime is one new
module (plus its dependency) and nothing else. ``verify``, ``predict``, ``bench`` and the
CLI help all read the registry:

>>> from probattn.export import runtimes
>>> runtimes.pairs_for("tflite")            # [(LiteRTRunner, 'xnnpack'), (LiteRTRunner, 'reference'), ...]
>>> runtimes.get("onnxruntime")(path, vocab_size=20000).infer(ids)
"""
from __future__ import annotations

import importlib
import pkgutil

from probattn.models.errors import UsageError

from .base import Runner, check_token_ids  # noqa: F401  (public API)

_REGISTRY: dict = {}
_DISCOVERED = False


def register(cls):
    """Class decorator: add a Runner subclass to the registry under ``cls.runtime``."""
    if not (isinstance(cls, type) and issubclass(cls, Runner)) or cls.runtime == Runner.runtime:
        raise TypeError(f"register() takes a Runner subclass with its own 'runtime'; received {cls!r}")
    if cls.runtime in _REGISTRY and _REGISTRY[cls.runtime] is not cls:
        raise TypeError(f"two runners claim runtime '{cls.runtime}'")
    _REGISTRY[cls.runtime] = cls
    return cls


#: modules of this package that hold no runner (``isolated`` runs runners in a child
#: process; importing it costs start-up time that ``predict`` does not need)
_NOT_RUNNERS = ("base", "isolated")


def _discover():
    global _DISCOVERED
    if not _DISCOVERED:
        for info in pkgutil.iter_modules(__path__):
            if info.name not in _NOT_RUNNERS:
                importlib.import_module(f"{__name__}.{info.name}")
        _DISCOVERED = True


def runners() -> list:
    """Every registered Runner class, in their declared order."""
    _discover()
    return sorted(_REGISTRY.values(), key=lambda c: (c.order, c.runtime))


def names(tensorflow_free: bool | None = None) -> list:
    """Runtime names; ``tensorflow_free=True``: only those that never import TensorFlow."""
    return [c.runtime for c in runners() if tensorflow_free is None or c.tensorflow_free == tensorflow_free]


def get(runtime: str, tensorflow_free: bool | None = None):
    """The Runner class of ``runtime``; a one-line error lists what is allowed."""
    allowed = names(tensorflow_free)
    if runtime not in allowed:
        raise UsageError(f"unknown runtime '{runtime}'; allowed: {', '.join(allowed)}")
    return _REGISTRY[runtime]


def pairs_for(fmt: str) -> list:
    """Every (Runner class, variant) that runs artifacts of ``fmt``: the verify matrix."""
    return [(cls, v) for cls in runners() if fmt in cls.formats for v in cls.variants]


def default_format(runtime: str) -> str:
    """The format ``predict --runtime`` picks for a runtime (its first)."""
    return get(runtime).formats[0]


def describe() -> str:
    """One line per runtime for ``--help``."""
    return "; ".join(f"{c.runtime} ({'/'.join(c.formats)}"
                     + (f", variants {'/'.join(c.variants)}" if c.variants != (None,) else "") + ")"
                     for c in runners())

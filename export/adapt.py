"""What the exporter changes about a user's model before tracing it, each change measured
and recorded in the manifest (``adaptations``):

* ``TextVectorization`` inside the model: string ops have no TFLite builtins and no ONNX
  equivalents. The integer-id sub-model (the layer's output -> the model's outputs) is
  exported, and the layer itself becomes ``tokenizer.json``: its vocabulary in a Hugging
  Face WordLevel tokenizer with the same standardization (ASCII-only lowercase, Keras'
  punctuation set removed) and the same split (ASCII whitespace). Only the layer's default
  settings are translated; anything else is refused with the setting named.
* ``mixed_float16`` (or any float16/bfloat16 compute policy): TFLite has no builtin float16
  kernels (Select ops) and ONNX fp32 would be a different model. A float32 twin (same
  config with float32 policies, same weights) is exported and is the bundle's reference;
  how far the twin is from the mixed-precision model is measured and recorded separately.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from probattn.models.errors import UsageError, one_line

#: Keras' default ``TextVectorization`` punctuation set (``DEFAULT_STRIP_REGEX``)
KERAS_STRIP_REGEX = r'[!"#$%&()\*\+,-\./:;<=>?@\[\\\]^_`{|}~\']'
#: the same set as one class of ``\x{HEX}`` ranges, the form ``tokenizer_guard`` accepts
#: (every ASCII punctuation character; checked against the Keras regex in ``_ascii_class``)
KERAS_STRIP_CLASS = r"[\x{21}-\x{2F}\x{3A}-\x{40}\x{5B}-\x{60}\x{7B}-\x{7E}]"
#: ``tf.strings.split`` without a separator splits on ASCII whitespace only (space, \t, \n,
#: \v, \f, \r); a ``Split`` with ``removed`` drops the empty pieces runs of it leave
ASCII_WHITESPACE = r"[\x{20}\x{9}-\x{D}]"
#: ``tokenizer_guard`` allows at most 16 steps per normalizer ``Sequence``: the 26 ASCII
#: lowercase steps go in groups of this many
_LOWER_GROUP = 13
HALF_POLICIES = ("mixed_float16", "mixed_bfloat16", "float16", "bfloat16")


@dataclass
class Adapted:
    model: object  # the Keras model to export and to keep as the reference
    changed: bool = False  # True: the reference is saved from ``model``, not copied from the user's file
    tokenizer: object = None  # a tokenizers.Tokenizer built from a TextVectorization layer
    notes: list = field(default_factory=list)  # manifest "adaptations"


def adapt(model, probe_ids_fn) -> Adapted:
    """Strip a TextVectorization layer and replace half-precision policies (see module
    docstring). ``probe_ids_fn(vocab_size, length)`` makes ids to measure the twin on."""
    from probattn.models.keras_compat import flavour_of, get_keras

    flavour = flavour_of(model)
    keras = get_keras(flavour)
    result = Adapted(model)
    tv = [l for l in _walk(model) if isinstance(l, keras.layers.TextVectorization)]
    if tv:
        _strip_text_vectorization(result, tv, keras)
    if _half_precision(result.model):
        _float32_twin(result, keras, flavour, probe_ids_fn)
    return result


def _walk(layer):
    for sub in getattr(layer, "layers", []) or []:
        yield sub
        yield from _walk(sub)


# ---------------------------------------------------------------------------- TextVectorization

def _strip_text_vectorization(result: Adapted, layers, keras) -> None:
    model = result.model
    if len(layers) != 1:
        raise UsageError(f"the model has {len(layers)} TextVectorization layers; probattn strips exactly one "
                         "(the one that reads the model's text input)")
    layer = layers[0]
    cfg = layer.get_config()
    wanted = {"standardize": "lower_and_strip_punctuation", "split": "whitespace", "output_mode": "int"}
    bad = [f"{k}={cfg.get(k)!r}" for k, v in wanted.items() if cfg.get(k) != v]
    if cfg.get("ngrams"):
        bad.append(f"ngrams={cfg.get('ngrams')!r}")
    if bad:
        raise UsageError(f"TextVectorization layer '{layer.name}' uses {', '.join(bad)}; probattn translates only "
                         "standardize='lower_and_strip_punctuation', split='whitespace', output_mode='int' into "
                         "tokenizer.json. Tokenize outside the model and export the integer-id model")
    try:
        sub = keras.Model(layer.output, model.outputs, name=f"{model.name}_ids")
    except Exception as e:
        raise UsageError(f"could not cut the model after TextVectorization layer '{layer.name}' "
                         f"({one_line(e, 160)}); it must read the model's input and feed the rest") from None
    vocab = list(layer.get_vocabulary())
    length = cfg.get("output_sequence_length")
    tok = tokenizer_from_vocabulary(vocab, length)
    result.model = sub
    result.changed = True
    result.tokenizer = tok
    result.notes.append({"what": "TextVectorization stripped", "layer": layer.name, "vocabulary": len(vocab),
                         "output_sequence_length": length,
                         "tokenizer": "WordLevel; ASCII lowercase; Keras' punctuation removed; ASCII whitespace split",
                         "exported": "the integer-id sub-model from the layer's output"})


def tokenizer_from_vocabulary(vocab: list, length=None):
    """A Hugging Face tokenizer giving the same ids as a default TextVectorization layer
    whose ``get_vocabulary()`` is ``vocab`` (index 0 padding '', index 1 '[UNK]')."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from probattn.models.text.tokenizer import PAD_TOKEN, UNK_TOKEN

    if len(vocab) < 2 or vocab[0] != "" or vocab[1] != "[UNK]":
        raise UsageError("the TextVectorization vocabulary does not start with '' (padding) and '[UNK]'; "
                         "only the default mask and OOV tokens are supported")
    ids = {PAD_TOKEN: 0, UNK_TOKEN: 1}
    for i, word in enumerate(vocab[2:], start=2):
        ids.setdefault(word, i)
    tok = Tokenizer(models.WordLevel(ids, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(ASCII_WHITESPACE), behavior="removed")
    # tf.strings.lower lowercases ASCII only ('É' stays 'É'); HF's Lowercase is Unicode-wide:
    # one Replace per letter, grouped in nested Sequences (Python's Sequence() flattens nested
    # ones, so the normalizer is set through the JSON form)
    upper = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    lower = [{"type": "Sequence",
              "normalizers": [{"type": "Replace", "pattern": {"String": c}, "content": c.lower()}
                              for c in upper[k:k + _LOWER_GROUP]]}
             for k in range(0, len(upper), _LOWER_GROUP)]
    spec = json.loads(tok.to_str())
    spec["normalizer"] = {"type": "Sequence", "normalizers": lower + [
        {"type": "Replace", "pattern": {"Regex": _ascii_class()}, "content": ""}]}
    tok = Tokenizer.from_str(json.dumps(spec))
    if length:
        tok.enable_truncation(max_length=int(length))
    return tok


def _ascii_class() -> str:
    """``KERAS_STRIP_CLASS``, after checking it matches exactly the ASCII characters Keras'
    regex matches (no other character is stripped: the regex is ASCII)."""
    import re

    keras = {c for c in map(chr, range(128)) if re.fullmatch(KERAS_STRIP_REGEX, c)}
    ours = {c for c in map(chr, range(128))
            if re.fullmatch(re.sub(r"\\x\{([0-9A-F]+)\}", lambda m: f"\\x{int(m[1], 16):02x}", KERAS_STRIP_CLASS), c)}
    if keras != ours:  # pragma: no cover - a constant
        raise AssertionError("KERAS_STRIP_CLASS is not Keras' punctuation set")
    return KERAS_STRIP_CLASS


# ---------------------------------------------------------------------------- mixed precision

def _policy_name(layer) -> str:
    policy = getattr(layer, "dtype_policy", None) or getattr(layer, "_dtype_policy", None)
    return str(getattr(policy, "name", policy) or "")


def _half_precision(model) -> list:
    return [l.name for l in _walk(model) if _policy_name(l) in HALF_POLICIES]


def _float32_config(obj):
    if isinstance(obj, dict):
        cfg = obj.get("config")
        if obj.get("class_name") in ("DTypePolicy", "FloatDTypePolicy", "Policy") and isinstance(cfg, dict) \
                and cfg.get("name") in HALF_POLICIES:
            return {**obj, "config": {**cfg, "name": "float32"}}
        return {k: ("float32" if k == "dtype" and v in HALF_POLICIES else _float32_config(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_float32_config(v) for v in obj]
    return obj


def _float32_twin(result: Adapted, keras, flavour: str, probe_ids_fn) -> None:
    model = result.model
    layers = _half_precision(model)
    try:
        twin = model.__class__.from_config(_float32_config(model.get_config()))
        twin.set_weights(model.get_weights())
    except Exception as e:
        raise UsageError(f"the model computes in half precision (layers {', '.join(layers[:5])}); its float32 "
                         f"twin could not be built ({type(e).__name__}: {one_line(e, 200)})") from None
    left = _half_precision(twin)
    if left:
        raise UsageError(f"the float32 twin of the mixed-precision model still has half-precision layers "
                         f"({', '.join(left[:5])})")
    from .loading import vocab_size_of
    from .signature import model_input

    x = model_input(model)
    length = x.shape[1] if x is not None else None
    ids = probe_ids_fn(vocab_size_of(model) or 100, length)
    dtype = getattr(x.dtype, "name", str(x.dtype)) if x is not None else "int32"
    import tensorflow as tf

    a = [np.asarray(o, np.float64) for o in _outs(model(tf.cast(ids, dtype), training=False))]
    b = [np.asarray(o, np.float64) for o in _outs(twin(tf.cast(ids, dtype), training=False))]
    diff = max(float(np.max(np.abs(p - q))) for p, q in zip(a, b))
    flips = sum(int(np.sum(p.argmax(-1) != q.argmax(-1))) for p, q in zip(a, b) if p.ndim == 2 and p.shape[1] > 1)
    result.model = twin
    result.changed = True
    result.notes.append({"what": "float32 twin of a half-precision model",
                         "half_precision_layers": layers,
                         "twin_vs_original_max_abs": diff, "twin_vs_original_top1_flips": flips,
                         "measured_on": f"{ids.shape[0]} probe rows of random ids",
                         "note": "artifacts are judged against the float32 twin; this is how far the twin is "
                                 "from the half-precision model itself"})


def _outs(out):
    if isinstance(out, dict):
        return list(out.values())
    if isinstance(out, (list, tuple)):
        return list(out)
    return [out]

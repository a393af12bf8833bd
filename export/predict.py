"""Predict from a bundle with a TensorFlow-free runtime (onnxruntime, LiteRT, OpenVINO...):
no TensorFlow imported, ever.

>>> from probattn.export.predict import Predictor
>>> p = Predictor("bundle", runtime="onnxruntime", precision="fp32")
>>> p.predict(["a gripping, funny film"])  # [{'label': ..., 'probabilities': {...}}]

Texts are tokenized by the pure-Python fast path (``probattn.models.text.fast``) when the
bundle's ``tokenizer.json`` is exactly one of the kinds ``probattn train`` makes (portable,
regex, regex-start; wordlevel on ASCII texts, its other texts through ``tokenizers``),
otherwise by ``tokenizers``: the same ids either way. Batches follow ``batch_plan``: inside windows of
``SORT_WINDOW_BATCHES`` batches, texts are sorted by length, so a batch pads less. Every
engine (``predict_texts(engine="local" | "ray")``) runs exactly these batches, so their
results are identical, not merely close.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from probattn.models.errors import UsageError
from probattn.models.text.tokenizer import encode, load_tokenizer, pad_rows

from . import bundle as B
from . import runtimes
from .contract import PRECISIONS, PROBABILITIES
from .runtimes import check_token_ids

#: engines of ``probattn predict --engine``
ENGINES = ("local", "ray")
#: texts are sorted by length within windows of this many batches (a window is the most
#: held at once before its results are written)
SORT_WINDOW_BATCHES = 16


def batch_plan(texts, batch_size: int, window_batches: int = SORT_WINDOW_BATCHES) -> list:
    """Index lists, one per batch, covering ``texts`` once. Inside each window of
    ``batch_size * window_batches`` consecutive texts, the texts are stably sorted by
    length in characters (a proxy for tokens that needs no tokenizing) and cut into batches:
    neighbours in a batch have similar lengths, so padding to the longest costs little."""
    window = batch_size * window_batches
    plan = []
    for start in range(0, len(texts), window):
        order = sorted(range(start, min(start + window, len(texts))), key=lambda i: len(texts[i]))
        plan += [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return plan


def check_texts(texts, batch_size) -> list:
    if isinstance(texts, str):
        raise UsageError("predict() takes a list of texts, received a single str")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise UsageError(f"batch size must be a positive integer; received {batch_size!r}")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise UsageError(f"predict() takes texts (str); item {bad[0]} is {type(texts[bad[0]]).__name__}")
    return texts


class Predictor:
    """Label texts with one artifact of a bundle. The artifact's SHA-256 is checked against
    ``manifest.json`` before it is loaded. ``runtime``: any TensorFlow-free runtime of the
    registry; it runs the first format it supports (``runtimes.default_format``)."""

    def __init__(self, bundle, runtime: str = "onnxruntime", precision: str = "fp32",
                 threads: int | None = None, variant: str | None = None, max_length: int | None = None):
        cls = runtimes.get(runtime, tensorflow_free=True)
        if precision not in PRECISIONS:
            raise UsageError(f"unknown precision '{precision}'; allowed: {', '.join(PRECISIONS)}")
        self.bundle = Path(bundle)
        self.runtime, self.precision = runtime, precision
        self.manifest = B.load_manifest(self.bundle)
        fmt = runtimes.default_format(runtime)
        entry = B.find_artifact(self.manifest, fmt, precision)
        if entry is None:
            have = sorted({a["precision"] for a in self.manifest["artifacts"] if a["format"] == fmt})
            raise UsageError(f"bundle has no {fmt} {precision} artifact; it has {fmt}: {', '.join(have) or 'none'}")
        reason = cls.unavailable()
        if reason:
            raise UsageError(f"runtime {runtime} cannot run here: {reason}")
        path = B.verified_path(self.bundle, entry)
        tok_entry = self.manifest.get("tokenizer", {"path": "tokenizer.json"})
        self.tokenizer_path = B.verified_path(self.bundle, tok_entry) if tok_entry.get("sha256") \
            else self.bundle / tok_entry["path"]
        self._hf = None
        self.fast = _fast_tokenizer(self.tokenizer_path, self._hf_encode)
        if self.fast is None:
            self._hf = load_tokenizer(self.tokenizer_path)
        #: which tokenizer runs: "fast" (the pure-Python twin, which hands the texts it cannot
        #: reproduce to ``tokenizers``: ``self.fast.needs_fallback()``) or "tokenizers"
        self.text_path = "fast" if self.fast is not None else "tokenizers"
        self.labels = list(self.manifest["labels"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.max_length = max_length or self.manifest.get("max_length")
        self.runner = cls(path, self.vocab_size, threads, variant=variant,
                          input_shape=entry.get("input_shape")).activate()

    @property
    def tokenizer(self):
        """The bundle's ``tokenizers.Tokenizer`` (loaded on first use on the fast path)."""
        if self._hf is None:
            self._hf = load_tokenizer(self.tokenizer_path)
        return self._hf

    def _hf_encode(self, texts) -> list:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def predict_ids(self, token_ids) -> np.ndarray:
        """Probabilities ``[batch, classes]`` for int token ids ``[batch, sequence]``."""
        ids = check_token_ids(token_ids, self.vocab_size)
        return self.runner.infer(ids, check_inputs=False)[PROBABILITIES]

    def encode(self, texts) -> np.ndarray:
        """Token ids ``int32 [batch, longest]``, cut at the bundle's max length, right-padded."""
        if self.fast is not None:
            return pad_rows(self.fast.encode_batch(list(texts)), self.max_length)
        return encode(self.tokenizer, texts, self.max_length)

    def probabilities(self, texts, batch_size: int = 64) -> np.ndarray:
        """float32 ``[len(texts), classes]`` in input order, batched by ``batch_plan``."""
        texts = check_texts(texts, batch_size)
        out = np.zeros((len(texts), len(self.labels)), np.float32)
        for rows in batch_plan(texts, batch_size):
            out[rows] = self.predict_ids(self.encode([texts[i] for i in rows]))
        return out

    def result(self, row) -> dict:
        """One text's ``{"label", "probabilities"}`` from its probability row."""
        k = int(np.argmax(row))
        return {"label": self.labels[k],
                "probabilities": {l: round(float(p), 6) for l, p in zip(self.labels, row)}}

    def predict(self, texts, batch_size: int = 64) -> list:
        return [self.result(row) for row in self.probabilities(texts, batch_size)]


def _fast_tokenizer(path, fallback):
    """The fast path for a ``tokenizer.json`` of a kind it reproduces; None for any other file."""
    from probattn.models.text.fast import FastTokenizer, NotPortable

    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # tokenizers reports what is wrong with the file
    if not isinstance(spec, dict):
        return None
    try:
        return FastTokenizer.from_spec(spec, fallback=fallback)
    except NotPortable:
        return None


def predict_texts(bundle, texts, runtime: str = "onnxruntime", precision: str = "fp32",
                  batch_size: int = 64, engine: str = "local", workers: int | None = None):
    """``(predictor, probabilities [len(texts), classes])`` in input order. ``engine``:
    ``local`` (this process) or ``ray`` (Ray Data over an actor pool: a local cluster of
    this machine's cores, or the cluster ``RAY_ADDRESS`` names); both run the batches of
    ``batch_plan``, so their probabilities are identical."""
    if engine not in ENGINES:
        raise UsageError(f"unknown engine '{engine}'; allowed: {', '.join(ENGINES)}")
    texts = check_texts(texts, batch_size)
    predictor = Predictor(bundle, runtime=runtime, precision=precision)
    if engine == "local":
        return predictor, predictor.probabilities(texts, batch_size)
    from .ray_engine import ray_probabilities

    return predictor, ray_probabilities(predictor, texts, batch_size, workers)

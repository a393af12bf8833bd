"""Predict from a bundle with a TensorFlow-free runtime (onnxruntime, LiteRT, OpenVINO...):
no TensorFlow imported, ever, and no ``onnx`` either (its import alone costs 0.7 s).

>>> from probattn.export.predict import Predictor
>>> p = Predictor("bundle", runtime="onnxruntime", precision="fp32")
>>> p.predict(["a gripping, funny film"])  # [{'label': ..., 'probabilities': {...}}]

The bundle is read once, under its shared lock (``bundle.Bundle``): the manifest is
validated, the tokenizer and the artifact are hash-checked and handed to the tokenizer guard
and the runtime as bytes, so a concurrent ``export --overwrite`` can never mix two bundles.
A row whose output holds NaN or inf gets no label: ``{"label": None, "error": ...}``.
"""
from __future__ import annotations

import numpy as np

from probattn.models.errors import UsageError
from probattn.models.text.tokenizer import encode

from . import bundle as B
from . import limits, runtimes
from .contract import PRECISIONS, PROBABILITIES
from .runtimes import check_token_ids

#: the message of a row whose probabilities are not finite numbers
NOT_FINITE = "the model's output holds NaN or inf; no label"


class Predictor:
    """Label texts with one artifact of a bundle. ``runtime``: any TensorFlow-free runtime of
    the registry; it runs the first format it supports (``runtimes.default_format``)."""

    def __init__(self, bundle, runtime: str = "onnxruntime", precision: str = "fp32",
                 threads: int | None = None, variant: str | None = None, max_length: int | None = None):
        cls = runtimes.get(runtime, tensorflow_free=True)
        if precision not in PRECISIONS:
            raise UsageError(f"unknown precision '{precision}'; allowed: {', '.join(PRECISIONS)}")
        if threads is not None:
            limits.cap_threads(threads, "threads")
        with B.Bundle(bundle) as b:
            self.bundle = b.path
            self.manifest = m = b.manifest
            fmt = runtimes.default_format(runtime)
            entry = B.find_artifact(m, fmt, precision)
            if entry is None:
                have = sorted({a["precision"] for a in m["artifacts"] if a["format"] == fmt})
                raise UsageError(f"bundle has no {fmt} {precision} artifact; it has {fmt}: {', '.join(have) or 'none'}")
            reason = cls.unavailable()
            if reason:
                raise UsageError(f"runtime {runtime} cannot run here: {reason}")
            content = b.artifact_bytes(entry)
            self.tokenizer = b.tokenizer()
            b.check_plain_files(self.tokenizer)
            b.audit_artifact(entry, content, self.tokenizer)
            self.labels = list(m["labels"])
            self.vocab_size = int(m["vocab_size"])
            self.max_length = min(max_length or m["max_length"], m["max_length"])
            self.runner = cls(self.bundle / entry["path"], self.vocab_size, threads, variant=variant,
                              input_shape=entry.get("input_shape"), content=content,
                              n_classes=len(self.labels)).activate()
        problem = self.runner.precision_problem(precision)
        if problem:
            raise UsageError(f"{entry['path']} is listed as {precision} but {problem}; refusing it")

    def predict_ids(self, token_ids) -> np.ndarray:
        """Probabilities ``[batch, classes]`` for int token ids ``[batch, sequence]``."""
        ids = check_token_ids(token_ids, self.vocab_size)
        return self.runner.infer(ids, check_inputs=False)[PROBABILITIES]

    def encode(self, texts) -> np.ndarray:
        return encode(self.tokenizer, texts, self.max_length)

    def predict(self, texts, batch_size: int = 64) -> list:
        """One result per text: ``{"label", "probabilities"}``, or for a row whose output is
        not finite ``{"label": None, "probabilities": {...None...}, "error": ...}``."""
        if isinstance(texts, str):
            raise UsageError("predict() takes a list of texts, received a single str")
        return list(self.predict_stream(texts, batch_size))

    def predict_stream(self, texts, batch_size: int = 64):
        """Results in input order as batches complete, for any iterable of texts: memory
        holds one batch (at most ``batch_size`` texts and ``limits.BATCH_CHAR_BUDGET``
        characters), not the input."""
        limits.check_batch_size(batch_size, "batch size")
        batch, chars = [], 0
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise UsageError(f"predict() takes texts (str); item {i} is {type(t).__name__}")
            batch.append(t)
            chars += len(t)
            if len(batch) >= batch_size or chars >= limits.BATCH_CHAR_BUDGET:
                yield from self.predict_batch(batch)
                batch, chars = [], 0
        if batch:
            yield from self.predict_batch(batch)

    def predict_batch(self, texts) -> list:
        """Results of one batch (run in calls of at most ``limits.MAX_TOKENS_PER_CALL`` ids)."""
        ids = self.encode(texts)
        step = max(1, limits.MAX_TOKENS_PER_CALL // ids.shape[1])
        results = []
        for start in range(0, ids.shape[0], step):
            for row in self.predict_ids(ids[start:start + step]):
                results.append(self.result(row))
        return results

    def result(self, row) -> dict:
        if not np.isfinite(row).all():
            return {"label": None, "error": NOT_FINITE,
                    "probabilities": {l: (round(float(p), 6) if np.isfinite(p) else None)
                                      for l, p in zip(self.labels, row)}}
        k = int(np.argmax(row))
        return {"label": self.labels[k], "probabilities": {l: round(float(p), 6) for l, p in zip(self.labels, row)}}

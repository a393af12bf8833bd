"""Predict from a bundle with a TensorFlow-free runtime (onnxruntime, LiteRT, OpenVINO...):
no TensorFlow imported, ever.

>>> from probattn.export.predict import Predictor
>>> p = Predictor("bundle", runtime="onnxruntime", precision="fp32")
>>> p.predict(["a gripping, funny film"])  # [{'label': ..., 'probabilities': {...}}]
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from probattn.models.errors import UsageError
from probattn.models.text.tokenizer import encode, load_tokenizer

from . import bundle as B
from . import runtimes
from .contract import PRECISIONS, PROBABILITIES
from .runtimes import check_token_ids


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
        if tok_entry.get("sha256"):
            B.verified_path(self.bundle, tok_entry)
        self.tokenizer = load_tokenizer(self.bundle / tok_entry["path"])
        self.labels = list(self.manifest["labels"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.max_length = max_length or self.manifest.get("max_length")
        self.runner = cls(path, self.vocab_size, threads, variant=variant,
                          input_shape=entry.get("input_shape")).activate()

    def predict_ids(self, token_ids) -> np.ndarray:
        """Probabilities ``[batch, classes]`` for int token ids ``[batch, sequence]``."""
        ids = check_token_ids(token_ids, self.vocab_size)
        return self.runner.infer(ids, check_inputs=False)[PROBABILITIES]

    def encode(self, texts) -> np.ndarray:
        return encode(self.tokenizer, texts, self.max_length)

    def predict(self, texts, batch_size: int = 64) -> list:
        if isinstance(texts, str):
            raise UsageError("predict() takes a list of texts, received a single str")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch size must be a positive integer; received {batch_size!r}")
        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise UsageError(f"predict() takes texts (str); item {bad[0]} is {type(texts[bad[0]]).__name__}")
        results = []
        for i in range(0, len(texts), batch_size):
            probs = self.predict_ids(self.encode(texts[i:i + batch_size]))
            for row in probs:
                k = int(np.argmax(row))
                results.append({"label": self.labels[k],
                                "probabilities": {l: round(float(p), 6) for l, p in zip(self.labels, row)}})
        return results

"""Predict from a bundle with onnxruntime or LiteRT: no TensorFlow imported, ever.

>>> from probattn.export.predict import Predictor
>>> p = Predictor("bundle", runtime="onnxruntime", precision="fp32")
>>> p.predict(["a gripping, funny film"])  # [{'label': ..., 'probabilities': {...}}]
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import bundle as B
from .errors import UsageError
from .runners import LiteRTRunner, OnnxRunner, check_token_ids
from .tokenizer import encode, load_tokenizer

RUNTIMES = {"onnxruntime": "onnx", "litert": "tflite"}


class Predictor:
    """Label texts with one artifact of a bundle. The artifact's SHA-256 is checked against
    ``manifest.json`` before it is loaded."""

    def __init__(self, bundle, runtime: str = "onnxruntime", precision: str = "fp32",
                 threads: int | None = None, kernels: str = "xnnpack", max_length: int | None = None):
        if runtime not in RUNTIMES:
            raise UsageError(f"unknown runtime '{runtime}'; allowed: {', '.join(RUNTIMES)}")
        if precision not in B.PRECISIONS:
            raise UsageError(f"unknown precision '{precision}'; allowed: {', '.join(B.PRECISIONS)}")
        self.bundle = Path(bundle)
        self.manifest = B.load_manifest(self.bundle)
        fmt = RUNTIMES[runtime]
        entry = B.find_artifact(self.manifest, fmt, precision)
        if entry is None:
            have = sorted(a["precision"] for a in self.manifest["artifacts"] if a["format"] == fmt)
            raise UsageError(f"bundle has no {fmt} {precision} artifact; it has {fmt}: {', '.join(have) or 'none'}")
        path = B.verified_path(self.bundle, entry)
        tok_entry = self.manifest.get("tokenizer", {"path": "tokenizer.json"})
        if tok_entry.get("sha256"):
            B.verified_path(self.bundle, tok_entry)
        self.tokenizer = load_tokenizer(self.bundle / tok_entry["path"])
        self.labels = list(self.manifest["labels"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.max_length = max_length or self.manifest.get("max_length")
        if runtime == "onnxruntime":
            self.runner = OnnxRunner(path, self.vocab_size, threads)
        else:
            self.runner = LiteRTRunner(path, self.vocab_size, threads, kernels=kernels)
        self.runner.load()
        self._raw = self.runner._run  # bare runtime call, after our validation

    def predict_ids(self, token_ids) -> np.ndarray:
        """Probabilities ``[batch, classes]`` for int token ids ``[batch, sequence]``."""
        ids = check_token_ids(token_ids, self.vocab_size)
        return self._raw(ids)["probabilities"]

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

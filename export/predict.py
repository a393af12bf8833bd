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
from .runtimes.base import fixed_dims


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
        fixed = fixed_dims(entry.get("input_shape"))[1]
        if fixed:  # an artifact with a fixed input length (the model's own, or a device file's): texts are cut to it
            self.max_length = min(int(self.max_length or fixed), int(fixed))
        self.heads = self.manifest.get("heads") or [
            {"output": PROBABILITIES, "kind": "softmax", "units": len(self.labels), "labels": self.labels}]
        self.runner = cls(path, self.vocab_size, threads, variant=variant,
                          input_shape=entry.get("input_shape")).activate()

    def predict_ids(self, token_ids) -> np.ndarray:
        """Probabilities ``[batch, classes]`` (the first head) for int token ids ``[batch, sequence]``."""
        return self.predict_outputs(token_ids)[PROBABILITIES]

    def predict_outputs(self, token_ids) -> dict:
        """Every output (each head and, when exported, ``attention_weights``) for int token ids."""
        ids = check_token_ids(token_ids, self.vocab_size)
        return self.runner.infer(ids, check_inputs=False)

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
            outs = self.predict_outputs(self.encode(texts[i:i + batch_size]))
            per_head = [[_decide(row, h) for row in outs[h["output"]]] for h in self.heads]
            for j in range(len(per_head[0])):
                result = dict(per_head[0][j])
                if len(self.heads) > 1:
                    result["heads"] = {h["keras_output"]: per_head[k][j] for k, h in enumerate(self.heads) if k}
                results.append(result)
        return results


def _decide(row, head) -> dict:
    """One example's answer from one head, by its kind (see ``export/signature.py``):
    ``label`` is the decision (a list of labels for a multi-label head); ``probabilities``
    (or ``scores`` for unbounded outputs) per label."""
    from .parity.compare import decisions

    labels = head.get("labels") or [str(i) for i in range(max(2, len(row)))]
    kind = head["kind"]
    d = decisions(np.asarray(row, np.float64)[None, :], kind)[0]
    if kind in ("softmax", "scores"):
        key = "probabilities" if kind == "softmax" else "scores"
        return {"label": labels[int(d)], key: {l: round(float(p), 6) for l, p in zip(labels, row)}}
    if len(row) == 1:  # binary: one sigmoid (or logit) decides between two labels
        v = float(row[0])
        if kind == "sigmoid":
            return {"label": labels[int(d)], "probabilities": {labels[0]: round(1.0 - v, 6), labels[1]: round(v, 6)}}
        return {"label": labels[int(d)], "scores": {labels[1]: round(v, 6)}}
    return {"label": [l for l, yes in zip(labels, d) if yes],
            "probabilities": {l: round(float(p), 6) for l, p in zip(labels, row)}}

"""Predict from a bundle with a TensorFlow-free runtime (onnxruntime, LiteRT, OpenVINO...):
no TensorFlow imported, ever, and no ``onnx`` either (its import alone costs 0.7 s).

>>> from probattn.export.predict import Predictor
>>> p = Predictor("bundle", runtime="onnxruntime", precision="fp32")
>>> p.predict(["a gripping, funny film"])  # [{'label': ..., 'probabilities': {...}}]

The bundle is read once, under its shared lock (``bundle.Bundle``): the manifest is
validated, the tokenizer and the artifact are hash-checked and handed to the tokenizer guard
and the runtime as bytes, so a concurrent ``export --overwrite`` can never mix two bundles.
A row whose output holds NaN or inf gets no label: ``{"label": None, "error": ...}``.

Texts are tokenized by the pure-Python fast path (``probattn.models.text.fast``) when the
bundle's (guarded) tokenizer is exactly one of the kinds ``probattn train`` makes (portable,
regex, regex-start; wordlevel on ASCII texts, its other texts through ``tokenizers``),
otherwise by ``tokenizers``: the same ids either way. Batches follow ``batch_plan``: inside
windows of ``SORT_WINDOW_BATCHES`` batches, texts are sorted by length, so a batch pads less.
Every engine (``predict_texts(engine="local" | "ray")``) runs exactly these batches, so their
results are identical, not merely close.
"""
from __future__ import annotations

import math
from itertools import repeat

import numpy as np

from probattn.models.errors import UsageError
from probattn.models.text.tokenizer import PAD_ID, encode

from . import bundle as B
from . import limits, runtimes
from .contract import PRECISIONS, PROBABILITIES
from .runtimes import check_token_ids
from .runtimes.base import fixed_dims

#: the message of a row whose probabilities are not finite numbers
NOT_FINITE = "the model's output holds NaN or inf; no label"
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
    """``texts`` as a list of str (each within ``MAX_TEXT_CHARS``); a bad item or batch size
    is a one-line error."""
    if isinstance(texts, str):
        raise UsageError("predict() takes a list of texts, received a single str")
    limits.check_batch_size(batch_size, "batch size")
    texts = list(texts)
    if texts and (set(map(type, texts)) != {str} or max(map(len, texts)) > limits.MAX_TEXT_CHARS):
        for i, t in enumerate(texts):  # find the first bad one
            _check_text(i, t)
    return texts


def _check_text(i, t):
    if not isinstance(t, str):
        raise UsageError(f"predict() takes texts (str); item {i} is {type(t).__name__}")
    if len(t) > limits.MAX_TEXT_CHARS:
        raise UsageError(f"text {i} has {len(t):,} characters; at most {limits.MAX_TEXT_CHARS:,} allowed")


#: runtime threads of a Predictor unless told: one. A single text gains nothing from more
#: (measured: a thread pool's wake-up costs more than a 1 x 64 call), and in bulk the
#: tokenizer runs on the caller's thread while the runtime runs the previous window on its
#: own (``iter_outputs``), which is the machine's other core on two.
DEFAULT_THREADS = 1


class Predictor:
    """Label texts with one artifact of a bundle. ``runtime``: any TensorFlow-free runtime of
    the registry; it runs the first format it supports (``runtimes.default_format``).
    ``threads``: the runtime's intra-op threads (default ``DEFAULT_THREADS``)."""

    def __init__(self, bundle, runtime: str = "onnxruntime", precision: str = "fp32",
                 threads: int | None = None, variant: str | None = None, max_length: int | None = None):
        cls = runtimes.get(runtime, tensorflow_free=True)
        if precision not in PRECISIONS:
            raise UsageError(f"unknown precision '{precision}'; allowed: {', '.join(PRECISIONS)}")
        threads = DEFAULT_THREADS if threads is None else limits.cap_threads(threads, "threads")
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
            # the artifact's hash runs on another thread while the tokenizer is read and checked
            content, confirm = b.artifact_bytes_hashing_aside(entry)
            try:
                #: the guarded tokenizer as a dict; ``tokenizers`` loads it only when needed
                self._spec = b.tokenizer_spec()
                b.check_plain_files(self._spec)
            finally:  # a modified artifact is reported first, as when it was read first
                confirm()
            b.audit_artifact(entry, content, self._spec)
            self.labels = list(m["labels"])
            self.vocab_size = int(m["vocab_size"])
            self.max_length = min(max_length or m["max_length"], m["max_length"])
            fixed = fixed_dims(entry.get("input_shape"))[1]
            if fixed:  # an artifact with a fixed input length (the model's own, or a device file's): texts are cut to it
                self.max_length = min(int(self.max_length), int(fixed))
            #: the model's outputs and how each decides (``export/signature.py``); one softmax head by default
            self.heads = m.get("heads") or [
                {"output": PROBABILITIES, "kind": "softmax", "units": len(self.labels), "labels": self.labels}]
            self.runtime, self.precision, self.entry = runtime, precision, entry
            self.runner = cls(self.bundle / entry["path"], self.vocab_size, threads, variant=variant,
                              input_shape=entry.get("input_shape"), content=content,
                              n_classes=B.output_units(m))
            self.runner.spin = False
            self.runner.activate()
        problem = self.runner.precision_problem(precision)
        if problem:
            raise UsageError(f"{entry['path']} is listed as {precision} but {problem}; refusing it")
        self._hf = None
        self.fast = _fast_tokenizer(self._spec, self._hf_encode)
        if self.fast is None:
            self._hf = self.tokenizer
        #: which tokenizer runs: "fast" (the pure-Python twin, which hands the texts it cannot
        #: reproduce to ``tokenizers``: ``self.fast.needs_fallback()``) or "tokenizers"
        self.text_path = "fast" if self.fast is not None else "tokenizers"
        self._single = len(self.heads) == 1 and self.heads[0]["kind"] == "softmax"
        #: one text goes straight to ``runner.run_row`` (one softmax head, the fast tokenizer)
        self._lean = self._single and self.fast is not None
        self._first = (self.heads[0]["output"],)
        #: the heads ``results()`` reads: the first alone for one softmax head (never
        #: ``attention_weights``), else every head
        self.result_heads = self.heads[:1] if self._single else None

    @property
    def tokenizer(self):
        """The bundle's guarded ``tokenizers.Tokenizer`` (loaded on first use)."""
        if self._hf is None:
            from probattn.models.text.tokenizer import tokenizer_from_spec

            self._hf = tokenizer_from_spec(self._spec)
        return self._hf

    def _hf_encode(self, texts) -> list:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def predict_ids(self, token_ids) -> np.ndarray:
        """Probabilities ``[batch, classes]`` (the first head) for int token ids ``[batch, sequence]``."""
        return self.predict_outputs(token_ids)[PROBABILITIES]

    def predict_outputs(self, token_ids) -> dict:
        """Every output (each head and, when exported, ``attention_weights``) for int token ids."""
        ids = check_token_ids(token_ids, self.vocab_size)
        return self.runner.infer(ids, check_inputs=False)

    def _names(self, heads) -> tuple:
        return tuple(h["output"] for h in (heads or self.heads))

    def _run(self, ids, names) -> dict:
        """``names`` for ids of our own tokenizer (in range by construction: the guard allows
        no vocabulary larger than the model's), in calls of at most
        ``limits.MAX_TOKENS_PER_CALL`` ids."""
        step = max(1, limits.MAX_TOKENS_PER_CALL // ids.shape[1])
        if ids.shape[0] <= step:
            return self.runner.infer(ids, check_inputs=False, outputs=names)
        parts = [self.runner.infer(ids[i:i + step], check_inputs=False, outputs=names)
                 for i in range(0, ids.shape[0], step)]
        return {k: np.concatenate([p[k] for p in parts]) for k in names}

    def _run_plan(self, n, batches, names) -> dict:
        """Outputs ``[n, units]`` in input order from ``(rows, ids)`` batches."""
        out = {}
        for rows, ids in batches:
            got = self._run(ids, names)
            for k in names:
                if k not in out:
                    out[k] = np.zeros((n, got[k].shape[1]), np.float32)
                out[k][rows] = got[k]
        return out

    def outputs(self, texts, batch_size: int = 64, heads=None) -> dict:
        """Each head's output ``[len(texts), units]`` (``heads``: default every head) in input
        order, batched by ``batch_plan`` (a batch's runtime calls hold at most
        ``limits.MAX_TOKENS_PER_CALL`` ids)."""
        texts = check_texts(texts, batch_size)
        names = self._names(heads)
        if not texts:
            return {h["output"]: np.zeros((0, h["units"]), np.float32) for h in (heads or self.heads)}
        if len(texts) <= batch_size:  # one batch: no plan needed
            return self._run(self._encode(texts), names)
        plan = batch_plan(texts, batch_size)
        return self._run_plan(len(texts), list(zip(plan, self._encode_plan(texts, plan))), names)

    def iter_outputs(self, windows, batch_size: int = 64, heads=None):
        """``(window, outputs)`` for each ``(window, flush)`` of ``windows()``, in order. The
        runtime runs a window on its own thread while this one tokenizes the next and the
        caller formats the previous one; ``flush`` (input that stopped arriving) waits for
        that window's outputs before reading the next."""
        from concurrent.futures import ThreadPoolExecutor

        limits.check_batch_size(batch_size, "batch size")
        names = self._names(heads)
        with ThreadPoolExecutor(1, thread_name_prefix="probattn-runtime") as pool:
            pending = None
            for window, flush in windows:
                window = check_texts(window, batch_size)
                plan = batch_plan(window, batch_size)
                batches = list(zip(plan, self._encode_plan(window, plan)))
                job = (window, pool.submit(self._run_plan, len(window), batches, names))
                if pending is not None:
                    yield pending[0], pending[1].result()
                pending = job
                if flush:
                    yield pending[0], pending[1].result()
                    pending = None
            if pending is not None:
                yield pending[0], pending[1].result()

    def encode(self, texts) -> np.ndarray:
        """Token ids ``int32 [batch, longest]``, cut at the bundle's max length, right-padded."""
        texts = list(texts)
        for i, t in enumerate(texts):
            _check_text(i, t)
        return self._encode(texts)

    def _encode_plan(self, texts, plan) -> list:
        """``[self._encode([texts[i] for i in rows]) for rows in plan]``; the fast path
        tokenizes all the texts at once."""
        if self.fast is not None and hasattr(self.fast, "encode_plan"):
            return self.fast.encode_plan(texts, plan, self.max_length)
        return [self._encode([texts[i] for i in rows]) for rows in plan]

    def _encode(self, texts) -> np.ndarray:
        if self.fast is not None:
            return self.fast.encode_padded(texts, self.max_length)
        return encode(self.tokenizer, texts, self.max_length)

    def probabilities(self, texts, batch_size: int = 64) -> np.ndarray:
        """float32 ``[len(texts), units]`` of the first head (``probabilities``), in input order."""
        return self.outputs(texts, batch_size, heads=self.heads[:1])[PROBABILITIES]

    def predict(self, texts, batch_size: int = 64) -> list:
        """One result per text: ``{"label", "probabilities"}``, or for a row whose output is
        not finite ``{"label": None, "probabilities": {...None...}, "error": ...}``."""
        if type(texts) is list and len(texts) == 1 and self._lean and type(texts[0]) is str and \
                len(texts[0]) <= limits.MAX_TEXT_CHARS and type(batch_size) is int and \
                1 <= batch_size <= limits.MAX_BATCH:  # one text, checked: the leanest path
            return [self._predict_one(texts[0])]
        if isinstance(texts, str):
            raise UsageError("predict() takes a list of texts, received a single str")
        texts = check_texts(texts, batch_size)
        if len(texts) == 1 and self._lean:  # one text (of another sequence type)
            return [self._predict_one(texts[0])]
        if len(texts) <= batch_size:  # the lean path: one call, only the first head's output when that is all
            return self.results(texts, self.outputs(texts, batch_size, heads=self.result_heads))
        return list(self.predict_stream(texts, batch_size))

    def _predict_one(self, text: str) -> dict:
        """One checked text's result through ``runner.run_row`` (``_lean`` predictors)."""
        row = self.fast.encode(text)
        if len(row) > self.max_length:
            row = row[:self.max_length]
        return self.result(self.runner.run_row(row or [PAD_ID], self.max_length, self._first[0]))

    def predict_stream(self, texts, batch_size: int = 64):
        """Results in input order as windows complete, for any iterable of texts: memory
        holds two windows (``SORT_WINDOW_BATCHES`` batches, at most ``limits.BATCH_CHAR_BUDGET``
        characters a batch), not the input."""
        pairs = ((t, True) for t in texts)
        for window, outs in self.iter_outputs(windows(pairs, batch_size), batch_size, self.result_heads):
            yield from self.results(window, outs)

    def predict_batch(self, texts, batch_size: int | None = None) -> list:
        """Results of ``texts`` (already in memory), batched by ``batch_plan``."""
        batch_size = batch_size or max(1, len(texts))
        return self.results(texts, self.outputs(texts, batch_size, heads=self.result_heads))

    def results(self, texts, outs) -> list:
        """One result dict per text from ``outputs()``'s arrays (formatted here, at the edge)."""
        first = outs[self.heads[0]["output"]]
        if self._single:
            return [self.result(row) for row in first]
        results = []
        for j in range(len(texts)):
            if not np.isfinite(first[j]).all():
                results.append(self.result(first[j]))
                continue
            result = _decide(first[j], self.heads[0])
            if len(self.heads) > 1:
                result["heads"] = {h["keras_output"]: _decide(outs[h["output"]][j], h) for h in self.heads[1:]}
            results.append(result)
        return results

    def result(self, row) -> dict:
        """One text's ``{"label", "probabilities"}`` from its probability row (formatted here,
        at the edge; ``probabilities()`` returns the array)."""
        values = row if type(row) is list else row.tolist() if isinstance(row, np.ndarray) else [float(p) for p in row]
        total = sum(values)
        if total - total != 0:  # NaN or inf somewhere (inf - inf and NaN - NaN are NaN)
            return {"label": None, "error": NOT_FINITE,
                    "probabilities": {l: (round(p, 6) if math.isfinite(p) else None)
                                      for l, p in zip(self.labels, values)}}
        return {"label": self.labels[values.index(max(values))],  # the first largest, as argmax
                "probabilities": dict(zip(self.labels, map(round, values, repeat(6))))}


def windows(pairs, batch_size: int):
    """``(window, flush)`` from ``(text, more_waiting)`` pairs: lists of consecutive texts,
    each at most ``SORT_WINDOW_BATCHES`` batches and their character budget, or fewer as soon
    as no more input is waiting (then ``flush``: the window is answered before more is read;
    the last window is flushed too). Every text is checked."""
    def blocks():
        for i, (t, more) in enumerate(pairs):
            _check_text(i, t)
            yield [t], more

    return windows_of_blocks(blocks(), batch_size)


def windows_of_blocks(blocks, batch_size: int):
    """``windows`` from ``(texts, more_waiting)`` blocks of checked texts (``more_waiting``:
    after the block's last text), cut without looking at each text in Python."""
    from bisect import bisect_left
    from itertools import accumulate

    limits.check_batch_size(batch_size, "batch size")
    window, chars = [], 0
    limit_texts, limit_chars = batch_size * SORT_WINDOW_BATCHES, limits.BATCH_CHAR_BUDGET * SORT_WINDOW_BATCHES
    for texts, more in blocks:
        start = 0
        while start < len(texts):
            piece = texts[start:start + limit_texts - len(window)]
            sums = list(accumulate(map(len, piece), initial=chars))
            if sums[-1] >= limit_chars:  # the window ends at the text that reaches the budget
                piece = piece[:bisect_left(sums, limit_chars, 1)]
                sums = sums[:len(piece) + 1]
            window += piece
            chars = sums[-1]
            start += len(piece)
            last = start == len(texts)
            if len(window) >= limit_texts or chars >= limit_chars or (last and not more):
                yield window, last and not more
                window, chars = [], 0
    if window:
        yield window, True


def _fast_tokenizer(spec: dict, fallback):
    """The fast path for a (guarded) tokenizer spec of a kind it reproduces; None for any other."""
    from probattn.models.text.fast import FastTokenizer, NotPortable

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
    if engine == "ray" and (len(predictor.heads) > 1 or predictor.heads[0]["kind"] != "softmax"):
        raise UsageError("--engine ray labels bundles with one softmax output; this bundle has "
                         f"{', '.join(h['kind'] for h in predictor.heads)} outputs: use --engine local")
    if engine == "local":
        return predictor, predictor.probabilities(texts, batch_size)
    from .ray_engine import ray_probabilities

    return predictor, ray_probabilities(predictor, texts, batch_size, workers)


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

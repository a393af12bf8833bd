"""The Runner base class: one small class per runtime (as in Polygraphy's
``backend/base/runner.py``): ``infer()`` checks the inputs once, here, then calls the
runtime's own ``_infer``. A runner declares its runtime name, the formats and variants it
runs, the import names it needs and the pip package that provides them.

Input errors have one fixed shape: ``Input 'token_ids' | Received dtype float32. Expected
an integer dtype (int32)``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from probattn.models.errors import UsageError

from probattn.models.text.tokenizer import PAD_ID

from ..contract import ATTENTION, INPUT
from ..limits import MAX_TOKENS_PER_CALL, cap_threads, check_call_size

#: outputs with one value per step, cut back to the caller's length after padding
PER_STEP_OUTPUTS = (ATTENTION,)


def fixed_dims(input_shape) -> tuple:
    """``(fixed batch or None, fixed length or None)`` from a manifest ``input_shape``."""
    if input_shape is None:
        return None, None
    if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2:
        raise UsageError(f"input_shape must be [batch, sequence]; received {input_shape!r}")
    dims = []
    for d in input_shape:
        if isinstance(d, bool) or not (isinstance(d, str) or (isinstance(d, int) and d >= 1)):
            raise UsageError(f"input_shape dims must be names or positive integers; received {input_shape!r}")
        dims.append(d if isinstance(d, int) else None)
    return tuple(dims)


def check_token_ids(ids, vocab_size: int | None) -> np.ndarray:
    """Validate before inference: runtimes differ here (onnxruntime errors, a TFLite
    gather may read out of bounds), so the check is ours. The common case (an int32
    matrix of valid ids) costs one pass over the ids."""
    arr = ids if type(ids) is np.ndarray else np.asarray(ids)
    if arr.dtype != np.int32:
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer):
            raise UsageError(f"Input '{INPUT}' | Received dtype {arr.dtype}. Expected an integer dtype (int32)")
    if arr.ndim != 2:
        raise UsageError(f"Input '{INPUT}' | Received rank {arr.ndim} (shape {arr.shape}). Expected rank 2 [batch, sequence]")
    if arr.size == 0:
        raise UsageError(f"Input '{INPUT}' | Received an empty batch (shape {arr.shape}). Expected at least 1 x 1")
    if arr.size > MAX_TOKENS_PER_CALL:
        check_call_size(arr.shape)
    if arr.dtype != np.int32:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= min(vocab_size or 2**31 - 1, 2**31 - 1):
            _raise_range(lo, hi, vocab_size)
        arr = arr.astype(np.int32)
    elif vocab_size is not None and _max_as_unsigned(arr) >= vocab_size:  # negatives wrap high
        _raise_range(int(arr.min()), int(arr.max()), vocab_size)
    return arr


#: Up to this many ids the range check runs in Python: a NumPy reduction right before an
#: onnxruntime call measured ~11 us slower at batch 1 x 64 (vs ~3 us in Python), which
#: is a third of the call itself. Larger inputs use NumPy.
_PY_CHECK_MAX = 4096


def _max_as_unsigned(arr: np.ndarray) -> int:
    flat = arr.view(np.uint32).ravel()
    return max(flat.tolist()) if flat.size <= _PY_CHECK_MAX else int(flat.max())


def _raise_range(lo, hi, vocab_size):
    bad = lo if lo < 0 else hi
    raise UsageError(f"Input '{INPUT}' | Received id {bad}. Expected ids in [0, {vocab_size})")


def import_failure(runner, error) -> str:
    """One line: the runtime failed to import, and which other runtimes could run the format."""
    from . import runners

    others = [c.runtime for c in runners() if c.runtime != runner.runtime
              and set(c.formats) & set(type(runner).formats) and c.unavailable() is None]
    hint = (f"; try --runtime {' or '.join(others)}" if others
            else f"; reinstall it (pip install --force-reinstall {type(runner).package or runner.runtime})")
    return f"runtime {runner.runtime} is installed but failed to import ({' '.join(str(error).split())[:200]}){hint}"


class Runner:
    """``with Runner(path, vocab_size=...) as r: r.infer(ids) -> {output name: float32 array}``.

    Subclasses set the class attributes and implement ``_load``, ``_infer`` and, when they
    hold resources, ``_close``. Register them with ``probattn.export.runtimes.register``.
    """

    #: registry key, what ``--runtime`` takes
    runtime = "base"
    #: artifact formats this runtime runs
    formats: tuple = ()
    #: kernel families / optimisation levels verified separately; the first is the default
    variants: tuple = (None,)
    #: import names; a runtime that is missing is skipped with the reason
    requires: tuple = ()
    #: the pip package that provides ``requires``
    package = ""
    #: True when loading and running never import TensorFlow (allowed in ``predict``)
    tensorflow_free = True
    #: True for a runtime that reads files made for other runtimes (OpenVINO reads ONNX and
    #: TFLite): a file it cannot read (an op its importer lacks) is its limit, reported as a
    #: skip, and the exporter checks files only on the runtimes they are made for
    secondary = False
    #: True for a runtime that is TensorFlow itself (SavedModel, Keras): the export's run
    #: check runs it in the exporting process, which holds TensorFlow already (a child
    #: would start a second one: seconds, and as much memory again)
    is_tensorflow = False
    #: lengths ``predict`` pads one text to (the first that fits, at most the model's max
    #: length) for a runtime whose every new input shape costs a reallocation (LiteRT: about
    #: 30 us, three times a 1 x 64 call); empty: the text's own length. Pads are masked, so
    #: the outputs stay within the padding invariance ``verify`` checks.
    single_lengths: tuple = ()
    #: position in listings and in the verify matrix
    order = 100
    description = ""

    def __init__(self, path, vocab_size: int | None = None, threads: int | None = None,
                 variant: str | None = None, input_shape=None, *, content: bytes | None = None,
                 n_classes: int | None = None, unsafe: bool = False):
        self.path = Path(path)
        self.vocab_size = vocab_size
        #: intra-op threads, 1 to the CPUs this process may use (None: the runtime's default)
        self.threads = None if threads is None else cap_threads(threads, "threads")
        #: the artifact's bytes, already hash-checked by the caller (then ``path`` only names it)
        self.content = content
        #: the bundle's label count, checked against the artifact's output where the runtime can
        self.n_classes = n_classes
        #: ``--unsafe``: load what the safety checks refuse (Lambda layers, SavedModel ops)
        self.unsafe = unsafe
        #: ``[batch, sequence]`` from the manifest: an int fixes a dim (a device artifact of
        #: shape ``[1, 64]``, a model with ``Input(shape=(64,))``), a name leaves it dynamic
        self.fixed_batch, self.fixed_length = fixed_dims(input_shape)
        if variant is None:
            variant = self.variants[0]
        if variant not in self.variants:
            raise UsageError(f"unknown {self.runtime} variant '{variant}'; allowed: "
                             + ", ".join(str(v) for v in self.variants))
        self.variant = variant
        self.active = False
        #: False: a runtime's idle threads sleep rather than spin (set before ``activate``;
        #: ``predict`` does, its tokenizer runs between the calls)
        self.spin = True

    @property
    def name(self) -> str:
        """``runtime`` or ``runtime-variant``: how reports name this runner."""
        return self.runtime if self.variant is None else f"{self.runtime}-{self.variant}"

    @classmethod
    def unavailable(cls) -> str | None:
        """None when the runtime can run here; otherwise the reason it is skipped."""
        missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        if missing:
            return f"{', '.join(missing)} not installed (pip install {cls.package or ' '.join(missing)})"
        return None

    @classmethod
    def cannot_run(cls, fmt: str, precision: str, entry: dict | None = None) -> str | None:
        """None when this runtime runs artifacts of ``fmt`` in ``precision``; otherwise why
        not (a documented limit of the runtime, reported as a skip). ``entry``: the
        artifact's manifest entry, whose ``target_checks`` say what the export measured."""
        return None if fmt in cls.formats else f"{cls.runtime} does not run {fmt} files"

    def activate(self):
        if not self.active:
            try:
                self._load()
            except ImportError as e:  # installed but broken (a missing shared library, ...)
                raise UsageError(import_failure(self, e)) from None
            self.active = True
        return self

    def read_model(self, max_bytes: int, what: str) -> bytes:
        """The artifact's bytes: ``content`` if given, else the file at ``path`` (a regular
        file, no link followed, never a FIFO)."""
        if self.content is not None:
            return self.content
        from probattn.models.fsutil import read_regular

        return read_regular(self.path, max_bytes, what=what)

    def precision_problem(self, precision: str) -> str | None:
        """Why the loaded artifact does not hold ``precision`` (None: it does, or the runtime
        cannot tell). Call after ``activate``."""
        return None

    def deactivate(self):
        if self.active:
            self._close()
        self.active = False

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()

    def infer(self, ids, check_inputs: bool = True, outputs=None) -> dict:
        """Run token ids ``[batch, sequence]``. ``check_inputs=False`` skips our validation
        (for callers that checked the ids already, and for benchmarks of the bare call).

        A fixed-shape artifact gets what it takes: ids shorter than its fixed length are
        right-padded (with the pad id, which the model masks) and its per-step outputs cut
        back to the caller's length; a fixed batch of 1 is run row by row. Longer ids are
        refused: truncating them would change the text.

        ``outputs``: the names to fetch (default every output); a runtime that can leave the
        others unfetched does (``_infer_outputs``)."""
        if not self.active:
            self.activate()
        if check_inputs:
            ids = check_token_ids(ids, self.vocab_size)
        if self.fixed_length is None and self.fixed_batch is None:
            got = self._infer(ids) if outputs is None else self._infer_outputs(ids, outputs)
            return {k: np.asarray(v, dtype=np.float32) for k, v in got.items()}
        got = self._infer_fixed(ids)
        return got if outputs is None else {k: got[k] for k in outputs}

    def row_width(self, n: int, max_length: int) -> int:
        """The length one text of ``n`` ids is padded to: the first of ``single_lengths``
        that fits, at most ``max_length`` (never less than ``n``)."""
        for w in self.single_lengths:
            if w >= n:
                return w if w <= max_length else max(n, max_length)
        return n

    def run_row(self, row: list, max_length: int, output: str) -> list:
        """One text's ids (``row``: in range, 1 to ``max_length`` of them) to ``output``'s row
        as floats: ``predict``'s single-text call, by the leanest way the runtime has. The ids
        are right-padded to the first of ``single_lengths`` that fits (pads are masked)."""
        n = len(row)
        ids = np.zeros((1, self.row_width(n, max_length)), np.int32)
        ids[0, :n] = row
        return self.infer(ids, check_inputs=False, outputs=(output,))[output][0].tolist()

    def accepts_length(self, length: int) -> bool:
        return self.fixed_length is None or length <= self.fixed_length

    def accepts(self, ids) -> bool:
        """Whether this runner can run the batch ``ids`` as it is (verify reports a case it
        cannot run as not applicable): not longer than a fixed length, and, for runtimes that
        rebuild texts from ids, ids a text could have produced."""
        return self.accepts_length(np.shape(ids)[1])

    def _infer_fixed(self, ids) -> dict:
        length = ids.shape[1]
        if not self.accepts_length(length):
            raise UsageError(f"Input '{INPUT}' | Received sequence length {length}. Expected at most "
                             f"{self.fixed_length} ({self.path.name} has a fixed length)")
        if self.fixed_length is not None and length < self.fixed_length:
            ids = np.pad(ids, ((0, 0), (0, self.fixed_length - length)), constant_values=PAD_ID)
        rows = [ids[i:i + 1] for i in range(ids.shape[0])] if self.fixed_batch == 1 else [ids]
        outs = [self._infer(np.ascontiguousarray(r)) for r in rows]
        merged = {k: np.concatenate([np.asarray(o[k], dtype=np.float32) for o in outs]) for k in outs[0]}
        for k, v in merged.items():  # per-step outputs back to the caller's length
            if k in PER_STEP_OUTPUTS and v.ndim == 2 and v.shape[1] > length:
                merged[k] = v[:, :length]
        return merged

    # subclasses
    def _load(self):
        raise NotImplementedError

    def _infer(self, ids) -> dict:
        raise NotImplementedError

    def _infer_outputs(self, ids, names) -> dict:
        """``_infer`` restricted to ``names`` (runtimes that can skip the others override it)."""
        got = self._infer(ids)
        return {k: got[k] for k in names}

    def _close(self):
        pass

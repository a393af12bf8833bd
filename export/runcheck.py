"""Before an artifact goes into a bundle it must run: every artifact is opened and run in
every runtime of the verify matrix it is made for (every LiteRT kernel family for TFLite,
onnxruntime with and without graph optimisation for ONNX; not ``secondary`` readers such
as OpenVINO, whose missing importers are their own limit), in a child process
(``runtimes.isolated``; TensorFlow itself, for the SavedModel, in the exporting process,
which holds TensorFlow already), on a few ragged rows and an all-padding row. A runtime that
crashes (segfault, abort), hangs or refuses the file makes the artifact "does not run":
the exporter leaves it out (or fails, when the user asked for it by name).

One worker process serves every check in turn; a crash costs a new worker, nothing else.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from probattn.models.errors import UsageError, one_line

from . import contract as C
from . import runtimes
from .runtimes.base import fixed_dims
from .runtimes.isolated import IsolatedRunner, Limits, RuntimeCrash, Worker

#: a load or a smoke call that takes longer than this is a hang, not a slow start
CHECK_LIMITS = Limits(load_seconds=300.0, call_seconds=120.0)


def smoke_ids(vocab_size: int, fixed_length: int | None) -> np.ndarray:
    """Three ragged rows and an all-padding row, ids drawn from the whole vocabulary."""
    width = min(fixed_length or 12, 12)
    rng = np.random.default_rng(0)
    ids = np.zeros((4, width), np.int32)
    for i, n in enumerate((width, max(1, width // 2), 1)):
        ids[i, :n] = rng.integers(1, max(2, vocab_size), n)
    ids[0, 0] = vocab_size - 1  # the largest id
    return ids


def expected_outputs(fmt: str, output_names: list) -> list:
    """The outputs a file of ``fmt`` must give (MediaPipe's file: the probabilities only)."""
    return [n for n in output_names if n in C.MEDIAPIPE_OUTPUTS] if fmt == "mediapipe" else list(output_names)


def check_artifacts(bundle: Path, entries: list, vocab_size: int, output_names: list, log=print) -> dict:
    """``{artifact path: reason}`` for every artifact that does not run somewhere it should.
    The rows fit each entry's ``input_shape`` (no longer than a fixed length); a runtime
    that cannot be given such ids at all (MediaPipe rebuilds texts from them) and one the
    export measured the file against (``target_checks``) are not asked."""
    failures = {}
    worker = None
    try:
        for entry in entries:
            path = Path(bundle) / entry["path"]
            ids = smoke_ids(vocab_size, fixed_dims(entry.get("input_shape"))[1])
            wanted = expected_outputs(entry["format"], output_names)
            for cls, variant in runtimes.pairs_for(entry["format"]):
                if cls.secondary or cls.unavailable() or cls.cannot_run(entry["format"], entry["precision"], entry):
                    continue  # checked on the runtimes the file is made for
                if cls.is_tensorflow and "tensorflow" in sys.modules:  # the exporter's own TensorFlow
                    runner = cls(path, vocab_size, variant=variant, input_shape=entry.get("input_shape"))
                else:
                    if worker is None or worker.closed:
                        worker = Worker(CHECK_LIMITS)
                    runner = IsolatedRunner(cls, path, vocab_size, variant=variant,
                                            input_shape=entry.get("input_shape"), limits=CHECK_LIMITS, worker=worker)
                try:
                    with runner:
                        if not runner.accepts(ids):
                            continue
                        out = runner.infer(ids)
                    missing = sorted(set(wanted) - set(out))
                    if missing:
                        raise UsageError(f"outputs {sorted(out)}, missing {missing}")
                except RuntimeCrash as e:
                    failures[entry["path"]] = f"crashed {runner.name}: {e}"
                    worker = None
                except UsageError as e:
                    failures[entry["path"]] = f"does not run on {runner.name}: {one_line(e, 300)}"
                except Exception as e:  # in this process (TensorFlow): what the worker reports as a crash
                    if isinstance(runner, IsolatedRunner):
                        raise
                    failures[entry["path"]] = f"crashed {runner.name}: {type(e).__name__}: {one_line(e, 300)}"
                if entry["path"] in failures:
                    log(f"  ✗ {entry['path']}: {failures[entry['path']]}")
                    break
    finally:
        if worker is not None:
            worker.close()
    return failures

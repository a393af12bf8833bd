"""Resource limits, one home: how much memory, time and how many threads a runtime may use,
and how big an input may be. Each number has its reason beside it.

In-process (``predict``, ``verify``, ``bench``):

* ``ort_session_options``: onnxruntime with a capped CPU arena shared by every session of
  the process (``create_and_register_allocator`` + ``session.use_env_allocators``), so a
  graph that expands to billions of values fails with an allocation error instead of
  taking the machine's memory, and constant folding limited to ``ORT_FOLD_BYTES`` (by
  default onnxruntime folds constants up to 1 GiB at session creation: a 1.6 KB file took
  1.6 GB and seconds before the first call). Costs nothing on real models.
* ``cap_threads``: 1 to the number of CPUs this process may use (``sched_getaffinity``):
  ``bench --threads 100000`` made a 70 s onnxruntime session with 100,000 threads.
* ``check_batch_size``, ``MAX_TOKENS_PER_CALL``, ``MAX_TEXT_CHARS``: what one call may get.
* ``tflite_static_bytes``: LiteRT allocates every tensor of a graph at load; a file that
  declares a huge intermediate tensor is refused before that.

In a child process (a runtime that can crash or hang): ``apply_child_limits`` (memory with
``RLIMIT_DATA``, no core files, dies with its parent) and the per-call ``CALL_SECONDS`` /
``LOAD_SECONDS`` the parent waits before it kills the child.
"""
from __future__ import annotations

import os

from probattn.models.errors import UsageError
from probattn.models.bounds import MAX_TEXT_CHARS  # noqa: F401  (one text, in characters: re-exported)
from probattn.models.text.tokenizer import MAX_LENGTH_LIMIT  # noqa: F401  (re-exported)

#: texts per predict batch at most (``--batch-size``, ``Predictor.predict``): 1,024 texts of
#: ``MAX_TEXT_CHARS`` is the largest batch a caller can build (~400 MB of UTF-8 at worst);
#: the default is 64
MAX_BATCH = 1024
#: characters of text held by one predict batch before it is run, whatever ``--batch-size``
#: says: bounds what a stream of long lines holds in memory (see ``predict_stream``)
BATCH_CHAR_BUDGET = 1_000_000
#: token ids in one runtime call at most (rows x longest). The default classifier's largest
#: activation is ids x 64 dims x 4 bytes: 256 MiB at this bound. Bigger batches are split.
MAX_TOKENS_PER_CALL = 1 << 20
#: onnxruntime's CPU arena for the whole process: 16 times that largest activation
ORT_ARENA_BYTES = 4 << 30
#: constants onnxruntime may fold at session creation: larger than any weight of a
#: 250,000-word x 64-dim fp32 embedding (64 MB)
ORT_FOLD_BYTES = 64 << 20
#: LiteRT tensors a graph may declare with static shapes (allocated at load)
TFLITE_STATIC_BYTES = 1 << 30
#: a child runtime's data segment (``RLIMIT_DATA``): 4 times the peak of a full export of the
#: default classifier (1.5 GB RSS). ``RLIMIT_AS`` is not used: TensorFlow reserves address
#: space it never touches and ``import tensorflow`` fails under an address-space limit of 1 GiB.
CHILD_DATA_BYTES = 6 << 30
#: how long a parent waits for a child runtime to load an artifact, and for one call (the
#: slowest real call, a SavedModel at 256 x 1,024 tokens, takes well under a second; first
#: calls compile kernels)
LOAD_SECONDS = 300.0
CALL_SECONDS = 120.0


def shape_caps(max_length: int) -> tuple:
    """The input ONNX shape inference assumes (``audit.onnx.shape_check``): one text of 4 x the
    training length, at least 256 tokens: the longest case verify runs. Tensors that grow with
    the batch scale from there and are bounded at run time by ``MAX_TOKENS_PER_CALL`` and the
    arena; a graph that expands past ``audit.onnx.MAX_ELEMENTS`` on one such text is refused."""
    return (1, max(4 * int(max_length), 256))


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cap_threads(n, what: str = "--threads") -> int:
    """``n`` if it is an integer from 1 to the CPUs this process may use, else a UsageError."""
    cpus = usable_cpus()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"{what} must be a positive integer; received {n!r}")
    if n > cpus:
        raise UsageError(f"{what} {n:,} is more than the {cpus} CPUs this process may use; allowed: 1 to {cpus}")
    return n


def check_batch_size(n, what: str = "--batch-size") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_BATCH:
        raise UsageError(f"{what} must be an integer from 1 to {MAX_BATCH:,}; received {n!r}")
    return n


def check_call_size(shape) -> None:
    """Refuse a runtime call of more than ``MAX_TOKENS_PER_CALL`` ids."""
    rows, length = int(shape[0]), int(shape[1])
    if rows * length > MAX_TOKENS_PER_CALL:
        raise UsageError(f"Input 'token_ids' | Received {rows:,} x {length:,} = {rows * length:,} ids. Expected at "
                         f"most {MAX_TOKENS_PER_CALL:,} ids per call (split the batch)")


_ORT_ARENA = {}


def ort_session_options(threads: int | None = None, optimize: bool = True, spin: bool = True):
    """``onnxruntime.SessionOptions`` with the process-wide capped arena, the folding limit
    and, when ``threads`` is given, that many intra-op threads (capped) and one inter-op.
    ``spin=False``: idle pool threads sleep instead of spinning (``predict``, where the
    tokenizer needs the cores between runtime calls)."""
    import onnxruntime as ort

    if "bytes" not in _ORT_ARENA:  # once per process: every session shares it
        mem = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # OrtArenaCfg(max_mem, arena_extend_strategy 1 = grow by what is requested, initial chunk, max dead bytes)
        ort.create_and_register_allocator(mem, ort.OrtArenaCfg(ORT_ARENA_BYTES, 1, -1, -1))
        _ORT_ARENA["bytes"] = ORT_ARENA_BYTES
    so = ort.SessionOptions()
    so.add_session_config_entry("session.use_env_allocators", "1")
    so.add_session_config_entry("optimization.constant_folding_max_output_size_in_bytes", str(ORT_FOLD_BYTES))
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = cap_threads(threads, "threads")
        so.inter_op_num_threads = 1
    return so


def tflite_static_bytes(interpreter) -> int:
    """Bytes of every LiteRT tensor at its declared shape (dynamic dims count as 1)."""
    import numpy as np

    total = 0
    for t in interpreter.get_tensor_details():
        n = 1
        for d in t["shape"]:
            n *= max(int(d), 1)
        total += n * np.dtype(t["dtype"]).itemsize
    return total


def apply_child_limits(data_bytes: int | None = CHILD_DATA_BYTES, cpu_seconds: int | None = None) -> None:
    """In a child process that hosts a runtime, before it imports anything: cap its data
    segment (``RLIMIT_DATA``: an allocation past it fails, TensorFlow still imports), write no
    core file, and die with the parent (``PR_SET_PDEATHSIG``)."""
    import resource
    import signal

    if data_bytes:
        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        cap = data_bytes if hard == resource.RLIM_INFINITY else min(data_bytes, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    if cpu_seconds:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, resource.getrlimit(resource.RLIMIT_CPU)[1]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (ImportError, OSError, AttributeError):  # pragma: no cover - not Linux
        pass

"""``probattn predict --engine ray``: batch inference with Ray Data over an actor pool.

Each actor loads the bundle once (a ``Predictor``: hash check, tokenizer, one runtime
thread) and labels whole batches. The batches are those of ``predict.batch_plan`` (texts
sorted by length inside windows, so little padding), made on the driver: one Ray row is
one batch, so every text is computed in exactly the batch, with exactly the padding, that
the single-process path uses, and the probabilities are identical. Results carry their
input index and are written back in input order.

Without ``RAY_ADDRESS`` a local cluster of this machine's cores is started (no dashboard,
no usage statistics) and shut down at the end. With ``RAY_ADDRESS`` set, ``ray.init()``
joins that cluster; its nodes need this probattn installed (``pip install
'probattn[ray]'``), and they get the bundle's files through Ray's object store, so the
bundle need not be on a shared filesystem.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings

import numpy as np

from probattn.models.errors import UsageError

from . import bundle as B
from .predict import check_texts

#: planned batches per ``map_batches`` call: an actor tokenizes their texts in one scan (a
#: window of ``predict.SORT_WINDOW_BATCHES`` batches, as one process does) and runs them
#: one by one
BATCHES_PER_CALL = 16
#: blocks per actor: enough for the pool to balance the work
BLOCKS_PER_WORKER = 4


def _import_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never report usage
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError("--engine ray needs Ray Data: pip install 'probattn[ray]' "
                         "(ray[data]); or use --engine local") from None
    return ray


@contextlib.contextmanager
def _quiet_ray():
    """Ray's and Ray Data's INFO/WARNING lines (start-up notes, execution summaries) off
    stderr while we run; errors still show."""
    loggers = [logging.getLogger(n) for n in ("ray", "ray.data")]
    levels = [l.level for l in loggers]
    for l in loggers:
        l.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for l, lv in zip(loggers, levels):
            l.setLevel(lv)


def bundle_files(predictor) -> dict:
    """What an actor needs to rebuild the predictor, as ``{relative path: bytes}``: the
    manifest, the tokenizer, labels.txt / vocab.txt when the bundle has them, and the
    artifact (one file for every TensorFlow-free runtime). Read under the bundle's shared
    lock, each file hash-checked; the actor's Predictor checks them all again."""
    from probattn.models.text.tokenizer_guard import MAX_TOKENIZER_BYTES

    from .bundle import MAX_ARTIFACT_BYTES

    entry = predictor.entry
    with B.Bundle(predictor.bundle) as b:
        if b.contents.get(entry["path"]) is None:
            raise UsageError(f"--engine ray ships single-file artifacts; {entry['path']} is a directory")
        files = {entry["path"]: b.read(entry["path"], MAX_ARTIFACT_BYTES, "artifact"),
                 b.manifest["tokenizer"]["path"]: b.read(b.manifest["tokenizer"]["path"], MAX_TOKENIZER_BYTES,
                                                         "tokenizer")}
        for f in (b.manifest.get("files") or {}).values():
            if isinstance(f, dict) and "path" in f and "sha256" in f:
                files[f["path"]] = b.read(f["path"], MAX_TOKENIZER_BYTES, f["path"])
        files[B.MANIFEST] = (b.path / B.MANIFEST).read_bytes()
    return files


class BatchPredictor:
    """A Ray Data actor: writes the shipped files into a private folder, loads a Predictor
    from it (the manifest hashes are checked again there) and labels planned batches."""

    def __init__(self, shipped, runtime, precision, max_length):
        import ray

        from .predict import Predictor

        files = ray.get(shipped[0])  # a reference inside a list: fetched here, not by Ray
        self._dir = tempfile.mkdtemp(prefix="probattn-ray-bundle-")
        try:
            for rel, data in files.items():
                path = B.inside(self._dir, rel)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            # one runtime thread per actor: the pool, not the runtime, spreads the work
            self.predictor = p = Predictor(self._dir, runtime=runtime, precision=precision, threads=1,
                                           max_length=max_length)
            if p.fast is not None and p.fast.needs_fallback():
                p.tokenizer  # the fallback for non-ASCII texts: loaded before its file goes
        finally:
            # the runtime holds what it needs in memory: the copy can go at once
            shutil.rmtree(self._dir, ignore_errors=True)

    def __call__(self, batch: dict) -> dict:
        """Probabilities of the planned batches in ``batch`` (each batch's texts padded as
        ``Predictor.encode`` pads them: the same ids, tokenized together)."""
        p = self.predictor
        groups = [[str(t) for t in texts] for texts in batch["text"]]
        for texts in groups:
            check_texts(texts, max(1, len(texts)))
        flat, plan = [], []
        for texts in groups:
            plan.append(range(len(flat), len(flat) + len(texts)))
            flat += texts
        probs = [p.predict_ids(ids) for ids in p._encode_plan(flat, plan)]
        idx = [np.asarray(rows, np.int64) for rows in batch["idx"]]
        return {"idx": np.concatenate(idx), "probabilities": np.concatenate(probs)}


def _start(ray, workers):
    """Join ``RAY_ADDRESS``'s cluster or start a local one. Returns (started_here, CPUs)."""
    if ray.is_initialized():
        return False, int(ray.cluster_resources().get("CPU", 1))
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)  # joins the cluster RAY_ADDRESS names
    else:
        ray.init(num_cpus=max(workers or 0, os.cpu_count() or 1), _node_ip_address="127.0.0.1", **kwargs)
    return True, int(ray.cluster_resources().get("CPU", 1))


def ray_probabilities(predictor, texts, batch_size: int, workers: int | None = None) -> np.ndarray:
    """Probabilities ``[len(texts), classes]`` in input order, computed by an actor pool of
    ``workers`` actors (default: one per CPU of the cluster)."""
    from .predict import batch_plan

    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise UsageError(f"--workers must be a positive integer; received {workers!r}")
    ray = _import_ray()
    out = np.zeros((len(texts), len(predictor.labels)), np.float32)
    if not texts:
        return out
    plan = batch_plan(texts, batch_size)
    files = bundle_files(predictor)
    with _quiet_ray():
        return _run(ray, predictor, texts, plan, files, batch_size, workers, out)


def _run(ray, predictor, texts, plan, files, batch_size, workers, out):
    started, cpus = _start(ray, workers)
    try:
        workers = workers or max(1, cpus)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        files_ref = ray.put(files)  # held here until the pool is done
        rows = [{"idx": rows, "text": [texts[i] for i in rows]} for rows in plan]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), workers * BLOCKS_PER_WORKER)))
        # a .repartition() here would need a free CPU for its all-to-all step while every
        # CPU is held by an actor: it never runs. from_items makes the blocks instead.
        # On our own local cluster a lost actor means a crash, not a lost node: fail rather
        # than restart it (Ray's restartable actors also log an error line at start-up about
        # constructor arguments in the object store). A cluster keeps Ray's default.
        # ``max_restarts`` goes through ``**ray_remote_args``, deprecated for Ray 2.64.
        restarts = {"max_restarts": 0} if started else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(BatchPredictor, batch_size=BATCHES_PER_CALL, batch_format="numpy",
                                fn_constructor_args=([files_ref], predictor.runtime, predictor.precision,
                                                     predictor.max_length),
                                compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1, **restarts)
        seen = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            out[batch["idx"]] = batch["probabilities"]
            seen += len(batch["idx"])
    finally:
        if started:
            ray.shutdown()
    if seen != len(texts):
        raise RuntimeError(f"Ray returned {seen} results for {len(texts)} texts")
    return out

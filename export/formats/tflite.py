"""TFLite (LiteRT) conversion: fp32, fp16 weights, dynamic-range int8, full-integer int8.

Conversions run in a child process (``python -m probattn.export.formats.tflite``):
``TFLiteConverter.convert()`` leaks about 20 MB per call on TF 2.20/2.21, and a child
returns all of it to the system when it exits.

Builtin ops only: Select TF (Flex) ops cannot be run by any Python LiteRT interpreter,
so a model that needs them fails with a message naming the ops.

Full-integer recipe (recorded in the manifest): int8 weights and activations, int32
``token_ids`` input, float32 outputs (a dequantize at the end), per-channel dense weights,
calibrated on real training texts at their own lengths in padded batches. The layer's
masking arithmetic (small mask offset, matmul pooling) is what keeps int8 from collapsing.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from probattn.models.errors import UsageError, one_line

from ..contract import INPUT, SUPPORTED, artifact_filename
from . import Built, ExportContext

FORMAT = "tflite"
NEEDS_SAVED_MODEL = True
IN_CHILD = True
TFLITE_PRECISIONS = SUPPORTED[FORMAT]

INT8_RECIPE = {
    "weights": "int8; per channel for dense layers, per tensor for the embedding",
    "activations": "int8",
    "input": "int32 token_ids (not quantized)",
    "outputs": "float32 (dequantized in the graph)",
    "calibration": "training texts at their own lengths, batches of 4 padded to the longest",
    "ops": "TFLITE_BUILTINS_INT8 only",
}


def _flex_ops(message: str) -> list:
    """The op names the converter lists itself ("TF Select ops: StridedSlice, ..."); nothing
    is scraped from the rest of its message (MLIR noise such as tf.entry_function)."""
    listed = re.findall(r"(?:TF Select|Custom) ops:\s*([A-Za-z0-9_, ]+)", message)
    return sorted({x.strip() for group in listed for x in group.split(",") if x.strip()})


def _saved_model_ops(saved_model_dir, prefix: str) -> list:
    """Op types starting with ``prefix`` in a SavedModel's graph and function library."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((Path(saved_model_dir) / "saved_model.pb").read_bytes())
    ops = set()
    for mg in sm.meta_graphs:
        ops.update(n.op for n in mg.graph_def.node)
        for fn in mg.graph_def.library.function:
            ops.update(n.op for n in fn.node_def)
    return sorted(o for o in ops if o.startswith(prefix))


def convert(saved_model_dir: str, precision: str, calibration: list | None = None) -> bytes:
    import tensorflow as tf

    if precision not in TFLITE_PRECISIONS:
        raise UsageError(f"unknown TFLite precision '{precision}'; allowed: {', '.join(TFLITE_PRECISIONS)}")
    conv = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    conv.allow_custom_ops = False
    if precision == "fp16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif precision == "int8-dynamic":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif precision == "int8":
        if not calibration:
            raise UsageError("full-integer int8 needs calibration texts (--calibration-data)")
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]

        def representative():
            for ids in calibration:
                yield {INPUT: np.asarray(ids, dtype=np.int32)}

        conv.representative_dataset = representative
    try:
        return conv.convert()
    except Exception as e:  # ConverterError and friends: report what the converter said
        msg = str(e)
        ops = _flex_ops(msg)
        how = "Rewrite those ops with builtins (e.g. tf.expand_dims instead of x[..., None])"
        if not ops and "tensor list" in msg.lower():  # the converter does not name them
            ops = _saved_model_ops(saved_model_dir, "TensorList") or ["TensorList ops"]
            how = ("They come from a recurrent layer traced with a dynamic shape: rewrite it as a loop "
                   "of builtin ops (probattn does so for LSTM and Bidirectional(LSTM))")
        if ops or "Select TF" in msg or "Flex" in msg or "custom op" in msg.lower():
            raise UsageError(
                f"TFLite {precision}: the model needs ops that are not LiteRT builtins "
                f"({', '.join(ops) or 'the converter did not name them'}); Select TF (Flex) and custom ops "
                f"cannot be run by the Python LiteRT interpreter, so probattn refuses them. {how}"
            ) from None
        raise UsageError(f"TFLite {precision} conversion failed: {one_line(msg)}") from None


def export(ctx: ExportContext, precisions) -> list:
    """Every TFLite precision asked for, converted from ``ctx.saved_model_dir`` in one child."""
    if "int8" in precisions and not ctx.calibration:
        raise UsageError("full-integer int8 needs calibration texts (--calibration-data)")
    results = convert_in_child(ctx.saved_model_dir, ctx.out, list(precisions), ctx.calibration,
                               started=ctx.started, failed=ctx.failed)
    return [Built(FORMAT, r["precision"], r["path"], r["seconds"],
                  {**({"recipe": INT8_RECIPE} if r["precision"] == "int8" else {}), "output_dtype": "float32"})
            for r in results]


def convert_in_child(saved_model_dir, out_dir, precisions, calibration=None, progress=None, started=None,
                     failed=None):
    """Convert each precision in one child process; returns result dicts. A precision that
    fails goes to ``failed(format, precision, reason)`` when given (else it raises)."""
    out_dir = Path(out_dir)
    calib_path = None
    if calibration:
        calib_path = out_dir / ".calibration.npz"
        np.savez(calib_path, *[np.asarray(c, np.int32) for c in calibration])
    cmd = [sys.executable, "-m", "probattn.export.formats.tflite", str(saved_model_dir),
           str(out_dir), ",".join(precisions), str(calib_path or "")]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PROBATTN_PARENT_PID=str(os.getpid()))
    errlog = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty child cannot block on it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errlog, text=True, env=env)
    if started:  # lets the caller stop the conversion (e.g. on Ctrl-C) without waiting for it
        started(proc)
    results = []
    try:
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            res = json.loads(line)
            if "error" in res:
                if failed is None or "precision" not in res:
                    proc.wait()
                    raise UsageError(res["error"])
                failed(FORMAT, res["precision"], res["error"])
                continue
            results.append(res)
            if progress:
                progress(res)
        proc.wait()
        if proc.returncode != 0:
            errlog.seek(0)
            tail = [l for l in errlog.read().splitlines() if l.strip()][-1:] or ["no output"]
            raise UsageError(f"TFLite conversion process failed (exit {proc.returncode}): {one_line(tail[0])}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        errlog.close()
        if calib_path is not None and calib_path.exists():
            calib_path.unlink()
    return results


def _exit_with_parent():
    """A converter whose exporter was killed (SIGKILL runs no cleanup) must not keep writing
    into the dead run's temporary directory while the next export removes it."""
    import threading

    parent = int(os.environ.get("PROBATTN_PARENT_PID") or os.getppid())

    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _child_main(argv):
    _exit_with_parent()
    saved_model_dir, out_dir, precisions, calib = argv
    calibration = None
    if calib:
        with np.load(calib) as z:
            calibration = [z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import warnings

    from probattn.models.quiet import import_tensorflow

    warnings.filterwarnings("ignore")
    import_tensorflow()
    for precision in precisions.split(","):
        t0 = time.perf_counter()
        try:
            blob = convert(saved_model_dir, precision, calibration)
        except UsageError as e:  # this precision fails; the next ones are still tried
            print(json.dumps({"error": str(e), "precision": precision}), flush=True)
            continue
        name = artifact_filename(FORMAT, precision)
        path = Path(out_dir) / name
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)
        print(json.dumps({"precision": precision, "path": name, "seconds": round(time.perf_counter() - t0, 2)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))

"""``probattn export``: one traced signature -> SavedModel, TFLite x4, ONNX x3, in a bundle."""
from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import bundle as B
from . import onnx_export, tflite_export
from .errors import UsageError
from .fsutil import atomic_directory, check_output_dir
from .tokenizer import PAD_ID, UNK_ID, encode, load_tokenizer
from .versions import versions

ALL_FORMATS = ("savedmodel", "tflite", "onnx")
CALIBRATION_BATCH = 4
CALIBRATION_MAX_TEXTS = 400  # training texts used (and kept in a run) for full-int8 calibration


@dataclass
class ExportOptions:
    formats: tuple = ALL_FORMATS
    precisions: tuple = B.PRECISIONS
    opset: int = onnx_export.DEFAULT_OPSET
    calibration_data: str | None = None
    tokenizer: str | None = None
    labels: str | None = None
    max_length: int | None = None
    attention_weights: bool = True
    unsafe: bool = False
    overwrite: bool = False


@dataclass
class Source:
    model_path: Path
    tokenizer_path: Path
    labels: list | None
    max_length: int | None
    test_data: Path | None = None
    calibration: Path | None = None
    extra: dict = field(default_factory=dict)


def parse_list(value, allowed, what) -> tuple:
    items = tuple(x.strip() for x in (value.split(",") if isinstance(value, str) else value) if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise UsageError(f"unknown {what} {', '.join(repr(b) for b in bad) or '(empty)'}; allowed: {', '.join(allowed)}")
    return items


def resolve_source(source, opts: ExportOptions) -> Source:
    source = Path(source)
    if not source.exists():
        raise UsageError(f"source not found: {source} (expected a run directory, a .keras/.h5 file or a SavedModel)")
    if source.is_dir() and (source / "model.keras").is_file():  # a RUN_DIR from `probattn train`
        labels = _read_labels(source / "labels.json")
        cfg = {}
        if (source / "config.json").is_file():
            cfg = json.loads((source / "config.json").read_text())
        tok = Path(opts.tokenizer) if opts.tokenizer else source / "tokenizer.json"
        return Source(source / "model.keras", tok, _read_labels(opts.labels) if opts.labels else labels,
                      opts.max_length or cfg.get("max_length"),
                      source / "test.jsonl" if (source / "test.jsonl").is_file() else None,
                      source / "calibration.jsonl" if (source / "calibration.jsonl").is_file() else None,
                      {"dataset": cfg.get("dataset"), "seed": cfg.get("seed")})
    if source.is_dir() and (source / "metrics.json").is_file():
        raise UsageError(f"run directory {source} has no model.keras (incomplete or damaged run)")
    if not opts.tokenizer:
        raise UsageError(f"{source} is a model, not a run directory: pass --tokenizer tokenizer.json")
    return Source(source, Path(opts.tokenizer), _read_labels(opts.labels) if opts.labels else None,
                  opts.max_length)


def _read_labels(path) -> list:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"labels file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        labels = json.loads(text)
    except json.JSONDecodeError:
        labels = [l.strip() for l in text.splitlines() if l.strip()]
    if not isinstance(labels, list) or not labels:
        raise UsageError(f"{path}: expected a JSON list of label names or one label per line")
    labels = [str(l) for l in labels]
    dupes = sorted({l for l in labels if labels.count(l) > 1})
    if dupes:
        raise UsageError(f"{path}: duplicate label names {dupes}; each class needs its own name")
    return labels


def calibration_batches(texts, tokenizer, max_length) -> list:
    """Real texts at their own lengths, in small batches padded to the longest (padding included)."""
    texts = [t for t in texts if t.strip()][:CALIBRATION_MAX_TEXTS]
    return [encode(tokenizer, texts[i:i + CALIBRATION_BATCH], max_length)
            for i in range(0, len(texts), CALIBRATION_BATCH)]


def _calibration_texts(src: Source, opts: ExportOptions) -> list | None:
    from .data import load_dataset

    path = opts.calibration_data or src.calibration
    if path is None:
        return None
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise UsageError(f"calibration file not found: {path}")
        return [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    if path.suffix.lower() in (".csv", ".jsonl") or path.exists():
        return load_dataset(str(path)).texts
    return load_dataset(str(path), quiet=True).texts  # a bundled dataset name


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def export(source, out, opts: ExportOptions | None = None) -> dict:
    opts = opts or ExportOptions()
    t_start = time.perf_counter()
    formats = parse_list(opts.formats, ALL_FORMATS, "format")
    precisions = parse_list(opts.precisions, B.PRECISIONS, "precision")
    opset = onnx_export.check_opset(opts.opset)
    if not any((f == "savedmodel" and p == "fp32") or f == "tflite"
               or (f == "onnx" and p in onnx_export.ONNX_PRECISIONS) for f in formats for p in precisions):
        raise UsageError(f"--formats {','.join(formats)} with --precisions {','.join(precisions)} selects no "
                         "artifact (SavedModel is fp32 only; ONNX has fp32, fp16, int8; TFLite has all four)")
    check_output_dir(out, opts.overwrite, B.MANIFEST)  # before the slow part, not after it
    src = resolve_source(source, opts)
    tokenizer = load_tokenizer(src.tokenizer_path)
    max_length = src.max_length or (tokenizer.truncation or {}).get("max_length") or 64
    cal_texts = None
    if "tflite" in formats and "int8" in precisions:
        cal_texts = _calibration_texts(src, opts)
        if not cal_texts:
            raise UsageError("full-integer int8 needs calibration texts: pass --calibration-data "
                             "FILE (.csv/.jsonl/.txt) or drop int8 from --precisions")

    from .keras_io import load_keras_model

    model = load_keras_model(src.model_path, unsafe=opts.unsafe)
    log(f"loaded {src.model_path}")  # after: a model that fails to load gives one error line
    from .serving import ATTENTION, PROBABILITIES, serving_module, with_attention_output

    attention = opts.attention_weights and with_attention_output(model) is not None
    module, concrete = serving_module(model, attention=attention)
    out_names = sorted(concrete.structured_outputs.keys())
    n_classes = int(concrete.structured_outputs[PROBABILITIES].shape[-1])
    labels = src.labels or [str(i) for i in range(n_classes)]
    if len(labels) != n_classes:
        raise UsageError(f"{len(labels)} labels given but the model has {n_classes} outputs")
    vocab_size = _vocab_size(model, tokenizer)
    if tokenizer.get_vocab_size() > vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.get_vocab_size()} ids but the model's embedding has "
                         f"{vocab_size} rows: ids the tokenizer makes would be out of range; "
                         "pass the tokenizer the model was trained with")

    artifacts = []
    with atomic_directory(out, overwrite=opts.overwrite, marker=B.MANIFEST) as tmp:
        def record(fmt, precision, rel, seconds, **extra):
            path = tmp / rel
            entry = {"path": rel, "format": fmt, "precision": precision, "bytes": B.size_of(path),
                     "sha256": B.sha256_path(path), "seconds": round(seconds, 2), **extra}
            artifacts.append(entry)
            log(f"  ✓ {fmt:<10} {precision:<12} {entry['bytes'] / 1e6:8.2f} MB  {seconds:6.1f} s  {rel}")

        t = time.perf_counter()
        if src.model_path.suffix == ".keras":
            shutil.copyfile(src.model_path, tmp / "model.keras")
        else:
            model.save(tmp / "model.keras")
        record("keras", "fp32", "model.keras", time.perf_counter() - t)
        shutil.copyfile(src.tokenizer_path, tmp / "tokenizer.json")
        if src.test_data:
            shutil.copyfile(src.test_data, tmp / "test.jsonl")

        import tensorflow as tf

        t = time.perf_counter()
        sm_dir = tmp / "saved_model"
        tf.saved_model.save(module, str(sm_dir), signatures={"serving_default": concrete})
        sm_seconds = time.perf_counter() - t
        tfl_results, tfl_error, tfl_procs = [], [], []
        cancel = threading.Event()
        thread = None
        tfl_precisions = [p for p in precisions if p in tflite_export.TFLITE_PRECISIONS] if "tflite" in formats else []
        if tfl_precisions:
            cal = calibration_batches(cal_texts, tokenizer, max_length) if cal_texts else None

            def started(proc):
                tfl_procs.append(proc)
                if cancel.is_set():  # the export failed or was interrupted while it started
                    proc.kill()

            def run_tflite():
                try:
                    tfl_results.extend(tflite_export.convert_in_child(sm_dir, tmp, tfl_precisions, cal,
                                                                      started=started))
                except BaseException as e:  # re-raised in the main thread
                    tfl_error.append(e)

            thread = threading.Thread(target=run_tflite, daemon=True)
            thread.start()
        try:
            if "onnx" in formats:
                _export_onnx(module, tmp, opset, out_names, precisions, record)
        except BaseException:  # failed or interrupted: stop the converter rather than wait for it
            _stop(cancel, tfl_procs)
            raise
        finally:
            if thread is not None:
                _join(thread, cancel, tfl_procs)
        if tfl_error:
            raise tfl_error[0]
        for res in tfl_results:
            record("tflite", res["precision"], res["path"], res["seconds"],
                   **({"recipe": tflite_export.INT8_RECIPE} if res["precision"] == "int8" else {}),
                   output_dtype="float32")
        if "savedmodel" in formats:
            record("savedmodel", "fp32", "saved_model", sm_seconds, signature="serving_default")
        else:
            shutil.rmtree(sm_dir)
        order = {f: i for i, f in enumerate(B.FORMATS)}
        prec_order = {p: i for i, p in enumerate(B.PRECISIONS)}
        artifacts.sort(key=lambda a: (order[a["format"]], prec_order[a["precision"]]))
        manifest = {
            "schema_version": B.SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": versions(),
            "signature": {
                "inputs": [{"name": "token_ids", "dtype": "int32", "shape": ["batch", "sequence"]}],
                "outputs": [{"name": PROBABILITIES, "dtype": "float32", "shape": ["batch", n_classes]}]
                + ([{"name": ATTENTION, "dtype": "float32", "shape": ["batch", "sequence"]}] if attention else []),
                "savedmodel_signature": "serving_default",
            },
            "labels": labels,
            "pad_id": PAD_ID,
            "unk_id": UNK_ID,
            "vocab_size": vocab_size,
            "max_length": int(max_length),
            "tokenizer": {"path": "tokenizer.json", "sha256": B.sha256_path(tmp / "tokenizer.json")},
            "test_data": "test.jsonl" if src.test_data else None,
            "source": {"model": str(src.model_path), **src.extra},
            "artifacts": artifacts,
            "export_seconds": round(time.perf_counter() - t_start, 1),
            "verdict": None,
        }
        B.write_manifest(tmp, manifest)
    return manifest


def _stop(cancel, procs):
    cancel.set()
    for p in list(procs):
        if p.poll() is None:
            p.kill()


def _join(thread, cancel, procs):
    """Wait for the TFLite thread; Ctrl-C while waiting stops its converter first, so the
    temporary bundle is removed only after nothing writes into it any more."""
    try:
        thread.join()
    except KeyboardInterrupt:
        _stop(cancel, procs)
        thread.join()
        raise


def _export_onnx(module, tmp, opset, out_names, precisions, record):
    t = time.perf_counter()
    fp32 = onnx_export.convert_fp32(module, opset, out_names)
    fp32_path = tmp / B.artifact_filename("onnx", "fp32")
    onnx_export.save_checked(fp32, fp32_path)
    base_seconds = time.perf_counter() - t
    if "fp32" in precisions:
        record("onnx", "fp32", fp32_path.name, base_seconds, opset=opset)
    if "fp16" in precisions:
        t = time.perf_counter()
        path = tmp / B.artifact_filename("onnx", "fp16")
        onnx_export.save_checked(onnx_export.convert_fp16(fp32), path)
        record("onnx", "fp16", path.name, time.perf_counter() - t, opset=opset,
               recipe=onnx_export.FP16_RECIPE)
    if "int8" in precisions:
        t = time.perf_counter()
        path = tmp / B.artifact_filename("onnx", "int8")
        onnx_export.convert_int8(fp32_path, path)
        onnx_export.check(path)
        record("onnx", "int8", path.name, time.perf_counter() - t, opset=opset,
               recipe=onnx_export.INT8_RECIPE, quantization="dynamic")
    if "fp32" not in precisions:
        fp32_path.unlink()


def _vocab_size(model, tokenizer) -> int:
    import tf_keras as keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.Embedding):
            return int(layer.input_dim)
    return tokenizer.get_vocab_size()


def summary_table(manifest) -> str:
    rows = ["| artifact | format | precision | size | % of fp32 | time |", "|---|---|---|---|---|---|"]
    fp32 = {a["format"]: a["bytes"] for a in manifest["artifacts"] if a["precision"] == "fp32"}
    for a in manifest["artifacts"]:
        base = fp32.get(a["format"])
        pct = f"{100 * a['bytes'] / base:.0f}%" if base else "-"
        rows.append(f"| {a['path']} | {a['format']} | {a['precision']} | {a['bytes'] / 1e6:.2f} MB | {pct} | {a['seconds']:.1f} s |")
    return "\n".join(rows)

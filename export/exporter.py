"""``probattn export``: orchestration only. Resolve the source, load the model, trace the
serving function once, run each format's exporter (``probattn.export.formats``), and
write the manifest, all inside an atomic output directory."""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from probattn.models.errors import UsageError
from probattn.models.termination import checkpoint
from probattn.models.fsutil import atomic_directory, check_not_in_use, check_output_dir, hash_tree, read_regular
from probattn.models.text.tokenizer import (KIND_PORTABLE, PAD_ID, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, UNK_ID,
                                            kind_of, load_tokenizer, regex_spec, write_tokenizer_config)

from . import bundle as B
from . import contract as C
from . import formats
from .calibration import calibration_batches, calibration_fixed
from .formats.onnx import DEFAULT_OPSET, check_opset
from .versions import versions


@dataclass
class ExportOptions:
    #: None: ``contract.DEFAULT_EXPORT_FORMATS`` (plus ``mediapipe`` for a regex tokenizer),
    #: and one that cannot be built is left out and reported; a selection (``--formats``) is
    #: a request: an artifact of it that cannot be built fails
    formats: tuple | None = None
    precisions: tuple | None = None  # as ``formats``, for ``--precisions``
    opset: int = DEFAULT_OPSET
    calibration_data: str | None = None
    tokenizer: str | None = None
    labels: str | None = None
    max_length: int | None = None
    attention_weights: bool = True
    #: also write each ONNX precision with an int64 ``token_ids`` input (what Hugging Face
    #: clients such as transformers.js send)
    onnx_int64: bool = True
    unsafe: bool = False
    overwrite: bool = False
    custom_objects: str | None = None  # the user's FILE.py with their classes (runs their code)
    #: also write C sources (model, vocabulary, labels) of the fixed-shape int8 model
    c_array: bool = False
    #: the float artifacts (SavedModel, ONNX, TFLite fp32/fp16) take ProbAttention's float
    #: math (``signature.float_trace_for``); False: every artifact takes the int8-safe graph
    float_graph: bool = True


@dataclass
class Source:
    model_path: Path
    tokenizer_path: Path | None
    labels: list | None
    max_length: int | None
    test_data: Path | None = None
    calibration: Path | None = None
    extra: dict = field(default_factory=dict)


def resolve_source(source, opts: ExportOptions) -> Source:
    source = Path(source)
    if not source.exists():
        raise UsageError(f"source not found: {source} (expected a run directory, a .keras/.h5 file or a SavedModel)")
    if source.is_dir() and (source / "model.keras").is_file():  # a RUN_DIR from `probattn train`
        labels = _read_labels(source / "labels.json")
        cfg = {}
        if (source / "config.json").is_file():
            try:
                cfg = json.loads(read_regular(source / "config.json", 1 << 20, what="run config"))
            except ValueError:
                raise UsageError(f"{source / 'config.json'} is not valid JSON") from None
            if not isinstance(cfg, dict):
                raise UsageError(f"{source / 'config.json'}: expected a JSON object")
        tok = Path(opts.tokenizer) if opts.tokenizer else source / "tokenizer.json"
        return Source(source / "model.keras", tok, _read_labels(opts.labels) if opts.labels else labels,
                      opts.max_length or cfg.get("max_length"),
                      source / "test.jsonl" if (source / "test.jsonl").is_file() else None,
                      source / "calibration.jsonl" if (source / "calibration.jsonl").is_file() else None,
                      {"dataset": cfg.get("dataset"), "seed": cfg.get("seed"), "architecture": cfg.get("model")})
    if source.is_dir() and (source / "metrics.json").is_file():
        raise UsageError(f"run directory {source} has no model.keras (incomplete or damaged run)")
    return Source(source, Path(opts.tokenizer) if opts.tokenizer else None,
                  _read_labels(opts.labels) if opts.labels else None, opts.max_length)


def _read_labels(path) -> list:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"labels file not found: {path}")
    try:
        text = read_regular(path, 4 << 20, what="labels file").decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not valid UTF-8") from None
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


def selected_formats(opts: ExportOptions, tokenizer) -> tuple:
    """``--formats``, or the default: every format but ``mediapipe``, which joins when the
    tokenizer is MediaPipe's regex tokenizer."""
    if opts.formats is not None:
        return C.parse_list(opts.formats, C.EXPORT_FORMATS, "format")
    extra = ("mediapipe",) if regex_spec(tokenizer) is not None else ()
    return tuple(f for f in C.EXPORT_FORMATS if f in C.DEFAULT_EXPORT_FORMATS + extra)


def plain_files(tmp: Path, tokenizer, labels) -> dict:
    """``labels.txt`` and ``vocab.txt`` (one entry per line, in id order), hashed."""
    from probattn.models.text.tokenizer import vocabulary

    files = {}
    for key, name, lines in (("labels", C.LABELS_FILE, labels), ("vocabulary", C.VOCAB_FILE, vocabulary(tokenizer))):
        bad = [i for i, x in enumerate(lines) if not x or any(c in x for c in "\r\n\x85\u2028\u2029\x0b\x0c\x1c\x1d\x1e")]
        if bad:
            raise UsageError(f"{name}: entry {bad[0]} ({lines[bad[0]]!r}) is empty or holds a line break; "
                             "a one-per-line file cannot hold it")
        (tmp / name).write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")
        files[key] = {"path": name, "sha256": B.sha256_path(tmp / name), "entries": len(lines)}
    return files


def _calibration_texts(src: Source, opts: ExportOptions) -> list | None:
    from probattn.models.text.data import load_dataset

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


def label_count(head) -> int:
    """How many label names a head has: a single-unit head decides between two."""
    return 2 if head.units == 1 else head.units


def _labels_for(serving, given) -> list:
    primary = serving.heads[0]
    n = label_count(primary)
    labels = given or [str(i) for i in range(n)]
    if len(labels) != n:
        what = (f"a single {primary.kind} unit (two labels: negative, positive)" if primary.units == 1
                else f"{n} {primary.kind} outputs")
        raise UsageError(f"{len(labels)} labels given but the model's first output has {what}")
    for h in serving.heads:
        h.labels = labels if h is primary else [str(i) for i in range(label_count(h))]
    return labels


def export(source, out, opts: ExportOptions | None = None) -> dict:
    """Export ``source`` into the bundle folder ``out`` (atomically). A termination signal
    (Ctrl-C, SIGTERM) during the TensorFlow work is raised at the next checkpoint, not in
    the middle of a graph being built (``termination.deferred``): before each artifact is
    recorded and before the bundle is committed; nothing is written then."""
    from probattn.models.termination import deferred

    with deferred(raise_at_end=False):  # once committed, the bundle stands
        return _export(source, out, opts)


def _export(source, out, opts: ExportOptions | None = None) -> dict:
    opts = opts or ExportOptions()
    t_start = time.perf_counter()
    # the formats a selection can hold at most (the default adds mediapipe only for a regex
    # tokenizer, known once the tokenizer is): checked before the slow part
    possible = C.parse_list(opts.formats if opts.formats is not None else C.EXPORT_FORMATS, C.EXPORT_FORMATS,
                            "format")
    precisions = C.parse_list(opts.precisions or C.PRECISIONS, C.PRECISIONS, "precision")
    opset = check_opset(opts.opset)
    if C.selection_is_empty(possible, precisions):
        raise UsageError(f"--formats {','.join(possible)} with --precisions {','.join(precisions)} selects no "
                         "artifact (" + "; ".join(f"{f} has {', '.join(C.SUPPORTED[f])}" for f in C.EXPORT_FORMATS) + ")")
    if opts.c_array and not ("tflite-fixed" in possible and "int8" in precisions):
        raise UsageError("--c-array embeds the fixed-shape int8 model: keep tflite-fixed in --formats and int8 "
                         "in --precisions")
    check_output_dir(out, opts.overwrite, "bundle")  # before the slow part, not after it
    check_not_in_use(out)
    src = resolve_source(source, opts)
    notes = []
    if src.tokenizer_path is not None:  # a bad tokenizer file fails before the model loads
        from probattn.models.text.tokenizer_guard import MAX_TOKENIZER_BYTES

        tokenizer_json = read_regular(src.tokenizer_path, MAX_TOKENIZER_BYTES, what="tokenizer file")
        load_tokenizer(tokenizer_json, notes=notes)  # padding off, the file's own truncation
    cal_texts = None
    if any(f in possible for f in C.TFLITE_FORMATS) and "int8" in precisions:
        cal_texts = _calibration_texts(src, opts)  # bad calibration data fails before the model loads

    from .adapt import adapt
    from .loading import load_model, vocab_size_of
    from .signature import apply_rewrites, float_trace_for, probe_ids, serving_for, trace

    loaded = load_model(src.model_path, unsafe=opts.unsafe, custom_objects=opts.custom_objects)
    log(f"loaded {src.model_path} ({loaded.info.describe()})")  # after: a failed load gives one error line
    adapted = None
    if loaded.keras_model is not None:
        adapted = _adapt(loaded, adapt, probe_ids)
        loaded.keras_model = adapted.model
        for note in adapted.notes:
            log(f"  adapted: {note['what']}")
    if adapted is not None and adapted.tokenizer is not None:
        if src.tokenizer_path is not None:
            raise UsageError("the model carries its own TextVectorization vocabulary, which becomes tokenizer.json; "
                             "drop --tokenizer")
        tokenizer_json = adapted.tokenizer.to_str().encode("utf-8")
    elif src.tokenizer_path is None:
        raise UsageError(f"{src.model_path} is a model, not a run directory: pass --tokenizer tokenizer.json")
    tokenizer = load_tokenizer(tokenizer_json, notes=notes)  # checked by the tokenizer guard
    selected = selected_formats(opts, tokenizer)
    if "mediapipe" in selected:
        from .formats.mediapipe import require_regex_tokenizer

        require_regex_tokenizer(tokenizer)
    requested = _requested(opts, selected, precisions)
    model = loaded.keras_model
    vocab_size = (vocab_size_of(model) if model is not None else None) or tokenizer.get_vocab_size()
    if tokenizer.get_vocab_size() > vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.get_vocab_size()} ids but the model's embedding has "
                         f"{vocab_size} rows: ids the tokenizer makes would be out of range; "
                         "pass the tokenizer the model was trained with")
    serving = serving_for(loaded, opts.attention_weights, vocab_size)
    labels = _labels_for(serving, src.labels)
    fixed = serving.fixed_length
    max_length = fixed or src.max_length or (tokenizer.truncation or {}).get("max_length") or 64
    if fixed and src.max_length and src.max_length != fixed:
        log(f"  note: the model's input has a fixed length of {fixed}; texts are cut to {fixed} tokens")
    if fixed:
        log(f"  fixed input length {fixed}: every artifact takes token_ids [batch, {fixed}]")
    from probattn.models.text.tokenizer import MAX_LENGTH_LIMIT

    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= MAX_LENGTH_LIMIT:
        raise UsageError(f"max length {max_length!r} is out of range; allowed: 1 to {MAX_LENGTH_LIMIT:,}")
    tokenizer = load_tokenizer(tokenizer_json, max_length=max_length, notes=notes)
    for note in dict.fromkeys(notes):
        log(f"note: {note}")
    #: the first output's width: what the readers check each artifact's output against
    n_classes = serving.heads[0].units
    diagnosis = _diagnose(loaded, serving, tokenizer, src)
    rewrites = apply_rewrites(serving)
    for r in rewrites:
        log(f"  rewrite for builtin ops: {r}")
    module, concrete = trace(serving)
    out_names = C.ordered_outputs(concrete.structured_outputs.keys())
    # the fixed-shape formats hold one text of the model's own length when its input has one
    # (then max_length is that length), else of the training max length; the one rule for
    # every artifact's input_shape is contract.artifact_input_shape
    device_length = int(max_length)
    traces = {  # the same serving function, traced again for the fixed-shape formats
        "dynamic-int8": lambda: int8_trace,
        "fixed": lambda: trace(serving, batch=1, length=device_length),
        "fixed-probabilities": lambda: trace(serving, batch=1, length=device_length, outputs=C.MEDIAPIPE_OUTPUTS),
    }

    left_out = []
    wanted = {f: [p for p in precisions if p in C.SUPPORTED[f]] for f in selected}
    for f in C.TFLITE_FORMATS:
        if "int8" in wanted.get(f, []) and not cal_texts:
            wanted[f].remove("int8")
            left_out.append({"format": f, "precision": "int8",
                             "reason": "full-integer int8 needs calibration texts: pass --calibration-data "
                                       "FILE (.csv/.jsonl/.txt) or drop int8 from --precisions"})

    int8_trace = None
    if opts.float_graph and any(trace_kind(f, p, int8_apart=True) == "dynamic" for f, ps in wanted.items() for p in ps):
        lean = float_trace_for(serving, module, concrete)
        if lean is not None:  # the float artifacts take it; full int8 keeps the int8-safe graph
            int8_trace = (module, concrete)
            module, concrete = lean
            counts = module.float_trace
            rewrites.append("float_graph")
            log(f"  float graph: {counts['pooled']} ProbAttention call{'s' if counts['pooled'] > 1 else ''} "
                "with one pooling matmul" + (f", {counts['tables']} scoring from a precomputed table of token "
                                              "scores" if counts["tables"] else "")
                + "; full-integer int8 keeps the int8-safe graph")

    def input_shape(fmt):
        return C.artifact_input_shape(fmt, fixed, device_length)

    artifacts = []
    with atomic_directory(out, overwrite=opts.overwrite, kind="bundle") as tmp:
        def record(built: formats.Built):
            checkpoint()  # a termination signal that arrived meanwhile: stop here, nothing is written
            path = tmp / built.path
            entry = {"path": built.path, "format": built.format, "precision": built.precision,
                     "bytes": B.size_of(path), "sha256": B.sha256_path(path),
                     "seconds": round(built.seconds, 2), **built.extra}
            shape = input_shape(built.format)
            if shape is not None and entry.setdefault("input_shape", shape) != shape:
                raise UsageError(f"{built.path}: input shape {entry['input_shape']}, expected {shape}")
            if any(C.artifact_key(a) == C.artifact_key(entry) for a in artifacts):
                raise UsageError(f"two artifacts are {C.artifact_key(entry)}; manifest entries must be unique")
            entry.update(audit_built(path, built, vocab_size, n_classes, max_length, opts.unsafe, entry, labels, tokenizer))
            artifacts.append(entry)
            targets = f"  targets: {', '.join(entry['targets']) or 'none'}" if "targets" in entry else ""
            log(f"  ✓ {built.format:<12} {built.precision:<12} {entry['bytes'] / 1e6:8.2f} MB  "
                f"{built.seconds:6.1f} s  {built.path}{targets}")

        t = time.perf_counter()
        keras_rel = _write_reference(loaded, adapted, tmp)
        record(formats.Built("keras", "fp32", keras_rel, time.perf_counter() - t,
                             {"source_kind": loaded.info.savedmodel_kind or loaded.info.kind,
                              "flavour": loaded.flavour}))
        custom_record = None
        if loaded.custom is not None:
            custom_record = loaded.custom.record()
            (tmp / C.CUSTOM_OBJECTS_DIR).mkdir()
            shutil.copyfile(loaded.custom.path, tmp / C.CUSTOM_OBJECTS_DIR / loaded.custom.path.name)
            custom_record["path"] = f"{C.CUSTOM_OBJECTS_DIR}/{loaded.custom.path.name}"
            custom_record["sha256"] = B.sha256_path(tmp / custom_record["path"])
        from probattn.models.text.tokenizer_guard import sanitize

        # the bundle's tokenizer: the user's, with padding off and truncation at max_length
        safe, _ = sanitize(tokenizer_json, max_length=max_length, vocab_size=vocab_size)
        (tmp / TOKENIZER_FILE).write_text(safe, encoding="utf-8")
        tok_entry = {"path": TOKENIZER_FILE, "sha256": B.sha256_path(tmp / TOKENIZER_FILE),
                     "kind": kind_of(tokenizer)}
        if tok_entry["kind"] == KIND_PORTABLE:  # JavaScript clients need it (and give our ids only then)
            write_tokenizer_config(tmp, max_length)
            tok_entry["config"] = {"path": TOKENIZER_CONFIG_FILE,
                                   "sha256": B.sha256_path(tmp / TOKENIZER_CONFIG_FILE)}
        if src.test_data:
            shutil.copyfile(src.test_data, tmp / "test.jsonl")
        files = plain_files(tmp, tokenizer, labels)

        ctx = formats.ExportContext(
            out=tmp, module=module, concrete=concrete, output_names=out_names, opset=opset,
            onnx_int64=opts.onnx_int64,
            calibration=calibration_batches(cal_texts, tokenizer, int(max_length), fixed_length=fixed)
            if cal_texts else None,
            calibration_fixed=calibration_fixed(cal_texts, tokenizer, device_length, int(max_length))
            if cal_texts else None,
            max_length=device_length, labels=labels, tokenizer=tokenizer,
            log=log, fixed_length=fixed, input_dtype=serving.input_dtype,
            head_units={h.output: h.units for h in serving.heads})
        built, failed = _run_formats(ctx, {f: ps for f, ps in wanted.items() if ps}, traces)
        left_out.extend(failed)
        from .runcheck import check_artifacts

        t = time.perf_counter()
        entries = [{"path": b.path, "format": b.format, "precision": b.precision, **b.extra,
                    **({"input_shape": input_shape(b.format)} if input_shape(b.format) else {})} for b in built]
        log(f"  checking that each of the {len(entries)} artifacts runs on every runtime it is made for ...")
        broken = check_artifacts(tmp, entries, vocab_size, out_names, log=log)
        run_check_seconds = time.perf_counter() - t
        for b in built:
            if b.path in broken:
                left_out.append({"format": b.format, "precision": b.precision, "reason": broken[b.path]})
                target = tmp / b.path
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            else:
                record(b)
        _refuse_requested(left_out, requested)
        if not [a for a in artifacts if a["format"] != "keras"]:
            raise UsageError("no artifact could be built: " + "; ".join(
                f"{x['format']} {x['precision']}: {x['reason']}" for x in left_out))
        for x in left_out:
            log(f"  left out {x['format']} {x['precision']}: {x['reason']}")
        artifacts.sort(key=C.entry_sort_key)
        if opts.c_array:
            from .c_array import write_c_sources

            fixed_int8 = B.find_artifact({"artifacts": artifacts}, "tflite-fixed", "int8")
            if fixed_int8 is None:
                raise UsageError("--c-array embeds the fixed-shape int8 model, which was left out: " + "; ".join(
                    x["reason"] for x in left_out if (x["format"], x["precision"]) == ("tflite-fixed", "int8")))
            files["c_array"] = write_c_sources(tmp, fixed_int8, tokenizer, labels)
        manifest = {
            "schema_version": B.SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": versions(),
            "signature": C.signature(serving.heads[0].units, serving.attention, fixed,
                                     [h.as_dict() for h in serving.heads]),
            "heads": [h.as_dict() for h in serving.heads],
            "labels": labels,
            "pad_id": PAD_ID,
            "unk_id": UNK_ID,
            "vocab_size": vocab_size,
            "max_length": int(max_length),
            "tokenizer": tok_entry,
            "files": files,
            "test_data": "test.jsonl" if src.test_data else None,
            "source": {"model": str(src.model_path), "kind": loaded.info.savedmodel_kind or loaded.info.kind,
                       "keras": loaded.flavour, "keras_version": loaded.info.keras_version,
                       "custom_objects": custom_record, **src.extra},
            "model_input": {"dtype": serving.input_dtype, "fixed_length": fixed,
                            "cast": serving.input_dtype != "int32"},
            "adaptations": adapted.notes if adapted is not None else [],
            "rewrites": rewrites,
            "diagnosis": diagnosis,
            "left_out": left_out,
            "artifacts": artifacts,
            "run_check_seconds": round(run_check_seconds, 1),
            # every file of the bundle and its hash (SavedModel variables included)
            "contents": hash_tree(tmp, what="bundle", skip=B.OWN_ENTRIES),
            "export_seconds": round(time.perf_counter() - t_start, 1),
            "verdict": None,
        }
        B.validate_manifest(manifest, "the manifest being written")
        B.write_manifest(tmp, manifest)
        checkpoint()  # the last moment a termination signal leaves nothing written
    return manifest


def audit_built(path: Path, built, vocab_size: int, n_classes: int, max_length: int, unsafe: bool,
                entry: dict | None = None, labels=None, tokenizer=None) -> dict:
    """The checks predict, verify and bench run on an artifact, run on what export just
    built, so a bundle never ships what its readers would refuse. Returns what goes into the
    manifest entry (an ONNX file's I/O signature and ops)."""
    if built.format in C.TFLITE_FORMATS and entry is not None:
        from probattn.models.text.tokenizer import vocabulary

        from .audit import tflite as tflite_audit

        tflite_audit.audit(read_regular(path, tflite_audit.MAX_FILE_BYTES, what="TFLite model"), entry,
                           labels=labels, vocabulary=vocabulary(tokenizer) if tokenizer is not None else None,
                           what=f"the exported {built.path}")
        return {}
    if built.format == "savedmodel":
        from .audit import savedmodel

        savedmodel.audit(path, unsafe=unsafe, what="the exported SavedModel")
        return {}
    if built.format != "onnx":
        return {}
    from .audit import onnx as onnx_audit

    data = read_regular(path, onnx_audit.MAX_FILE_BYTES, what="ONNX model")
    what = f"the exported {built.path}"
    report = onnx_audit.audit(data, what=what, model_dir=path.parent, vocab_size=vocab_size, n_classes=n_classes)
    problem = onnx_audit.precision_problem(report, built.precision)
    if problem:
        raise UsageError(f"{what} is listed as {built.precision} but {problem}")
    from .limits import shape_caps

    biggest = onnx_audit.shape_check(data, shape_caps(max_length), what)
    return {"io": {"inputs": report["inputs"], "outputs": report["outputs"]}, "ops": report["ops"],
            "largest_static_values": biggest}


def _requested(opts: ExportOptions, selected, precisions) -> set:
    """The (format, precision) pairs the user asked for by name: a selection given with
    ``--formats`` or ``--precisions`` (the defaults ask for nothing in particular), and the
    fixed-shape int8 model that ``--c-array`` embeds."""
    asked = {("tflite-fixed", "int8")} if opts.c_array else set()
    if opts.formats is None and opts.precisions is None:
        return asked
    return asked | {(f, p) for f in selected for p in precisions if p in C.SUPPORTED[f]}



def _refuse_requested(left_out, requested) -> None:
    asked = [x for x in left_out if (x["format"], x["precision"]) in requested]
    if asked:
        raise UsageError("; ".join(f"{x['format']} {x['precision']} was asked for but {x['reason']}"
                                   for x in asked) + _way_out(asked))


def _way_out(asked) -> str:
    formats = sorted({x["format"] for x in asked})
    others = [f for f in C.EXPORT_FORMATS if f not in formats]
    return (f". Without --formats/--precisions probattn leaves out what cannot be built and ships the rest "
            f"(or pass --formats {','.join(others)})" if others else "")


def _adapt(loaded, adapt, probe_ids):
    from probattn.models.keras_compat import get_keras

    keras = get_keras(loaded.flavour)
    objects = loaded.custom.objects if loaded.custom is not None else {}
    with keras.utils.custom_object_scope(objects):
        return adapt(loaded.keras_model, probe_ids)


def _write_reference(loaded, adapted, tmp: Path) -> str:
    """The bundle's reference: the user's own file, copied as is, or the adapted model."""
    if adapted is not None and adapted.changed:
        rel = C.REFERENCE_FILES["keras"]
        adapted.model.save(tmp / rel)
        return rel
    kind = loaded.info.kind
    rel = C.REFERENCE_FILES[kind]
    if loaded.path.is_dir():
        shutil.copytree(loaded.path, tmp / rel)
    else:
        shutil.copyfile(loaded.path, tmp / rel)
    return rel


def _diagnose(loaded, serving, tokenizer, src) -> dict | None:
    """What the Keras model itself does with padding (``probattn.export.diagnosis``)."""
    try:
        from .diagnosis import diagnose_serving
    except ImportError:
        return None
    texts = None
    if src.test_data is not None:
        from probattn.models.text.data import load_text_file

        texts = load_text_file(src.test_data).texts[:64]
    result = diagnose_serving(serving, tokenizer=tokenizer, texts=texts)
    for line in result.get("findings_text", []):
        log(f"  model diagnosis: {line}")
    return result


def trace_kind(fmt: str, precision: str, int8_apart: bool) -> str:
    """The trace an artifact is built from: its format's ``SAVED_MODEL`` (``"dynamic"`` for
    the formats that take the traced function itself: SavedModel, ONNX), or, when full int8
    is traced apart from the float graph (``int8_apart``), the format's ``INT8_SAVED_MODEL``
    for its full-int8 files. An artifact of ``"dynamic"`` is one the float graph serves."""
    module = formats.get(fmt)
    if int8_apart and precision == "int8" and getattr(module, "INT8_SAVED_MODEL", None):
        return module.INT8_SAVED_MODEL
    return getattr(module, "SAVED_MODEL", "dynamic")


#: the traces of the serving function a format can convert from (``SAVED_MODEL``, and
#: ``INT8_SAVED_MODEL`` for its full-int8 files when the float artifacts take the float graph)
SAVED_MODEL_KINDS = ("dynamic", "dynamic-int8", "fixed", "fixed-probabilities")


def _run_formats(ctx: formats.ExportContext, wanted: dict, traces: dict):
    """Run each format's exporter for its wanted precisions; returns ``(built, failed)``. A
    format or precision that cannot be built is reported in ``failed`` (with the reason)
    without stopping the others. The SavedModels the converters need are written first (the
    dynamic one in the bundle when ``savedmodel`` was asked for, the rest in scratch
    folders); the other formats (ONNX) are built, then every TFLite conversion runs in this
    process (one TensorFlow, already loaded), and each TFLite-family format finishes its
    files (metadata, measured targets)."""
    modules = {f: formats.get(f) for f in wanted}
    from .formats import savedmodel, tflite

    failed = []

    def fail(fmt, precision, reason):
        failed.append({"format": fmt, "precision": precision, "reason": reason})

    def fail_format(f, reason):
        for p in wanted[f]:
            fail(f, p, reason)

    ctx.failed = fail
    scratch = []
    int8_apart = traces["dynamic-int8"]() is not None

    def kinds_of(f):  # the SavedModels a format converts from: one per trace its precisions take
        if not modules[f].NEEDS_SAVED_MODEL:
            return set()
        return {trace_kind(f, p, int8_apart) for p in wanted[f]}

    kinds = set().union(*(kinds_of(f) for f in wanted))
    for kind in (k for k in SAVED_MODEL_KINDS if k in kinds):
        if kind == "dynamic" and "savedmodel" in wanted:
            path = ctx.out / C.artifact_filename("savedmodel", "fp32")
        else:
            path = ctx.out / f".saved_model_{kind.replace('-', '_')}_for_conversion"
            scratch.append(path)
        users = [f for f in wanted if kind in kinds_of(f)]
        try:
            if kind == "dynamic":
                ctx.saved_model_dir = path
                ctx.saved_model_seconds = savedmodel.save(ctx, path)
            else:
                savedmodel.save(ctx, path, *traces[kind]())
        except UsageError as e:  # the formats converting from this trace fail; the others go on
            for f in users + (["savedmodel"] if kind == "dynamic" and "savedmodel" in wanted else []):
                fail_format(f, str(e))
            wanted = {f: ps for f, ps in wanted.items()
                      if f not in users and not (kind == "dynamic" and f == "savedmodel")}
            continue
        ctx.saved_models[kind] = path

    converted = []  # the TFLite-family formats, converted in one go
    jobs = []
    for f, ps in wanted.items():
        if modules[f].TFLITE_JOBS:
            try:
                jobs.extend(modules[f].conversions(ctx, ps))
                converted.append(f)
            except UsageError as e:
                fail_format(f, str(e))
    built = []
    for f, ps in wanted.items():
        if modules[f].TFLITE_JOBS:
            continue
        try:
            got = modules[f].export(ctx, ps)
        except UsageError as e:  # the whole format failed
            fail_format(f, str(e))
            continue
        built.extend(got)
    results = []
    if jobs:
        ctx.log(f"  converting {len(jobs)} TFLite file{'s' if len(jobs) > 1 else ''} ...")
        try:
            results = tflite.convert_jobs(ctx, jobs)
        except UsageError as e:  # the conversions as a whole failed: every job did
            for f in converted:
                fail_format(f, str(e))
    for f in converted:
        mine = [r for r in results if r["format"] == f]
        try:
            built.extend(modules[f].finish(ctx, mine))
        except UsageError as e:  # the files of this format are not what they must be
            for r in mine:
                fail(f, r["precision"], str(e))
                target = ctx.out / r["path"]
                if target.exists():
                    target.unlink()
    for path in scratch:
        if path.exists():
            shutil.rmtree(path)
    return built, failed


def summary_table(manifest) -> str:
    rows = ["| artifact | format | precision | size | % of fp32 | time |", "|---|---|---|---|---|---|"]
    fp32 = {a["format"]: a["bytes"] for a in manifest["artifacts"] if a["precision"] == "fp32"}
    for a in manifest["artifacts"]:
        base = fp32.get(a["format"])
        pct = f"{100 * a['bytes'] / base:.0f}%" if base else "-"
        rows.append(f"| {a['path']} | {a['format']} | {a['precision']} | {a['bytes'] / 1e6:.2f} MB | {pct} | {a['seconds']:.1f} s |")
    return "\n".join(rows)

"""``probattn export``: orchestration only. Resolve the source, load the model, trace the
serving function once, run each format's exporter (``probattn.export.formats``), and
write the manifest, all inside an atomic output directory."""
from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from probattn.models.errors import UsageError
from probattn.models.fsutil import atomic_directory, check_not_in_use, check_output_dir, hash_tree, read_regular
from probattn.models.text.tokenizer import PAD_ID, UNK_ID, load_tokenizer

from . import bundle as B
from . import contract as C
from . import formats
from .calibration import calibration_batches
from .formats.onnx import DEFAULT_OPSET, check_opset
from .versions import versions


@dataclass
class ExportOptions:
    formats: tuple = C.EXPORT_FORMATS
    precisions: tuple = C.PRECISIONS
    opset: int = DEFAULT_OPSET
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


def export(source, out, opts: ExportOptions | None = None) -> dict:
    opts = opts or ExportOptions()
    t_start = time.perf_counter()
    selected = C.parse_list(opts.formats, C.EXPORT_FORMATS, "format")
    precisions = C.parse_list(opts.precisions, C.PRECISIONS, "precision")
    opset = check_opset(opts.opset)
    if C.selection_is_empty(selected, precisions):
        raise UsageError(f"--formats {','.join(selected)} with --precisions {','.join(precisions)} selects no "
                         "artifact (" + "; ".join(f"{f} has {', '.join(C.SUPPORTED[f])}" for f in C.EXPORT_FORMATS) + ")")
    check_output_dir(out, opts.overwrite, "bundle")  # before the slow part, not after it
    check_not_in_use(out)
    src = resolve_source(source, opts)
    notes = []
    tokenizer = load_tokenizer(src.tokenizer_path, notes=notes)  # padding off, the file's own truncation
    max_length = src.max_length or (tokenizer.truncation or {}).get("max_length") or 64
    from probattn.models.text.tokenizer import MAX_LENGTH_LIMIT

    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= MAX_LENGTH_LIMIT:
        raise UsageError(f"max length {max_length!r} is out of range; allowed: 1 to {MAX_LENGTH_LIMIT:,}")
    tokenizer = load_tokenizer(src.tokenizer_path, max_length=max_length, notes=notes)
    for note in dict.fromkeys(notes):
        log(f"note: {note}")
    cal_texts = None
    if "tflite" in selected and "int8" in precisions:
        cal_texts = _calibration_texts(src, opts)
        if not cal_texts:
            raise UsageError("full-integer int8 needs calibration texts: pass --calibration-data "
                             "FILE (.csv/.jsonl/.txt) or drop int8 from --precisions")

    from .loading import load_keras_model, vocab_size_of

    model = load_keras_model(src.model_path, unsafe=opts.unsafe)
    log(f"loaded {src.model_path}")  # after: a model that fails to load gives one error line
    from .signature import serving_module, with_attention_output

    attention = opts.attention_weights and with_attention_output(model) is not None
    module, concrete = serving_module(model, attention=attention)
    out_names = C.ordered_outputs(concrete.structured_outputs.keys())
    n_classes = int(concrete.structured_outputs[C.PROBABILITIES].shape[-1])
    labels = src.labels or [str(i) for i in range(n_classes)]
    if len(labels) != n_classes:
        raise UsageError(f"{len(labels)} labels given but the model has {n_classes} outputs")
    vocab_size = vocab_size_of(model) or tokenizer.get_vocab_size()
    if tokenizer.get_vocab_size() > vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.get_vocab_size()} ids but the model's embedding has "
                         f"{vocab_size} rows: ids the tokenizer makes would be out of range; "
                         "pass the tokenizer the model was trained with")

    artifacts = []
    with atomic_directory(out, overwrite=opts.overwrite, kind="bundle") as tmp:
        def record(built: formats.Built):
            path = tmp / built.path
            entry = {"path": built.path, "format": built.format, "precision": built.precision,
                     "bytes": B.size_of(path), "sha256": B.sha256_path(path),
                     "seconds": round(built.seconds, 2), **built.extra}
            entry.update(audit_built(path, built, vocab_size, n_classes, max_length, opts.unsafe))
            artifacts.append(entry)
            log(f"  ✓ {built.format:<10} {built.precision:<12} {entry['bytes'] / 1e6:8.2f} MB  "
                f"{built.seconds:6.1f} s  {built.path}")

        t = time.perf_counter()
        keras_rel = C.artifact_filename("keras", "fp32")
        if src.model_path.suffix == ".keras":
            shutil.copyfile(src.model_path, tmp / keras_rel)
        else:
            model.save(tmp / keras_rel)
        record(formats.Built("keras", "fp32", keras_rel, time.perf_counter() - t))
        from probattn.models.text.tokenizer_guard import MAX_TOKENIZER_BYTES, sanitize

        # the bundle's tokenizer: the user's, with padding off and truncation at max_length
        safe, _ = sanitize(read_regular(src.tokenizer_path, MAX_TOKENIZER_BYTES, what="tokenizer file"),
                           max_length=max_length, vocab_size=vocab_size)
        (tmp / "tokenizer.json").write_text(safe, encoding="utf-8")
        if src.test_data:
            shutil.copyfile(src.test_data, tmp / "test.jsonl")

        ctx = formats.ExportContext(
            out=tmp, module=module, concrete=concrete, output_names=out_names, opset=opset,
            calibration=calibration_batches(cal_texts, tokenizer, max_length) if cal_texts else None,
            log=log)
        for built in _run_formats(ctx, selected, precisions):
            record(built)
        artifacts.sort(key=lambda a: C.sort_key(a["format"], a["precision"]))
        manifest = {
            "schema_version": B.SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": versions(),
            "signature": C.signature(n_classes, attention),
            "labels": labels,
            "pad_id": PAD_ID,
            "unk_id": UNK_ID,
            "vocab_size": vocab_size,
            "max_length": int(max_length),
            "tokenizer": {"path": "tokenizer.json", "sha256": B.sha256_path(tmp / "tokenizer.json")},
            "test_data": "test.jsonl" if src.test_data else None,
            "source": {"model": str(src.model_path), **src.extra},
            "artifacts": artifacts,
            # every file of the bundle and its hash (SavedModel variables included)
            "contents": hash_tree(tmp, what="bundle", skip=B.OWN_ENTRIES),
            "export_seconds": round(time.perf_counter() - t_start, 1),
            "verdict": None,
        }
        B.validate_manifest(manifest, "the manifest being written")
        B.write_manifest(tmp, manifest)
    return manifest


def audit_built(path: Path, built, vocab_size: int, n_classes: int, max_length: int, unsafe: bool) -> dict:
    """The checks predict, verify and bench run on an artifact, run on what export just
    built, so a bundle never ships what its readers would refuse. Returns what goes into the
    manifest entry (an ONNX file's I/O signature and ops)."""
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



def _run_formats(ctx: formats.ExportContext, selected, precisions) -> list:
    """Run each selected format's exporter. A SavedModel is written first when a converter
    needs one (in a scratch folder if the SavedModel itself was not asked for); formats that
    convert in a child process run in a thread beside the in-process ones."""
    modules = {f: formats.get(f) for f in selected}
    wanted = {f: [p for p in precisions if p in C.SUPPORTED[f]] for f in selected}
    wanted = {f: ps for f, ps in wanted.items() if ps}
    from .formats import savedmodel

    scratch = None
    if any(modules[f].NEEDS_SAVED_MODEL for f in wanted):
        if "savedmodel" in wanted:
            ctx.saved_model_dir = ctx.out / C.artifact_filename("savedmodel", "fp32")
        else:
            scratch = ctx.out / ".saved_model_for_conversion"
            ctx.saved_model_dir = scratch
        ctx.saved_model_seconds = savedmodel.save(ctx, ctx.saved_model_dir)

    built, errors, procs = [], [], []
    cancel = threading.Event()

    def started(proc):
        procs.append(proc)
        if cancel.is_set():  # the export failed or was interrupted while it started
            proc.kill()

    ctx.started = started
    threads = []
    for f, ps in wanted.items():
        if modules[f].IN_CHILD:
            def work(mod=modules[f], ps=ps):
                try:
                    built.extend(mod.export(ctx, ps))
                except BaseException as e:  # re-raised in the main thread
                    errors.append(e)

            th = threading.Thread(target=work, daemon=True)
            th.start()
            threads.append(th)
    try:
        for f, ps in wanted.items():
            if not modules[f].IN_CHILD:
                built.extend(modules[f].export(ctx, ps))
    except BaseException:  # failed or interrupted: stop the converters rather than wait for them
        _stop(cancel, procs)
        raise
    finally:
        for th in threads:
            _join(th, cancel, procs)
    if errors:
        raise errors[0]
    if scratch is not None:
        shutil.rmtree(scratch)
    return built


def _stop(cancel, procs):
    cancel.set()
    for p in list(procs):
        if p.poll() is None:
            p.kill()


def _join(thread, cancel, procs):
    """Wait for a converter thread; Ctrl-C while waiting stops its child first, so the
    temporary bundle is removed only after nothing writes into it any more."""
    try:
        thread.join()
    except KeyboardInterrupt:
        _stop(cancel, procs)
        thread.join()
        raise


def summary_table(manifest) -> str:
    rows = ["| artifact | format | precision | size | % of fp32 | time |", "|---|---|---|---|---|---|"]
    fp32 = {a["format"]: a["bytes"] for a in manifest["artifacts"] if a["precision"] == "fp32"}
    for a in manifest["artifacts"]:
        base = fp32.get(a["format"])
        pct = f"{100 * a['bytes'] / base:.0f}%" if base else "-"
        rows.append(f"| {a['path']} | {a['format']} | {a['precision']} | {a['bytes'] / 1e6:.2f} MB | {pct} | {a['seconds']:.1f} s |")
    return "\n".join(rows)

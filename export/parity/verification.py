"""``probattn verify``: every artifact x runtime x case family against the Keras reference.

The Keras model (the reference) and every artifact run in every runtime the registry says
can run them, on real held-out texts and on generated case families; the bounds of
``tolerances`` are checked and the report is written. Padding invariance is checked on
the Keras model itself too: a model whose masking is broken fails even when every runtime
agrees with it.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from probattn.models.errors import UsageError
from probattn.models.fsutil import check_output_dir_usable, not_writable, open_output_dir, writer_active

from .. import bundle as B
from .. import runtimes
from ..versions import machine, versions
from . import tolerances as T
from .cases import build_cases, load_texts
from ..loading import check_custom_objects_for_bundle
from ..runtimes.isolated import IsolatedRunner, RuntimeCrash
from .compare import Check, checks_for, metrics, run_case
from .report import Report, write_report


def verify(bundle, data: str | None = None, report_dir=None, formats=None, quiet=False,
           check_hashes: bool = True, text_column: str = "text", label_column: str = "label",
           encoding: str = "utf-8", custom_objects=None, strict: bool = False, unsafe: bool = False,
           default_report_dir: bool = False) -> Report:
    """Judge every artifact of ``bundle``; every runtime runs in a child process. ``strict``:
    a runtime that is not installed, or an artifact that could not be run, fails the verdict
    instead of being skipped. ``unsafe``: run what the safety checks refuse (Lambda layers,
    SavedModel ops). A bundle exported with ``--custom-objects`` needs the same file again
    (``custom_objects``), since loading the Keras reference runs it.

    The bundle is opened once and held under a shared lock (no lock file: a read-only bundle
    verifies into a writable ``report_dir``); every file is hash-checked and the bundle must
    hold only what its manifest lists. ``default_report_dir``: ``report_dir`` is
    ``BUNDLE/report``, opened relative to the bundle (a link there is refused, never followed).
    The verdict is recorded in ``manifest.json`` when the bundle is writable."""
    bundle = Path(bundle).absolute()
    t0 = time.perf_counter()
    say = (lambda *a: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    with B.Bundle(bundle) as b:  # a shared lock: an export cannot replace the bundle while it is judged
        manifest = b.manifest
        custom = check_custom_objects_for_bundle(manifest, custom_objects)
        if writer_active(bundle):
            raise UsageError(f"an export is writing {bundle}; verify it when the export has finished")
        # everything that can be refused is refused before the slow part; nothing is created yet
        inside = report_dir is not None and (default_report_dir or Path(report_dir).absolute() == bundle / B.REPORT_DIR)
        where = dict(path=B.REPORT_DIR, dir_fd=b.dir.fd, what=f"report directory {bundle}/report") if inside \
            else dict(path=report_dir, what="--report-dir")
        if report_dir is not None:
            try:
                check_output_dir_usable(**where)
            except UsageError as e:
                raise UsageError(f"{e}; pass --report-dir DIR to write the report elsewhere" if inside else str(e)) from None
        if check_hashes:
            b.check_all(strict_tree=True)
        tokenizer = b.tokenizer()
        b.check_plain_files(tokenizer)
        texts, labels, source = load_texts(bundle, manifest, data, text_column, label_column, encoding,
                                           test_bytes=b.test_data_bytes())
        paths = {a["path"]: _runner_source(b, a) for a in manifest["artifacts"]}
        audit_artifacts(manifest, paths, unsafe)  # nothing runs before every artifact passed its audit
        for a in manifest["artifacts"]:  # TFLite-family files: I/O, ops, sizes, MediaPipe metadata
            b.audit_artifact(a, paths[a["path"]]["content"], tokenizer)
        record = not_writable(b.dir.fd) is None
        if not record:
            say(f"note: {bundle} is read-only; the verdict is not recorded in its manifest.json")
        report = _verify_locked(bundle, manifest, tokenizer, texts, labels, source, paths, formats, quiet, t0,
                                strict, unsafe, custom)
        if report_dir is not None:
            report_fd = open_output_dir(**where)
            try:
                write_report(report, report_fd)
            finally:
                os.close(report_fd)
        verdict = report.meta.pop("_verdict")
        if record:
            _record_verdict(b, manifest, verdict)
        return report


def _runner_source(b, entry) -> dict:
    """What a runner loads: a file artifact's hash-checked bytes (with its name for messages),
    or a path through the bundle's descriptor for a directory or a Keras file."""
    path = b.check_entry(entry)
    if entry["format"] in ("keras", "savedmodel"):
        return {"path": path, "content": None}
    return {"path": b.path / entry["path"], "content": b.artifact_bytes(entry)}


def audit_artifacts(manifest, paths, unsafe: bool) -> None:
    """The checks of ``audit/`` on every artifact before any runs: a SavedModel's files and ops
    (its restore function runs at load), an ONNX file's graph and its shapes with the input
    at the longest case verify feeds (the runtimes check the rest when they load)."""
    from ..audit import onnx as onnx_audit
    from ..audit import savedmodel
    from ..limits import shape_caps

    for a in manifest["artifacts"]:
        src = paths[a["path"]]
        if a["format"] == "savedmodel":
            savedmodel.audit(src["path"], unsafe=unsafe, what=f"SavedModel {a['path']}")
        elif a["format"] == "onnx":
            onnx_audit.audit(src["content"], what=a["path"], vocab_size=manifest["vocab_size"],
                             n_classes=B.output_units(manifest))
            onnx_audit.shape_check(src["content"], shape_caps(manifest["max_length"]), a["path"])


def _record_verdict(b, manifest, verdict) -> None:
    try:  # record only the verdict, on the manifest that was judged
        current = B.read_manifest(b.dir)
    except UsageError:
        return
    if current.get("artifacts") == manifest["artifacts"]:
        current["verdict"] = verdict
        B.write_manifest(b.path, current, dir_fd=b.dir.fd)


def _verify_locked(bundle, manifest, tokenizer, texts, labels, source, paths, formats,
                   quiet, t0, strict, unsafe, custom=None) -> Report:
    cases = build_cases(tokenizer, manifest, texts, labels)
    vocab = int(manifest["vocab_size"])
    if source is None:
        source = "none: generated ids only (no --data and no test split in the bundle)"
    report = Report(meta={"bundle": str(bundle), "data": source, "n_texts": len(texts),
                          "real_texts": bool(texts), "strict": strict,
                          "versions": versions(), "machine": machine(), "tolerances": T.as_json(),
                          "cases": [c.name for c in cases],
                          "families": {c.name: c.family for c in cases},
                          "requested_formats": sorted(set(formats) if formats else
                                                      {a["format"] for a in manifest["artifacts"]} - {"keras"}),
                          "not_applicable": []})
    say = (lambda *a: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    keras_entry = B.find_artifact(manifest, "keras")
    if keras_entry is None:
        raise UsageError(f"{bundle}: no Keras reference (model.keras) in the manifest")
    entries = [keras_entry] + [a for a in manifest["artifacts"] if a["format"] != "keras"
                               and (not formats or a["format"] in formats)]

    reference = {}
    keras_acc = None
    heads = [(h["output"], h["kind"]) for h in manifest.get("heads") or []] or None
    for entry in entries:
        is_reference = entry is keras_entry
        for cls, variant in runtimes.pairs_for(entry["format"]):
            src = paths[entry["path"]]
            extra = {"custom_objects": custom} if is_reference and custom else {}
            runner = IsolatedRunner(cls, src["path"], vocab, variant=variant, input_shape=entry.get("input_shape"),
                                    content=src["content"], n_classes=B.output_units(manifest), unsafe=unsafe,
                                    **extra)
            label = f"{entry['path']} on {runner.name}"
            # by design (e.g. a microcontroller runtime and a dynamic-shape file) or as measured at export
            why_not = cls.cannot_run(entry["format"], entry["precision"], entry)
            if why_not:
                report.meta["not_applicable"].append({"artifact": entry["path"], "runtime": runner.name,
                                                      "reason": why_not})
                continue
            reason = cls.unavailable()
            if reason:
                report.skipped.append({"artifact": entry["path"], "runtime": runner.name, "reason": reason})
                say(f"  - skip {label}: {reason}")
                continue
            t = time.perf_counter()
            per_case, not_applicable = {}, []
            case = None
            try:
                with runner:
                    problem = runner.precision_problem(entry["precision"])
                    if problem:
                        raise UsageError(f"{entry['path']} is listed as {entry['precision']} but {problem}; "
                                         "refusing it")
                    for case in cases:
                        # longer than this artifact's (or the reference's) fixed length, or ids the
                        # runtime cannot be given (MediaPipe rebuilds texts from ids)
                        if (not all(runner.accepts(b) for b in case.batches + (case.base or []))
                                or (not is_reference and case.name not in reference)):
                            not_applicable.append(case.name)
                            continue
                        out, base = run_case(runner, case)
                        if is_reference:
                            reference[case.name] = out
                        m = metrics(out, reference[case.name], case, base, keras_acc, heads)
                        if is_reference and case.name == "heldout" and "accuracy" in m:
                            keras_acc = m["accuracy"]
                        per_case[case.name] = m
                        report.checks.extend(checks_for(entry["path"], runner.name, entry["precision"], case, m,
                                                        reference=is_reference))
                    if is_reference:  # the model itself, traced layer by layer
                        diag = report.meta["diagnosis"] = runner.call("diagnose", cases[0].batches[0][:32])
                        if diag.get("breaks_masking"):
                            where = f"starts at layer '{diag['starts_at']}'" if diag.get("starts_at") else \
                                "no single layer found"
                            report.checks.append(Check(entry["path"], runner.name, "diagnosis", "model_breaks_masking",
                                                       1, 0, "<=", False, detail=where))
            except UsageError as e:  # the runtime refused the file
                if is_reference:
                    raise
                if cls.secondary and case is None:  # e.g. an op OpenVINO's importer lacks: its limit
                    reason = f"cannot read this file: {e}"
                    report.skipped.append({"artifact": entry["path"], "runtime": runner.name, "reason": reason})
                    say(f"  - skip {label}: {reason}")
                    continue
                report.checks.append(Check(entry["path"], runner.name, case.name if case else "load", "runtime_error",
                                           1, 0, "<=", False, detail=str(e)))
                say(f"  ✗ {label}: {e}")
            except RuntimeCrash as e:  # the runtime died or hung: this row fails, verify goes on
                if is_reference:
                    raise RuntimeCrash(f"the Keras reference could not run: {e}") from None
                where = case.name if case is not None else "load"
                report.checks.append(Check(entry["path"], runner.name, where, "runtime_crash", 1, 0, "<=", False,
                                           detail=str(e)))
                say(f"  ✗ {label} crashed: {e}")
            row = _summary_row(entry, runner.name, per_case, is_reference, cases)
            row["cases_not_applicable"] = not_applicable
            row["seconds"] = round(time.perf_counter() - t, 2)
            report.rows.append(row)
            row["passed"] = report.row_passed(entry["path"], runner.name)
            say(f"  {'PASS' if row['passed'] else 'FAIL'} {label}  ({row['seconds']:.1f} s)")
        if is_reference and not reference:
            raise UsageError(f"the Keras reference could not run: {report.skipped[-1]['reason']}")
    report.meta["explanations"] = explanations(report, manifest)
    accuracy_checked = any(c.metric == "accuracy_drop" for c in report.checks)
    report.meta["accuracy_checked"] = accuracy_checked
    ran = {r["format"] for r in report.rows}
    report.meta["unverified_formats"] = [f for f in report.meta["requested_formats"] if f not in ran]
    report.meta["seconds"] = round(time.perf_counter() - t0, 1)
    report.meta["_verdict"] = {"passed": report.passed, "summary": report.verdict_line(),
               "failures": len(report.failures), "checks": len(report.checks),
               "strict": strict, "unverified_formats": report.meta["unverified_formats"],
               "skipped": [f"{s['artifact']} on {s['runtime']}: {s['reason']}" for s in report.skipped],
               "formats": sorted({e["format"] for e in entries}), "data": source,
               "accuracy_checked": accuracy_checked,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return report


def explanations(report: Report, manifest: dict) -> list:
    """Lines that say why, beside the checks: the model's own masking (a model problem, said
    apart from export parity) and float16 hazards (constants float16 cannot hold)."""
    from ..diagnosis import explain_float16

    lines = []
    diag = report.meta.get("diagnosis") or {}
    ref = manifest_reference(manifest)
    model_cases = {c.case for c in report.failures if c.artifact == ref}
    export_failed = [c for c in report.failures if c.artifact != ref and c.case not in model_cases]
    if model_cases or diag.get("breaks_masking"):
        start = f", starting at layer '{diag['starts_at']}'" if diag.get("starts_at") else ""
        lines.append(f"The Keras model itself breaks masking{start}: a model problem, not an export one "
                     f"(export parity: {len(export_failed)} failed checks outside the cases where the model "
                     "itself fails):")
        lines += [f"  - {t}" for t in diag.get("model_text", [])]
    fp16 = sorted({(r["artifact"], bool(r.get("nan_inf"))) for r in report.rows if r["precision"] == "fp16"})
    for line in explain_float16(diag, fp16):
        lines.append(line)
    return lines


def manifest_reference(manifest: dict) -> str | None:
    entry = B.find_artifact(manifest, "keras")
    return entry["path"] if entry else None


def _summary_row(entry, runtime, per_case, reference: bool, cases) -> dict:
    held = per_case.get("heldout", {})
    if not per_case:  # the runtime crashed before any case finished
        return {"artifact": entry["path"], "format": entry["format"], "precision": entry["precision"],
                "runtime": runtime, "bytes": entry["bytes"], "reference": reference, "accuracy": None,
                "accuracy_drop": None, "top1_agreement": None, "max_abs": float("nan"), "mean_abs": None,
                "max_rel": None, "pad_invariance": None, "batch_invariance": None, "buckets": {},
                "min_bucket_top1_agreement": None, "pad_attention": None, "nan_inf": 0, "cases": {},
                "passed": None}
    pad = [m["pad_invariance"] for m in per_case.values() if "pad_invariance" in m]
    batch = [m["batch_invariance"] for m in per_case.values() if "batch_invariance" in m]
    buckets = {c.bucket: {"rows": per_case[c.name]["rows"], "top1_agreement": per_case[c.name]["top1_agreement"],
                          "max_abs": per_case[c.name]["max_abs"]}
               for c in cases if c.bucket and c.name in per_case}
    patt = [m["pad_attention"] for m in per_case.values() if "pad_attention" in m]
    return {
        "artifact": entry["path"], "format": entry["format"], "precision": entry["precision"],
        "runtime": runtime, "bytes": entry["bytes"], "reference": reference,
        "accuracy": held.get("accuracy"), "accuracy_drop": held.get("accuracy_drop"),
        "top1_agreement": held.get("top1_agreement"),
        "max_abs": max(m["max_abs"] for m in per_case.values()),
        "mean_abs": held.get("mean_abs"), "max_rel": held.get("max_rel"),
        "pad_invariance": max(pad) if pad else None,
        "batch_invariance": max(batch) if batch else None,
        "buckets": buckets,
        "min_bucket_top1_agreement": min((b["top1_agreement"] for b in buckets.values()), default=None),
        "pad_attention": max(patt) if patt else None,
        "nan_inf": sum(m["nan_inf"] for m in per_case.values()),
        "cases": per_case, "passed": None,
    }

"""Parity: the session bundle passes every check on every runtime, and the engine catches
the real bugs (the seed's broken masking, an int8 graph that collapses on LiteRT's
reference kernels, a NaN among otherwise-close numbers) instead of passing them."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from conftest import tiny_classifier
from helpers import assert_one_error_line, cases_longer_than, run_cli
from helpers import tamper as _tamper
from probattn.export import parity
from probattn.export.parity.cases import Case
from probattn.export.parity.compare import checks_for as _checks_for
from probattn.export.parity.compare import fmt as _fmt
from probattn.export.parity.compare import metrics as _metrics
from probattn.export.parity.report import markdown_table
from probattn.export.parity.tolerances import FP32_PAD_INVARIANCE, INT8_MIN_AGREEMENT

#: the runtimes verify runs each format on, written out (TFLite Micro runs the fixed-shape
#: files only: the dynamic-shape ones are not applicable to it, by design)
RUNTIMES_FOR_FORMAT = {
    "keras": ("keras",), "savedmodel": ("savedmodel",),
    "tflite": ("litert-xnnpack", "litert-reference", "openvino"),
    "tflite-fixed": ("litert-xnnpack", "litert-reference", "tflm"),
    "onnx": ("onnxruntime-all", "onnxruntime-none", "openvino"),
}


def artifact_runtimes(manifest) -> set:
    """Every (artifact, runtime) pair verify runs for a bundle: each artifact of the manifest
    (the int64-input ONNX twins included) on every runtime that runs its format."""
    return {(a["path"], rt) for a in manifest["artifacts"] for rt in RUNTIMES_FOR_FORMAT[a["format"]]}


def _shared_folder(tmp_path_factory, name: str):
    """Where conftest's ``shared`` builds ``name``: the session's base folder, which under
    xdist is the parent every worker shares (not this worker's own tmp)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    return base / f"shared-{name}"


TINY_TEXTS = ["the film was great fun", "a dull and boring plot", "the acting was fine",
              "great cast but a weak script", "boring", "fun fun fun and more fun",
              "not good not bad", "the plot was weak but the cast was great"]
TINY_LABELS = ["neg", "neu", "pos"]


def _write_jsonl(path, texts, labels):
    path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in zip(texts, labels)))


# --------------------------------------------------------------------------- the good bundle

def test_session_bundle_passes_every_check(parity_report):
    assert parity_report.checks, "no checks were run"
    assert not parity_report.failures, "\n".join(c.message() for c in parity_report.failures[:20])
    assert parity_report.passed is True
    assert not parity_report.skipped, parity_report.skipped
    # not applicable by design: TFLite Micro cannot run the dynamic-shape files
    na = parity_report.meta["not_applicable"]
    assert {(s["artifact"], s["runtime"]) for s in na} == \
        {(f"model_{p}.tflite", "tflm") for p in ("fp32", "fp16", "int8_dynamic", "int8")}, na
    assert all("cannot resize" in s["reason"] for s in na)


def test_rows_for_every_artifact_and_runtime(parity_report, bundle_dir, manifest):
    # the fixed-shape files take [1, max_length]: longer case families are not applicable to them
    longer = cases_longer_than(bundle_dir, manifest["max_length"])
    assert {"pad+64", "4x_max_length"} <= longer and "heldout" not in longer
    expected = artifact_runtimes(manifest)
    # the session bundle: 4 dynamic + 3 fixed-shape TFLite files, 3 ONNX precisions and their int64 twins
    assert len({a for a, _ in expected}) == 2 + 4 + 3 + 3 * 2, sorted({a for a, _ in expected})
    assert {(f"model_{p}_int64.onnx", "onnxruntime-none") for p in ("fp32", "fp16", "int8")} <= expected
    rows = {(r["artifact"], r["runtime"]) for r in parity_report.rows}
    assert rows == expected
    assert len(parity_report.rows) == len(expected), "duplicate rows"
    for r in parity_report.rows:
        assert r["passed"] is True, r["artifact"] + " " + r["runtime"]
        # every row was checked on every case family it can take, not just some
        skipped = longer if r["artifact"].startswith("model_fixed_") else set()
        assert set(r["cases_not_applicable"]) == skipped, (r["artifact"], r["runtime"], r["cases_not_applicable"])
        assert set(r["cases"]) == set(parity_report.meta["cases"]) - skipped, (r["artifact"], r["runtime"])
    checked = {(c.artifact, c.runtime) for c in parity_report.checks}
    assert checked == expected


def test_report_files_and_manifest_verdict(parity_report, bundle_dir, manifest, tmp_path_factory):
    d = _shared_folder(tmp_path_factory, "report") / "report"  # the parity_report fixture's report_dir
    assert (d / "parity.json").is_file(), f"no parity.json for {bundle_dir} in {d}"
    doc = json.loads((d / "parity.json").read_text())
    assert doc["meta"]["bundle"] == str(bundle_dir)
    assert doc["passed"] is True and doc["failures"] == []
    assert len(doc["rows"]) == len(artifact_runtimes(manifest)) and len(doc["checks"]) == len(parity_report.checks)
    md = (d / "parity.md").read_text()
    assert "**PASS**" in md and "model_int8.tflite | litert-reference" in md
    assert (d / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    verdict = json.loads((bundle_dir / "manifest.json").read_text())["verdict"]
    assert verdict["passed"] is True and verdict["failures"] == 0
    assert verdict["checks"] == len(parity_report.checks)


# --------------------------------------------------------------------------- the seed's masking

@pytest.fixture(scope="module")
def seed_masking(tmp_path_factory):
    """Embedding(mask_zero=True) -> Masking() -> ProbAttention, exported fp32 and verified."""
    from probattn.export.exporter import ExportOptions, export
    from probattn.models.text.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("seedmask")
    train_tokenizer(TINY_TEXTS, vocab_size=50).save(str(d / "tokenizer.json"))
    (d / "labels.txt").write_text("\n".join(TINY_LABELS) + "\n")
    texts = TINY_TEXTS * 2
    _write_jsonl(d / "test.jsonl", texts, [TINY_LABELS[i % 3] for i in range(len(texts))])
    tiny_classifier(masking_layer=True).save(d / "seed.keras")
    export(d / "seed.keras", d / "bundle",
           ExportOptions(precisions=("fp32",), tokenizer=str(d / "tokenizer.json"), labels=str(d / "labels.txt")))
    report = parity.verify(d / "bundle", data=str(d / "test.jsonl"), report_dir=d / "report", quiet=True)
    return d, report


def test_seed_masking_fails_padding_invariance_on_keras_itself(seed_masking):
    _, report = seed_masking
    assert report.passed is False
    keras_fail = [c for c in report.failures
                  if (c.artifact, c.runtime, c.metric) == ("model.keras", "keras", "pad_invariance")]
    assert keras_fail, "the reference's own broken masking was not caught:\n" + \
        "\n".join(c.message() for c in report.failures)
    assert {c.case for c in keras_fail} >= {"pad+1", "pad+7", "pad+64"}
    for c in keras_fail:
        assert c.value > c.bound == FP32_PAD_INVARIANCE and c.op == "<="
        msg = c.message()
        for part in ("model.keras", "on keras", f"case {c.case}", "pad_invariance", _fmt(c.value),
                     f"bound <= {_fmt(c.bound)}", "outside"):
            assert part in msg, f"{part!r} not in {msg!r}"
    print(f"\nseed masking, Keras row: pad_invariance per case "
          f"{ {c.case: round(c.value, 6) for c in keras_fail} } (bound {FP32_PAD_INVARIANCE})")


def test_seed_masking_fails_on_every_exported_artifact(seed_masking):
    d, report = seed_masking
    manifest = json.loads((d / "bundle" / "manifest.json").read_text())
    assert {a["path"] for a in manifest["artifacts"]} == {
        "model.keras", "saved_model", "model_fp32.tflite", "model_fixed_fp32.tflite", "model_fp32.onnx",
        "model_fp32_int64.onnx"}
    rows = {(r["artifact"], r["runtime"]): r for r in report.rows}
    # every pair but TFLite Micro's (not applicable: below)
    assert set(rows) == artifact_runtimes(manifest) - {("model_fixed_fp32.tflite", "tflm")}
    # Masking() needs REDUCE_ANY, which TFLite Micro lacks: measured at export, not applicable for that reason
    tflm = [s for s in report.meta["not_applicable"] if s["artifact"] == "model_fixed_fp32.tflite"]
    assert len(tflm) == 1 and "REDUCE_ANY" in tflm[0]["reason"], report.skipped
    fixed = {k for k in rows if k[0] == "model_fixed_fp32.tflite"}
    for key, row in rows.items():
        assert row["passed"] is False, key
        # a fixed-shape file always runs its max_length, padded: appending pads changes nothing
        # for it, but its outputs move away from Keras on the unpadded texts by the pads' weight
        metric = "max_abs" if key in fixed else "pad_invariance"
        assert any((c.artifact, c.runtime, c.metric) == (*key, metric) for c in report.failures), key
        if key in fixed:
            assert row["pad_invariance"] == 0
    # the dynamic runtimes agree with the (broken) reference: it is the masking, not the conversion
    for c in report.checks:
        if c.metric == "max_abs" and (c.artifact, c.runtime) not in fixed:
            assert c.passed, c.message()


def test_cli_verify_exit_1_on_broken_masking(seed_masking, tmp_path):
    d, _ = seed_masking
    proc = run_cli("verify", d / "bundle", "--data", d / "test.jsonl", "--report-dir", tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FAIL model.keras on keras, case pad+1: pad_invariance" in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "parity.json").read_text())["passed"] is False


# --------------------------------------------------------------------------- naive int8 collapse

@pytest.fixture(scope="module")
def naive_int8(tmp_path_factory):
    """The findings' naive layer (tf.where(mask, u, -1e4), reduce_sum(x * a); see
    probattn.models.naive) trained one epoch on Rotten Tomatoes with the same pipeline,
    exported full-int8 with the run's calibration texts, and verified."""
    from probattn.export.exporter import ExportOptions, export
    from probattn.models.naive import NaiveProbAttention
    from probattn.models.train import TrainConfig, train

    d = tmp_path_factory.mktemp("naive")
    train(TrainConfig(epochs=1, seed=0), d / "run", verbose=0, attention_layer=NaiveProbAttention)
    export(d / "run", d / "bundle", ExportOptions(formats=("tflite",), precisions=("int8",)))
    return parity.verify(d / "bundle", quiet=True)


def test_naive_int8_collapse_caught_on_reference_kernels(naive_int8):
    report = naive_int8
    rows = {(r["artifact"], r["runtime"]): r for r in naive_int8.rows}
    print("\nnaive int8: " + ", ".join(f"{a} on {rt}: top1_agreement {r['top1_agreement']:.4f}, "
                                      f"accuracy {r['accuracy']:.4f}" for (a, rt), r in rows.items()))
    # the float model itself is fine: masking holds, so the failure is the quantized arithmetic
    assert rows[("model.keras", "keras")]["passed"] is True, \
        [c.message() for c in report.failures if c.artifact == "model.keras"]
    ref_row = rows[("model_int8.tflite", "litert-reference")]
    assert ref_row["passed"] is False
    held = [c for c in report.checks if (c.artifact, c.runtime, c.case, c.metric)
            == ("model_int8.tflite", "litert-reference", "heldout", "top1_agreement")]
    assert len(held) == 1 and held[0].passed is False and held[0].value < INT8_MIN_AGREEMENT, held
    assert held[0].bound == INT8_MIN_AGREEMENT and "top1_agreement" in held[0].message()
    assert report.passed is False


# --------------------------------------------------------------------------- NaN and skipped

UNIT_ROWS = 60  # decisions are judged from 50 rows on (tolerances.MIN_JUDGED_ROWS)


def _unit_case():
    rows = np.array([[5, 6, 7, 8], [9, 10, 11, 0], [3, 4, 0, 0]], np.int32)
    return Case("heldout", [np.tile(rows, (UNIT_ROWS // 3, 1))], real=True)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8-dynamic", "int8"])
@pytest.mark.parametrize("where", ["probabilities", "attention_weights"])
def test_one_nan_fails_even_when_everything_else_is_close(precision, where):
    ref = {"probabilities": np.tile(np.array([[0.7, 0.3], [0.2, 0.8], [0.55, 0.45]], np.float32),
                                    (UNIT_ROWS // 3, 1)),
           "attention_weights": np.tile(np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.25, 0], [0.5, 0.5, 0, 0]],
                                                 np.float32), (UNIT_ROWS // 3, 1))}
    out = {k: v.copy() for k, v in ref.items()}
    # the NaN sits where it cannot change a decision: argmax of [0.2, nan] is still class 1
    out[where][1, 1] = np.nan
    case = _unit_case()
    m = _metrics(out, ref, case, None, None)
    assert m["nan_inf"] == 1
    checks = _checks_for("model_x.onnx", "onnxruntime-all", precision, case, m)
    nan_checks = [c for c in checks if c.metric == "nan_inf"]
    assert len(nan_checks) == 1 and nan_checks[0].passed is False, [c.message() for c in checks]
    assert "nan_inf 1 outside bound <= 0" in nan_checks[0].message()
    if precision.startswith("int8"):  # decisions alone would have let it through
        top1 = [c for c in checks if c.metric == "top1_agreement"]
        assert top1 and all(c.passed for c in top1)
    # and without the NaN the same comparison passes
    clean = _checks_for("model_x.onnx", "onnxruntime-all", precision, case, _metrics(ref, ref, case, None, None))
    assert clean and all(c.passed for c in clean), [c.message() for c in clean if not c.passed]


_MISSING_REASON = "onnxruntime graph-optimization-off build not installed (test)"


def _onnx_runner():
    from probattn.export.runtimes.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner


class NaNOnnx(_onnx_runner()):
    """onnxruntime with one NaN written into model_fp32.onnx's output. Verify runs every
    runtime in a child process, which imports this class from this module by name."""

    def _infer(self, ids):
        out = dict(super()._infer(ids))
        if self.path.name == "model_fp32.onnx":
            p = np.array(out["probabilities"], np.float32, copy=True)
            p[0, 0] = np.nan
            out["probabilities"] = p
        return out


class Missing(_onnx_runner()):
    @classmethod
    def unavailable(cls):
        return _MISSING_REASON

    def _load(self):
        raise AssertionError("a skipped runtime must not be loaded")


def test_nan_runner_fails_and_unavailable_runtime_is_skipped(bundle_dir, tmp_path, monkeypatch):
    from probattn.export import runtimes

    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    reason = _MISSING_REASON

    real = runtimes.pairs_for

    def fake(fmt):  # onnx runs on the NaN runner (all) and a missing one (none); nothing else
        return [(NaNOnnx, "all"), (Missing, "none")] if fmt == "onnx" else real(fmt)

    monkeypatch.setattr(runtimes, "pairs_for", fake)
    report = parity.verify(bundle, formats=["onnx"], report_dir=tmp_path / "report", quiet=True)

    # the missing runtime is skipped on every ONNX file of the manifest (int64 twins included), in order
    onnx_files = [a["path"] for a in json.loads((bundle / "manifest.json").read_text())["artifacts"]
                  if a["format"] == "onnx"]
    assert {"model_fp32.onnx", "model_fp32_int64.onnx", "model_int8_int64.onnx"} <= set(onnx_files)
    assert report.skipped == [{"artifact": a, "runtime": "onnxruntime-none", "reason": reason}
                              for a in onnx_files]
    skipped_key = ("model_fp32.onnx", "onnxruntime-none")
    assert skipped_key not in {(r["artifact"], r["runtime"]) for r in report.rows}
    assert not [c for c in report.checks if (c.artifact, c.runtime) == skipped_key], "skipped runtime was checked"
    assert f"skipped: {reason}" in markdown_table(report)

    nan_key = ("model_fp32.onnx", "onnxruntime-all")
    nan_fail = [c for c in report.failures if (c.artifact, c.runtime) == nan_key]
    assert any(c.metric == "nan_inf" and c.value >= 1 for c in nan_fail), [c.message() for c in nan_fail]
    assert {(c.artifact, c.runtime) for c in report.failures} == {nan_key}, \
        [c.message() for c in report.failures]
    assert report.passed is False
    for r in report.rows:
        assert r["passed"] is ((r["artifact"], r["runtime"]) != nan_key), (r["artifact"], r["runtime"])


# --------------------------------------------------------------------------- CLI exit codes

def test_cli_verify_exit_0_on_good_bundle(bundle_dir, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    proc = run_cli("verify", bundle, "--report-dir", tmp_path / "report")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "checks passed" in proc.stdout and "FAIL" not in proc.stdout, proc.stdout[-3000:]
    assert (tmp_path / "report" / "parity.json").is_file()
    assert json.loads((bundle / "manifest.json").read_text())["verdict"]["passed"] is True


def test_cli_verify_exit_2_on_missing_bundle(tmp_path):
    proc = run_cli("verify", tmp_path / "nope")
    line = assert_one_error_line(proc, "verify")
    assert line.startswith("probattn verify: error: bundle not found"), proc.stderr


def test_cli_verify_exit_2_on_tampered_artifact(bundle_dir, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    _tamper(bundle / "model_fp32.onnx")
    proc = run_cli("verify", bundle, "--report-dir", tmp_path / "report")
    assert "model_fp32.onnx does not match its manifest hash" in assert_one_error_line(proc, "verify")
    assert not (tmp_path / "report" / "parity.json").exists()

"""What a verdict, an overwrite and an export promise: the verdict covers what was checked,
--overwrite never removes a folder that is not ours, and inconsistent inputs are refused
before anything is written."""
from __future__ import annotations

import json
import shutil

import pytest

from helpers import assert_one_error_line, run_cli
from helpers import tamper as _tamper
from probattn.export import bundle as B
from probattn.export import parity
from probattn.models.errors import UsageError


@pytest.fixture
def bundle_copy(bundle_dir, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dst)
    return dst


def _manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


# --------------------------------------------------------------------------- verify's verdict

def test_verify_checks_tokenizer_hash(bundle_copy):
    before = _manifest(bundle_copy)
    _tamper(bundle_copy / "tokenizer.json")
    with pytest.raises(UsageError, match="tokenizer.json does not match its manifest hash"):
        parity.verify(bundle_copy, quiet=True, formats=("onnx",))
    assert _manifest(bundle_copy) == before  # no verdict written


def test_verify_formats_subset_still_hashes_every_artifact(bundle_copy):
    _tamper(bundle_copy / "model_int8.tflite")
    with pytest.raises(UsageError, match="model_int8.tflite does not match its manifest hash"):
        parity.verify(bundle_copy, quiet=True, formats=("onnx",))


def test_verdict_records_formats_data_and_skips(bundle_copy, monkeypatch):
    from probattn.export.runtimes.litert import LiteRTRunner

    monkeypatch.setattr(LiteRTRunner, "unavailable", classmethod(lambda cls: "ai_edge_litert not installed"))
    report = parity.verify(bundle_copy, quiet=True)
    verdict = _manifest(bundle_copy)["verdict"]
    assert verdict["passed"] is report.passed
    assert verdict["formats"] == ["keras", "onnx", "savedmodel", "tflite", "tflite-fixed"]
    # 4 dynamic + 3 fixed files, 2 kernel families (TFLite Micro and the dynamic files are not
    # applicable by design, which is not a skip)
    assert len(verdict["skipped"]) == 14 and all(" on litert-" in s and "ai_edge_litert not installed" in s
                                                 for s in verdict["skipped"]), verdict["skipped"]
    assert verdict["accuracy_checked"] is True and "test.jsonl" in verdict["data"]
    assert not any(r["runtime"].startswith("litert") for r in report.rows)


def test_verdict_not_written_over_a_manifest_that_changed(bundle_copy, monkeypatch):
    """An export that replaced the bundle meanwhile must not receive the old verdict."""
    m = _manifest(bundle_copy)
    m["verdict"] = None  # whatever an earlier verify of the shared bundle recorded
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    from probattn.export.parity import verification as verify_mod

    real = verify_mod.run_case
    changed = {}

    def run_and_change(runner, case):
        if not changed:
            m = _manifest(bundle_copy)
            m["artifacts"] = m["artifacts"][:-1]
            m["verdict"] = None  # the copy may carry the session bundle's verdict
            (bundle_copy / "manifest.json").write_text(json.dumps(m))
            changed["artifacts"] = m["artifacts"]
        return real(runner, case)

    monkeypatch.setattr(verify_mod, "run_case", run_and_change)
    parity.verify(bundle_copy, quiet=True, formats=("onnx",))
    after = _manifest(bundle_copy)
    assert after["artifacts"] == changed["artifacts"] and after.get("verdict") is None


def test_verify_holds_the_bundle_lock(bundle_copy):
    from probattn.models.fsutil import directory_lock

    with directory_lock(bundle_copy.absolute()):
        with pytest.raises(UsageError, match="an export is writing"):
            parity.verify(bundle_copy, quiet=True)


def test_verify_report_dir_that_is_a_file_fails_first(bundle_copy, tmp_path):
    target = tmp_path / "report"
    target.write_text("not a directory")
    before = _manifest(bundle_copy)
    with pytest.raises(UsageError, match="--report-dir exists and is not a directory"):
        parity.verify(bundle_copy, quiet=True, report_dir=target)
    assert _manifest(bundle_copy) == before


def test_verify_with_two_texts(bundle_copy, tmp_path):
    data = tmp_path / "two.jsonl"
    data.write_text('{"text": "a fine film", "label": "fresh"}\n{"text": "dull", "label": "rotten"}\n')
    report = parity.verify(bundle_copy, quiet=True, data=str(data), formats=("onnx",))
    assert report.meta["n_texts"] == 2 and report.rows


# --------------------------------------------------------------------------- --overwrite

def test_export_overwrite_refuses_a_folder_that_is_not_a_bundle(run_dir, tmp_path):
    from probattn.export.exporter import ExportOptions, export

    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "notes.txt").write_text("important")
    with pytest.raises(UsageError, match="no manifest.json"):
        export(run_dir, precious, ExportOptions(overwrite=True, formats=("onnx",), precisions=("fp32",)))
    assert (precious / "notes.txt").read_text() == "important" and (precious / "sub").is_dir()


def test_train_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    from probattn.models.train import TrainConfig, train

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("important")
    with pytest.raises(UsageError, match="no metrics.json"):
        train(TrainConfig(), precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "important"


# --------------------------------------------------------------------------- inconsistent inputs

def test_export_refuses_tokenizer_larger_than_embedding(run_dir, tmp_path):
    from probattn.export.exporter import ExportOptions, export
    from probattn.models.text.tokenizer import train_tokenizer

    words = [f"w{i}" for i in range(25000)]
    big = tmp_path / "big.json"
    train_tokenizer([" ".join(words)], vocab_size=30000).save(str(big))
    with pytest.raises(UsageError, match="tokenizer has 25002 ids but the model's embedding has"):
        export(run_dir, tmp_path / "out", ExportOptions(tokenizer=str(big), formats=("onnx",), precisions=("fp32",)))
    assert not (tmp_path / "out").exists()


def test_export_refuses_duplicate_labels(run_dir, tmp_path):
    from probattn.export.exporter import ExportOptions, export

    labels = tmp_path / "labels.json"
    labels.write_text('["fresh", "fresh"]')
    with pytest.raises(UsageError, match=r"duplicate label names \['fresh'\]"):
        export(run_dir, tmp_path / "out", ExportOptions(labels=str(labels), formats=("onnx",), precisions=("fp32",)))


def test_export_selection_of_nothing_is_refused(run_dir, tmp_path):
    from probattn.export.exporter import ExportOptions, export

    with pytest.raises(UsageError, match="selects no artifact"):
        export(run_dir, tmp_path / "out", ExportOptions(formats=("onnx",), precisions=("int8-dynamic",)))


@pytest.mark.parametrize("rows,seed,message", [
    (2, 0, "too few examples"),
    (20, -1, "--seed must be an integer"),
], ids=["two-per-class", "negative-seed"])
def test_train_refuses_what_it_cannot_split_or_seed(tmp_path, rows, seed, message):
    from probattn.models.train import TrainConfig, train

    csv = tmp_path / "small.csv"
    csv.write_text("text,label\n" + "".join(f"good film {i},pos\nbad film {i},neg\n" for i in range(rows)))
    with pytest.raises(UsageError, match=message):
        train(TrainConfig(dataset=str(csv), seed=seed, epochs=1), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- manifests and predict

@pytest.mark.parametrize("edit,message", [
    (lambda m: m.pop("tokenizer"), "missing field 'tokenizer'"),
    (lambda m: m["artifacts"][1].update(format="coreml"), "format 'coreml'"),
    (lambda m: m.update(labels=["a", "a"]), "distinct names"),
], ids=["no-tokenizer", "unknown-format", "duplicate-labels"])
def test_malformed_manifest_is_refused(bundle_copy, edit, message):
    m = _manifest(bundle_copy)
    edit(m)
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    proc = run_cli("predict", bundle_copy, "a text")
    assert message in assert_one_error_line(proc, "predict"), proc.stderr


def test_predict_refuses_non_utf8_stdin_and_argv(bundle_dir, tmp_path):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "probattn.export.cli", "predict", str(bundle_dir)]
    proc = subprocess.run(cmd + ["--input-file", "-"], input=b"caf\xe9\n", capture_output=True)
    assert proc.returncode == 2 and b"standard input is not valid UTF-8" in proc.stderr, proc.stderr
    proc = subprocess.run(cmd + [os.fsdecode(b"caf\xe9")], capture_output=True)
    assert proc.returncode == 2 and b"text argument 1 is not valid UTF-8" in proc.stderr, proc.stderr


def test_bench_reports_a_broken_artifact_in_one_line(bundle_copy):
    (bundle_copy / "model_int8.onnx").write_bytes(b"not an onnx model" * 10)
    m = _manifest(bundle_copy)
    for a in m["artifacts"]:
        if a["path"] == "model_int8.onnx":
            a["sha256"] = B.sha256_path(bundle_copy / "model_int8.onnx")
    B.write_manifest(bundle_copy, m)
    proc = run_cli("bench", bundle_copy, "--quick", "--threads", "1", "--runtimes", "onnxruntime")
    assert "model_int8.onnx is not a valid ONNX model" in assert_one_error_line(proc, "bench"), proc.stderr[-2000:]

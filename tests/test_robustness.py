"""Cross-verb robustness: bad input, untrusted models, interruptions and concurrency.

Bad input: every family in BAD_INPUT runs the real command line in a child process and must
exit 2 with exactly one line on stderr that names what was received (and, where there is a
choice, what is allowed), no traceback, nothing on stdout, and nothing written anywhere.
The children run a few at a time (most fail before importing TensorFlow and take 0.2 s).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import tiny_classifier
from helpers import assert_one_error_line, run_cli
from probattn.export import bundle as B
from probattn.models.errors import UsageError
from probattn.models.fsutil import TMP_PREFIX

# ------------------------------------------------------------------------------ helpers


def _snapshot(root: Path) -> dict:
    """Every path under root with (kind, size, mtime): any write shows up as a difference."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = ("dir", 0, 0) if p.is_dir() else ("file", st.st_size, st.st_mtime_ns)
    return out


def _hashes(bundle: Path) -> dict:
    return {str(p.relative_to(bundle)): B.sha256_path(p) for p in sorted(bundle.rglob("*")) if p.is_file()}


def _assert_valid_bundle(bundle: Path) -> dict:
    """manifest.json loads and every artifact (and the tokenizer) matches its hash."""
    manifest = B.load_manifest(bundle)
    assert manifest["artifacts"], bundle
    for entry in manifest["artifacts"] + [manifest["tokenizer"]]:
        B.verified_path(bundle, entry)  # raises UsageError on a missing or different file
    return manifest


def _leftovers(parent: Path, name: str) -> list:
    """Temporary directories (not the lock file) of target `name` beside it."""
    return sorted(p.name for p in parent.glob(f"{TMP_PREFIX}{name}-*") if p.is_dir())


def _copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _set_entry(bundle: Path, rel: str, **fields):
    """Change the manifest entry of artifact `rel` (e.g. its sha256 or path); a new sha256 goes
    into the manifest's contents too, as an attacker who rewrites the manifest would put it."""
    m = json.loads((bundle / B.MANIFEST).read_text())
    for a in m["artifacts"]:
        if a["path"] == rel:
            a.update(fields)
    if "sha256" in fields:
        m["contents"][rel] = fields["sha256"]
    B.write_manifest(bundle, m)


def _replace_artifact(bundle: Path, rel: str, data: bytes, rehash: bool):
    """Overwrite an artifact; with rehash=True the manifest hash is updated to match, so the
    hash check passes and the runtime's own loader meets the bad file."""
    (bundle / rel).write_bytes(data)
    if rehash:
        _set_entry(bundle, rel, sha256=B.sha256_path(bundle / rel))


GARBAGE = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def _half(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


# ------------------------------------------------------------------------------ shared inputs


@pytest.fixture(scope="module")
def shared(tmp_path_factory, bundle_dir, run_dir):
    """Copies of the session run and bundle (the originals are never touched here), the
    tokenizer, and a tiny model saved as .h5 (for the HDF5 families)."""
    d = tmp_path_factory.mktemp("robust")
    s = {"dir": d, "bundle": _copy_bundle(bundle_dir, d / "bundle"), "run": d / "run"}
    shutil.copytree(run_dir, s["run"])
    s["tok"] = s["run"] / "tokenizer.json"
    s["keras"] = s["run"] / "model.keras"
    tiny_classifier().save(d / "tiny.h5")
    s["h5"] = d / "tiny.h5"
    return s


# ------------------------------------------------------------------------------ the table


@dataclass
class Case:
    id: str
    build: Callable  # (work dir, shared) -> CLI argv; may create inputs in the work dir
    needles: tuple  # all must appear in the error line (what was received / what is allowed)


def _export_model(name, content):
    """`probattn export FILE --tokenizer ... --out W/out` with FILE written from content(shared)."""
    def build(w, s):
        f = w / name
        f.write_bytes(content(s))
        return ["export", f, "--tokenizer", s["tok"], "--out", w / "out", "--formats", "onnx",
                "--precisions", "fp32"]
    return build


def _verify_data(name, content: bytes):
    def build(w, s):
        (w / name).write_bytes(content)
        return ["verify", s["bundle"], "--data", w / name, "--report-dir", w / "report"]
    return build


def _tampered(verb, change, *extra):
    """`probattn VERB W/b ...` on a copy of the bundle changed by change(bundle, shared)."""
    def build(w, s):
        b = _copy_bundle(s["bundle"], w / "b")
        change(b, s)
        args = {"predict": ["predict", b, "a fine film", *extra],
                "verify": ["verify", b, "--report-dir", w / "report", *extra],
                "bench": ["bench", b, "--out", w / "bench", "--quick", *extra],
                "package": ["package", b, "--serving", "triton", "--out", w / "out", *extra]}[verb]
        return args
    return build


def _manifest(obj):
    def change(b, s):
        (b / B.MANIFEST).write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return change


def _schema(version):
    def change(b, s):
        m = json.loads((b / B.MANIFEST).read_text())
        m["schema_version"] = version
        (b / B.MANIFEST).write_text(json.dumps(m))
    return change


def _onnx_external_outside(b, s):
    """model_fp32.onnx replaced by a model whose weights live in ../outside.bin (hash updated)."""
    (b.parent / "outside.bin").write_bytes(np.zeros(4, np.float32).tobytes())
    (b / "model_fp32.onnx").write_bytes(_external_data_model("../outside.bin").SerializeToString())
    _set_entry(b, "model_fp32.onnx", sha256=B.sha256_path(b / "model_fp32.onnx"))


def _csv(text: str) -> bytes:
    return text.encode("utf-8")


BAD_INPUT = [
    # --- missing paths, files where directories are expected and the reverse
    Case("predict-bundle-missing", lambda w, s: ["predict", w / "nope", "text"], ("nope", "not found")),
    Case("predict-bundle-is-a-file", lambda w, s: ["predict", s["bundle"] / "manifest.json", "text"],
         ("manifest.json", "received a file")),
    Case("predict-directory-without-manifest", lambda w, s: ["predict", w, "text"], ("is not a bundle", "no manifest.json")),
    Case("predict-input-file-missing", lambda w, s: ["predict", s["bundle"], "--input-file", w / "texts.txt"],
         ("texts.txt", "not found")),
    Case("predict-input-file-is-a-directory", lambda w, s: ["predict", s["bundle"], "--input-file", w],
         ("expected a file, received a directory",)),
    Case("export-source-missing", lambda w, s: ["export", w / "model.keras", "--tokenizer", s["tok"], "--out", w / "out"],
         ("model.keras", "not found")),
    Case("export-source-directory-not-a-model",
         lambda w, s: (w / "empty").mkdir() or ["export", w / "empty", "--tokenizer", s["tok"], "--out", w / "out",
                                                "--formats", "onnx", "--precisions", "fp32"],
         ("empty", "not a SavedModel", ".keras")),
    Case("export-tokenizer-missing", lambda w, s: ["export", s["keras"], "--tokenizer", w / "tok.json", "--out", w / "out",
                                                  "--formats", "onnx", "--precisions", "fp32"],
         ("tok.json", "not found")),
    Case("export-out-is-a-file", lambda w, s: (w / "out").write_text("x") and ["export", s["run"], "--out", w / "out"],
         ("out", "not a directory")),
    Case("train-out-is-a-file",
         lambda w, s: (w / "out").write_text("x") and ["train", "--dataset", s["run"] / "test.jsonl", "--out", w / "out"],
         ("out", "not a directory")),
    Case("verify-bundle-missing", lambda w, s: ["verify", w / "nope", "--report-dir", w / "report"], ("nope", "not found")),
    Case("bench-bundle-missing", lambda w, s: ["bench", w / "nope", "--out", w / "bench"], ("nope", "not found")),
    Case("package-bundle-missing", lambda w, s: ["package", w / "nope", "--out", w / "out"], ("nope", "not found")),
    Case("package-out-is-a-file",
         lambda w, s: (w / "out").write_text("x") and ["package", s["bundle"], "--serving", "triton", "--out", w / "out"],
         ("out", "not a directory")),
    Case("package-unknown-target", lambda w, s: ["package", s["bundle"], "--serving", "kserve", "--out", w / "out"],
         ("'kserve'", "triton, tfserving")),
    Case("package-artifact-tampered", _tampered("package", lambda b, s: (b / "model_fp32.onnx").open("ab").write(b" ")),
         ("model_fp32.onnx", "does not match its manifest hash")),
    Case("predict-unknown-engine", lambda w, s: ["predict", s["bundle"], "text", "--engine", "spark"],
         ("'spark'", "local, ray")),
    # --- damaged model files given to export
    Case("export-keras-empty", _export_model("m.keras", lambda s: b""), ("m.keras", "empty")),
    Case("export-keras-truncated", _export_model("m.keras", lambda s: _half(s["keras"])), ("m.keras", "not a valid .keras")),
    Case("export-keras-garbage", _export_model("m.keras", lambda s: GARBAGE), ("m.keras", "not a valid .keras")),
    Case("export-h5-empty", _export_model("m.h5", lambda s: b""), ("m.h5", "empty")),
    Case("export-h5-truncated", _export_model("m.h5", lambda s: _half(s["h5"])), ("m.h5", "could not be read as an HDF5")),
    Case("export-h5-garbage", _export_model("m.h5", lambda s: GARBAGE), ("m.h5", "not a valid HDF5")),
    Case("export-unsupported-model-suffix", _export_model("m.pt", lambda s: GARBAGE), ("m.pt", ".keras, .h5")),
    # --- bundles: missing or tampered artifacts, damaged runtimes' files behind a matching hash
    Case("predict-artifact-missing", _tampered("predict", lambda b, s: (b / "model_fp32.onnx").unlink()),
         ("model_fp32.onnx", "missing")),
    Case("predict-artifact-tampered",
         _tampered("predict", lambda b, s: (b / "model_fp32.onnx").open("ab").write(b"\0")),
         ("model_fp32.onnx", "does not match its manifest hash")),
    Case("predict-tokenizer-tampered",
         _tampered("predict", lambda b, s: (b / "tokenizer.json").open("ab").write(b" ")),
         ("tokenizer.json", "does not match its manifest hash")),
    Case("predict-manifest-path-escapes-bundle",
         _tampered("predict", lambda b, s: _set_entry(b, "model_fp32.onnx", path="../model_fp32.onnx")),
         ("../model_fp32.onnx", "outside the bundle")),
    Case("predict-onnx-external-data-outside", _tampered("predict", _onnx_external_outside),
         ("../outside.bin", "outside")),
    Case("predict-onnx-empty",
         _tampered("predict", lambda b, s: _replace_artifact(b, "model_fp32.onnx", b"", rehash=True)),
         ("model_fp32.onnx", "not a valid ONNX model")),
    Case("predict-onnx-truncated",
         _tampered("predict", lambda b, s: _replace_artifact(b, "model_fp32.onnx", _half(b / "model_fp32.onnx"), True)),
         ("model_fp32.onnx", "not a valid ONNX model")),
    Case("predict-onnx-garbage",
         _tampered("predict", lambda b, s: _replace_artifact(b, "model_fp32.onnx", GARBAGE, rehash=True)),
         ("model_fp32.onnx", "not a valid ONNX model")),
    Case("predict-tflite-empty",
         _tampered("predict", lambda b, s: _replace_artifact(b, "model_fp32.tflite", b"", rehash=True),
                   "--runtime", "litert"),
         ("model_fp32.tflite", "not a valid TFLite model")),
    Case("predict-tflite-truncated",
         _tampered("predict", lambda b, s: _replace_artifact(b, "model_fp32.tflite", _half(b / "model_fp32.tflite"), True),
                   "--runtime", "litert"),
         ("model_fp32.tflite", "not a valid TFLite model")),
    Case("predict-tflite-garbage",
         _tampered("predict", lambda b, s: _replace_artifact(b, "model_fp32.tflite", GARBAGE, rehash=True),
                   "--runtime", "litert"),
         ("model_fp32.tflite", "not a valid TFLite model")),
    Case("verify-artifact-tampered",
         _tampered("verify", lambda b, s: (b / "model_int8.tflite").open("ab").write(b"\0")),
         ("model_int8.tflite", "does not match its manifest hash")),
    Case("bench-artifact-missing", _tampered("bench", lambda b, s: (b / "model_fp16.onnx").unlink()),
         ("model_fp16.onnx", "missing")),
    # --- manifests
    Case("predict-manifest-newer-schema", _tampered("predict", _schema(99)), ("schema_version 99", "up to 2")),
    Case("verify-manifest-newer-schema", _tampered("verify", _schema(99)), ("schema_version 99", "up to 2")),
    Case("predict-manifest-not-json", _tampered("predict", _manifest("{'artifacts': [")), ("manifest.json", "not valid JSON")),
    Case("predict-manifest-not-an-object", _tampered("predict", _manifest([1, 2])), ("manifest.json", "received list")),
    # --- data: dataset names, CSV and JSONL problems (through verify --data, export --calibration-data, train)
    Case("train-unknown-dataset", lambda w, s: ["train", "--dataset", "imdb", "--out", w / "out"],
         ("'imdb'", "rotten_tomatoes, bbc_news")),
    Case("verify-unknown-dataset", lambda w, s: ["verify", s["bundle"], "--data", "imdb", "--report-dir", w / "report"],
         ("'imdb'", "rotten_tomatoes, bbc_news")),
    Case("export-calibration-unknown-dataset",
         lambda w, s: ["export", s["run"], "--out", w / "out", "--calibration-data", "imdb"],
         ("'imdb'", "rotten_tomatoes, bbc_news")),
    Case("csv-empty", _verify_data("d.csv", b""), ("d.csv", "empty")),
    Case("csv-header-only", _verify_data("d.csv", b"text,label\n"), ("d.csv", "no rows")),
    Case("csv-missing-column", _verify_data("d.csv", _csv("review,label\ngood,pos\nbad,neg\n")),
         ("no column 'text'", "review, label")),
    Case("csv-single-class", _verify_data("d.csv", _csv("text,label\ngood,pos\nfine,pos\n")), ("single class", "'pos'")),
    Case("csv-empty-text", _verify_data("d.csv", _csv("text,label\ngood,pos\n   ,neg\n")), ("line 3", "empty text")),
    Case("csv-non-utf8", _verify_data("d.csv", "text,label\ncafé,pos\nbad,neg\n".encode("latin-1")),
         ("d.csv", "not valid utf-8", "0xe9")),
    Case("csv-1mb-line", _verify_data("d.csv", _csv("text,label\n" + "a" * 1_000_000 + ",pos\nbad,neg\n")),
         ("1,000,000 characters", "100,000")),
    Case("jsonl-invalid-line", _verify_data("d.jsonl", _csv('{"text": "good", "label": "pos"}\n{"text": bad}\n')),
         ("d.jsonl", "line 2", "not valid JSON")),
    Case("data-path-is-a-directory",
         lambda w, s: (w / "d.csv").mkdir() or ["verify", s["bundle"], "--data", w / "d.csv", "--report-dir", w / "report"],
         ("d.csv", "received a directory")),
    # --- out-of-range options
    Case("export-opset-99", lambda w, s: ["export", s["run"], "--out", w / "out", "--opset", "99"], ("99", "13 to 18")),
    Case("export-unknown-precision", lambda w, s: ["export", s["run"], "--out", w / "out", "--precisions", "fp32,int4"],
         ("'int4'", "fp32, fp16, int8-dynamic, int8")),
    Case("export-unknown-format", lambda w, s: ["export", s["run"], "--out", w / "out", "--formats", "coreml"],
         ("'coreml'", "savedmodel, tflite, tflite-fixed, mediapipe, onnx")),
    Case("verify-unknown-format", lambda w, s: ["verify", s["bundle"], "--formats", "coreml", "--report-dir", w / "r"],
         ("'coreml'", "savedmodel, tflite, tflite-fixed, mediapipe, onnx")),
    Case("predict-unknown-runtime", lambda w, s: ["predict", s["bundle"], "text", "--runtime", "tensorrt"],
         ("'tensorrt'", "litert, tflm, onnxruntime, openvino")),
    Case("predict-unknown-precision", lambda w, s: ["predict", s["bundle"], "text", "--precision", "int4"],
         ("'int4'", "fp32, fp16, int8-dynamic, int8")),
    Case("predict-negative-batch-size", lambda w, s: ["predict", s["bundle"], "text", "--batch-size", "-1"],
         ("--batch-size", "-1", "positive integer")),
    Case("train-zero-epochs", lambda w, s: ["train", "--out", w / "out", "--epochs", "0"],
         ("--epochs", "received 0", "positive integer")),
    Case("bench-zero-threads", lambda w, s: ["bench", s["bundle"], "--out", w / "bench", "--threads", "0"],
         ("'0'", "positive integers and 'all'")),
    Case("bench-threads-not-a-number", lambda w, s: ["bench", s["bundle"], "--out", w / "bench", "--threads", "1,abc"],
         ("'abc'", "positive integers and 'all'")),
    Case("bench-unknown-runtime", lambda w, s: ["bench", s["bundle"], "--out", w / "bench", "--runtimes", "tensorrt"],
         ("tensorrt", "keras, savedmodel, litert, tflm, onnxruntime, openvino, mediapipe")),
]

#: the families above, for the README's 'Guarantees' section
BAD_INPUT_FAMILIES = [c.id for c in BAD_INPUT]


@pytest.fixture(scope="module")
def bad_input_results(shared, tmp_path_factory):
    """Build every case's inputs in its own directory, then run all CLIs a few at a time."""
    root = tmp_path_factory.mktemp("bad")
    shared_before = {k: _snapshot(shared[k]) for k in ("bundle", "run")}
    jobs = {}
    for case in BAD_INPUT:
        w = root / case.id
        w.mkdir()
        argv = case.build(w, shared)
        jobs[case.id] = (w, argv, _snapshot(w))

    def run(item):
        case_id, (w, argv, before) = item
        return case_id, run_cli(*argv, timeout=300)

    with ThreadPoolExecutor(max_workers=(os.cpu_count() or 2) + 2) as pool:
        procs = dict(pool.map(run, jobs.items()))
    results = {cid: (procs[cid], w, argv, before, _snapshot(w)) for cid, (w, argv, before) in jobs.items()}
    results["__shared__"] = (shared_before, {k: _snapshot(shared[k]) for k in ("bundle", "run")})
    return results


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c.id for c in BAD_INPUT])
def test_bad_input_exits_2_with_one_line(case, bad_input_results):
    proc, w, argv, before, after = bad_input_results[case.id]
    where = f"probattn {' '.join(map(str, argv))}\nstdout: {proc.stdout[-1500:]}\nstderr: {proc.stderr[-3000:]}"
    verb = str(argv[0])
    line = assert_one_error_line(proc, verb, stdout_empty=True)
    assert len(proc.stderr.splitlines()) == 1, f"expected exactly one stderr line\n{where}"
    for needle in case.needles:
        assert needle.lower() in line.lower(), f"{needle!r} missing\n{where}"
    assert before == after, f"the failed command wrote files: {sorted(set(after) ^ set(before))}\n{where}"
    for out in ("out", "report", "bench", "r"):
        if (w / out).exists():  # only the export/train-out-is-a-file cases create it beforehand
            assert (w / out).is_file() and (w / out).read_text() == "x", where


def test_bad_input_leaves_shared_inputs_untouched(bad_input_results):
    before, after = bad_input_results["__shared__"]
    assert before == after


def test_bad_input_table_is_broad():
    assert len(BAD_INPUT_FAMILIES) >= 30 and len(set(BAD_INPUT_FAMILIES)) == len(BAD_INPUT_FAMILIES)
    ids = " ".join(BAD_INPUT_FAMILIES)  # every verb has its own cases
    for verb in ("train", "export", "verify", "predict", "package", "bench"):
        assert f"{verb}-" in ids, verb


# ------------------------------------------------------------------------------ untrusted models


def _lambda_model():
    import tf_keras as keras

    base = tiny_classifier(flavour="2")
    out = keras.layers.Lambda(lambda p: p * 1.0, name="rescale")(base.output)
    return keras.Model(base.inputs, out)


@pytest.fixture(scope="module")
def lambda_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lambda")
    model = _lambda_model()
    model.save(d / "lambda.keras")
    model.save(d / "lambda.h5")
    from probattn.models.text.tokenizer import train_tokenizer

    train_tokenizer(["a good film", "a bad film", "fine acting"], vocab_size=50).save(str(d / "tokenizer.json"))
    return d


def test_lambda_keras_refused_by_cli(lambda_files, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("export", lambda_files / "lambda.keras", "--tokenizer", lambda_files / "tokenizer.json",
                   "--out", out, "--formats", "onnx", "--precisions", "fp32")
    line = assert_one_error_line(proc, "export")
    assert "Lambda" in line and "--unsafe" in line and "lambda.keras" in line, line
    assert not out.exists() and not list(tmp_path.glob(f"{TMP_PREFIX}*"))


_UNREGISTERED_SCRIPT = """
import sys
import tf_keras as keras

@keras.saving.register_keras_serializable(package="elsewhere")
class Doubler(keras.layers.Layer):
    def call(self, x):
        return x * 2.0

inp = keras.Input((None,), dtype="int32", name="token_ids")
h = keras.layers.Embedding(50, 4)(inp)
h = Doubler()(h)
h = keras.layers.GlobalAveragePooling1D()(h)
out = keras.layers.Dense(2, activation="softmax", name="probabilities")(h)
keras.Model(inp, out).save(sys.argv[1])
"""


def test_unregistered_custom_class_named_in_the_error(lambda_files, tmp_path):
    """tf-keras reports an unknown registered class as "'str' object is not callable";
    probattn names the class instead."""
    path = tmp_path / "custom.keras"
    subprocess.run([sys.executable, "-c", _UNREGISTERED_SCRIPT, str(path)], check=True,
                   capture_output=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    out = tmp_path / "out"
    proc = run_cli("export", path, "--tokenizer", lambda_files / "tokenizer.json", "--out", out,
                   "--formats", "onnx", "--precisions", "fp32")
    line = assert_one_error_line(proc, "export")
    assert "elsewhere>Doubler" in line and "nor registered" in line and "--custom-objects" in line, line
    assert not out.exists()


def test_lambda_h5_refused(lambda_files, tmp_path):
    from probattn.export.exporter import ExportOptions, export

    with pytest.raises(UsageError, match=r"Lambda layer \(rescale\).*--unsafe"):
        export(lambda_files / "lambda.h5", tmp_path / "out",
               ExportOptions(tokenizer=str(lambda_files / "tokenizer.json"), formats=("onnx",), precisions=("fp32",)))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["lambda.keras", "lambda.h5"])
def test_lambda_model_exports_with_unsafe(lambda_files, tmp_path, name):
    from probattn.export.exporter import ExportOptions, export

    out = tmp_path / "out"
    export(lambda_files / name, out, ExportOptions(tokenizer=str(lambda_files / "tokenizer.json"), formats=("onnx",),
                                                   precisions=("fp32",), unsafe=True))
    manifest = _assert_valid_bundle(out)
    assert {(a["format"], a["precision"]) for a in manifest["artifacts"]} == {("keras", "fp32"), ("onnx", "fp32")}


def test_keras_config_naming_a_foreign_module_is_refused(tmp_path, shared, monkeypatch):
    """tf_keras' safe mode stops only lambdas: config.json may name any module as the model's
    "module", and tf_keras imports it (running its top-level code) even in safe mode. Refused
    unless --unsafe. (Keras 3 does not import such modules: its files fail as unresolved.)"""
    import zipfile

    from probattn.export.loading import load_keras_model

    marker = tmp_path / "imported"
    (tmp_path / "probattn_robust_side_effect.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom tf_keras import Model as Classifier\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tiny_classifier(flavour="2").save(tmp_path / "tf_keras_model.keras")
    src = zipfile.ZipFile(tmp_path / "tf_keras_model.keras")
    config = json.loads(src.read("config.json"))
    # the model's own class, looked up in a module of the file's choosing
    config.update(module="probattn_robust_side_effect", class_name="Classifier", registered_name="Classifier")
    evil = tmp_path / "evil.keras"
    with zipfile.ZipFile(evil, "w") as z:
        for n in src.namelist():
            z.writestr(n, json.dumps(config) if n == "config.json" else src.read(n))
    with pytest.raises(UsageError, match=r"module\(s\) probattn_robust_side_effect .*--unsafe"):
        load_keras_model(evil)
    assert not marker.exists(), "the module named in config.json was imported in safe mode"
    try:  # the user's explicit choice: Keras imports the module (whether or not the model then loads)
        load_keras_model(evil, unsafe=True)
    except UsageError:
        pass
    assert marker.exists(), "Keras did not import the module: this test no longer shows the risk"
    sys.modules.pop("probattn_robust_side_effect", None)


def _external_data_model(location: str, via_constant: bool = False):
    """y = float(token_ids + c) (int32 [batch, sequence] in), c: int32[1] stored in external file
    `location`."""
    from onnx import TensorProto, helper

    c = TensorProto(name="c", data_type=TensorProto.INT32, dims=[1], data_location=TensorProto.EXTERNAL)
    entry = c.external_data.add()
    entry.key, entry.value = "location", location
    x = helper.make_tensor_value_info("token_ids", TensorProto.INT32, ["batch", "sequence"])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", "sequence"])
    nodes = [helper.make_node("Add", ["token_ids", "c"], ["sum"]),
             helper.make_node("Cast", ["sum"], ["probabilities"], to=TensorProto.FLOAT)]
    inits = [c]
    if via_constant:  # the tensor sits in a Constant node's attribute, not in the initializers
        nodes.insert(0, helper.make_node("Constant", [], ["c"], value=c))
        inits = []
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("location,via_constant", [
    ("../outside.bin", False), ("ABSOLUTE", False), ("link.bin", False), ("../outside.bin", True),
], ids=["parent-dir", "absolute-path", "symlink-out", "constant-node-attribute"])
def test_onnx_external_data_outside_the_folder_is_refused(tmp_path, location, via_constant):
    from probattn.export.runtimes.onnxruntime import OnnxRuntimeRunner as OnnxRunner

    model_dir = tmp_path / "bundle"
    model_dir.mkdir()
    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.array([7], np.int32).tobytes())
    (model_dir / "link.bin").symlink_to(outside)
    location = str(outside) if location == "ABSOLUTE" else location
    path = model_dir / "m.onnx"
    path.write_bytes(_external_data_model(location, via_constant).SerializeToString())
    with pytest.raises(UsageError, match="outside") as ei:
        OnnxRunner(path).activate()
    assert location in str(ei.value)


@pytest.mark.parametrize("via_constant", [False, True], ids=["initializer", "constant-node-attribute"])
def test_onnx_external_data_inside_the_folder_loads(tmp_path, via_constant):
    from probattn.export.runtimes.onnxruntime import OnnxRuntimeRunner as OnnxRunner

    (tmp_path / "weights.bin").write_bytes(np.array([7], np.int32).tobytes())
    path = tmp_path / "m.onnx"
    path.write_bytes(_external_data_model("weights.bin", via_constant).SerializeToString())
    with OnnxRunner(path) as r:
        got = r.infer(np.array([[1, 2, 3]], np.int32))["probabilities"]
    np.testing.assert_array_equal(got, [[8, 9, 10]])


# ------------------------------------------------------------------------------ interruptions


def _cli_popen(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "probattn.export.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(predicate, proc, what, timeout=180):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the child ended (exit {proc.returncode}) before {what}:\n{err[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _processes_mentioning(text: str) -> list:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text in (p / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(p.name))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("sig,when", [
    (signal.SIGKILL, "model_fp32.tflite"),  # the TFLite conversions are under way (in the exporter)
    (signal.SIGINT, "model_fp32.tflite"),
    (signal.SIGINT, "model_int8.onnx"),  # ONNX done: the TFLite conversions start
    (signal.SIGTERM, "model_fp32.tflite"),  # what `kill`, systemd and CI runners send
    (signal.SIGHUP, "model_int8.onnx"),  # the terminal went away
], ids=["SIGKILL-converting", "SIGINT-converting", "SIGINT-after-onnx", "SIGTERM-converting", "SIGHUP-after-onnx"])
def test_interrupted_export_leaves_existing_bundle_intact(sig, when, bundle_dir, shared, tmp_path):
    from probattn.export.exporter import ExportOptions, export

    target = _copy_bundle(bundle_dir, tmp_path / "B")
    before = _hashes(target)
    proc = _cli_popen("export", shared["run"], "--out", target, "--overwrite")
    # mid-export: the temporary bundle holds the SavedModel and ONNX, and the TFLite conversions have started
    tmp = _wait_for(lambda: next(iter(tmp_path.glob(f"{TMP_PREFIX}B-*/{when}")), None), proc,
                    f"{when} appeared in the temporary bundle").parent
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        # no child of the export (a runtime worker) outlives it (it would work on in a dead run's directory)
        t_end = time.monotonic() + 10
        while _processes_mentioning(str(tmp)) and time.monotonic() < t_end:
            time.sleep(0.1)
        assert not _processes_mentioning(str(tmp)), "a child process outlived the killed export"
    else:
        assert proc.returncode == 128 + sig, err[-3000:]
        what = "interrupted" if sig == signal.SIGINT else f"terminated by {signal.Signals(sig).name}"
        assert err.splitlines()[-1] == f"probattn export: {what}; nothing was written", err[-3000:]
        assert "Traceback" not in err
        assert not _leftovers(tmp_path, "B"), f"{signal.Signals(sig).name} left a temporary directory"
    assert _hashes(target) == before, "the existing bundle changed"
    _assert_valid_bundle(target)
    # the next writer cleans up what a killed run left, and succeeds
    export(shared["run"], target, ExportOptions(formats=("onnx",), precisions=("fp32",), overwrite=True))
    manifest = _assert_valid_bundle(target)
    assert {a["format"] for a in manifest["artifacts"]} == {"keras", "onnx"}
    assert not _leftovers(tmp_path, "B")


@pytest.mark.parametrize("pass_pid", [True, False], ids=["PROBATTN_PARENT_PID", "getppid"])
def test_runtime_worker_exits_when_its_parent_is_killed(tmp_path, pass_pid):
    """The run check and verify run runtimes in a worker process; SIGKILL of the exporter runs
    no cleanup, so the worker must notice on its own instead of running on for a dead run."""
    child = ("import time; from probattn.export.runtimes.isolated import _exit_with_parent; "
             "_exit_with_parent(); time.sleep(120)")
    parent = ("import os, subprocess, sys; env = dict(os.environ)\n"
              f"if {pass_pid}: env['PROBATTN_PARENT_PID'] = str(os.getpid())\n"
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}], env=env)\n"
              "print(p.pid, flush=True); p.wait()")
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    time.sleep(1.0)  # the child is running its watchdog
    assert Path(f"/proc/{pid}").exists()
    proc.kill()
    proc.wait()
    t_end = time.monotonic() + 10
    while time.monotonic() < t_end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            break  # gone (reaped by init)
        if state == "Z":
            break  # exited; waiting to be reaped
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the runtime worker outlived its killed parent by 10 s")


@pytest.fixture(scope="module")
def slow_csv(tmp_path_factory):
    """Enough rows that one epoch at batch size 1 takes many seconds."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(200)]
    path = tmp_path_factory.mktemp("slow") / "slow.csv"
    rows = ["text,label"] + [f"{' '.join(rng.choice(words, 12))},{'ab'[i % 2]}" for i in range(20000)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_sigint_during_training_writes_nothing(slow_csv, tmp_path):
    out = tmp_path / "RUN"
    proc = _cli_popen("train", "--dataset", slow_csv, "--out", out, "--epochs", "3", "--batch-size", "1",
                      "--vocab-size", "300", "--embedding-dim", "8", "--max-length", "16")
    # Keras announces the first epoch on stdout (non-tty: verbose=2) when fit() starts
    lines = []

    def epoch_started():
        line = proc.stdout.readline()
        lines.append(line)
        return "Epoch 1/" in line

    _wait_for(epoch_started, proc, "training started")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.splitlines()[-1] == "probattn train: interrupted; nothing was written", err[-3000:]
    assert not out.exists()
    assert not _leftovers(tmp_path, "RUN")


def test_export_refused_while_another_writer_holds_the_lock(shared, tmp_path):
    """Deterministic: the test holds the writer lock, so the export must lose."""
    from probattn.models.fsutil import directory_lock

    target = tmp_path / "B"
    with directory_lock(target):
        proc = run_cli("export", shared["run"], "--out", target, "--formats", "onnx", "--precisions", "fp32")
    line = assert_one_error_line(proc, "export")
    assert line == (f"probattn export: error: another probattn process is writing or "
                    f"verifying {target}; wait for it to finish or choose another --out"), line
    assert not target.exists() and not _leftovers(tmp_path, "B")


def test_concurrent_exports_to_one_bundle(shared, tmp_path):
    """Two real exports at once: whichever order they run in, the result is one valid bundle."""
    target = tmp_path / "B"
    args = ("export", shared["run"], "--out", target, "--overwrite", "--formats", "onnx", "--precisions", "fp32")
    procs = [_cli_popen(*args), _cli_popen(*args)]
    results = [(p.returncode, out, err) for p in procs for out, err in [p.communicate(timeout=300)]]
    codes = sorted(r[0] for r in results)
    assert codes in ([0, 0], [0, 2]), [r[2][-2000:] for r in results]
    for code, out, err in results:
        if code == 2:  # lost the race for the lock: a clear error, not a corrupt bundle
            assert "Traceback" not in err, err
            assert err.splitlines()[-1] == (f"probattn export: error: another probattn process is writing or "
                                            f"verifying {target}; wait for it to finish or choose another --out"), err
    manifest = _assert_valid_bundle(target)
    assert {a["format"] for a in manifest["artifacts"]} == {"keras", "onnx"}
    assert not _leftovers(tmp_path, "B")


# ------------------------------------------------------------------------------ atomic directories


def test_stale_cleanup_spares_other_targets_with_a_longer_name(tmp_path):
    from probattn.models.fsutil import atomic_directory

    stale = tmp_path / f"{TMP_PREFIX}b-zz9_abcd"  # left by a killed writer of 'b'
    other = tmp_path / f"{TMP_PREFIX}b-2-k3j4h5g6"  # a live writer of 'b-2' (its own lock)
    for d in (stale, other):
        d.mkdir()
        (d / "f").write_text("x")
    with atomic_directory(tmp_path / "b") as tmp:
        (tmp / "result").write_text("new")
    assert (tmp_path / "b" / "result").read_text() == "new"
    assert not stale.exists()
    assert (other / "f").read_text() == "x", "another target's temporary directory was deleted"


@pytest.mark.parametrize("overwrite", [True, False])
def test_backup_left_between_the_final_renames_is_restored(tmp_path, overwrite):
    """A writer killed after moving the old result aside and before moving the new one in
    leaves the old result only as its backup: the next writer puts it back instead of
    deleting it, and it survives that writer's failure too."""
    from probattn.models.fsutil import atomic_directory

    backup = tmp_path / f"{TMP_PREFIX}b-old-4242"
    backup.mkdir()
    (backup / "manifest.json").write_text("old")
    with pytest.raises((RuntimeError, UsageError)) as ei:
        with atomic_directory(tmp_path / "b", overwrite=overwrite):
            raise RuntimeError("the export failed")
    if not overwrite:  # the restored result is an existing, non-empty output
        assert "already exists" in str(ei.value)
    assert (tmp_path / "b" / "manifest.json").read_text() == "old"
    assert not backup.exists()


def test_train_checks_out_before_loading_data(tmp_path, monkeypatch):
    from probattn.models.text import data
    from probattn.models.train import TrainConfig, train

    def never(*a, **k):
        raise AssertionError("the data was loaded before --out was checked")

    monkeypatch.setattr(data, "load_dataset", never)
    (tmp_path / "RUN").mkdir()
    (tmp_path / "RUN" / "keep").write_text("x")
    with pytest.raises(UsageError, match=r"already exists.*--overwrite"):
        train(TrainConfig(dataset="rotten_tomatoes"), tmp_path / "RUN")
    assert (tmp_path / "RUN" / "keep").read_text() == "x"


def test_export_checks_out_before_loading_the_model(tmp_path, shared, monkeypatch):
    from probattn.export import loading
    from probattn.export.exporter import ExportOptions, export

    def never(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(loading, "load_keras_model", never)
    (tmp_path / "B").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        export(shared["run"], tmp_path / "B", ExportOptions(formats=("onnx",), precisions=("fp32",)))
    assert (tmp_path / "B").read_text() == "x"

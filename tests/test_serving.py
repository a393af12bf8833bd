"""``probattn package``: a Triton model repository and a TF Serving versioned SavedModel from
the session bundle, validated as far as possible without either server (none installs
here): config.pbtxt parsed into Triton's own ModelConfig protobuf and checked against the
ONNX session; the TF Serving folder loaded with the TF1 session loader TF Serving uses, its
signature run against Keras. Also the int64 ONNX twins the Triton layout can use."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helpers import assert_one_error_line, run_cli
from probattn.export import contract as C
from probattn.export.parity.tolerances import FP32_MAX_ABS, FP32_PAD_INVARIANCE
from probattn.export.serving import (SERVING_MANIFEST, check_triton, package, parse_triton_config,
                                     run_tf1_signature)
from probattn.models.errors import UsageError


@pytest.fixture(scope="module")
def served(bundle_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("serving") / "out"
    summary = package(bundle_dir, out, log=lambda m: None)
    return out, summary


@pytest.fixture(scope="module")
def heldout_ids(bundle_dir):
    from probattn.export.predict import Predictor

    texts = [json.loads(l)["text"] for l in (bundle_dir / "test.jsonl").read_text().splitlines()][:256]
    return Predictor(bundle_dir).encode(texts)


# ------------------------------------------------------------------------------- Triton

def test_triton_repository(served, bundle_dir, manifest):
    out, summary = served
    model = out / "triton" / "probattn"
    assert sorted(p.relative_to(model).as_posix() for p in model.rglob("*")) == [
        "1", "1/model.onnx", "config.pbtxt", "labels.txt"]
    assert (model / "1" / "model.onnx").read_bytes() == (bundle_dir / "model_fp32.onnx").read_bytes()
    assert (model / "labels.txt").read_text().splitlines() == manifest["labels"]
    assert (model / "labels.txt").read_bytes() == (bundle_dir / "labels.txt").read_bytes()  # the bundle's file
    cfg = parse_triton_config((model / "config.pbtxt").read_text())
    assert cfg.name == "probattn" and cfg.backend == "onnxruntime" and cfg.max_batch_size == 64
    assert cfg.HasField("dynamic_batching")
    assert [(i.name, list(i.dims)) for i in cfg.input] == [(C.INPUT, [-1])]
    assert [(o.name, list(o.dims), o.label_filename) for o in cfg.output] == [
        (C.PROBABILITIES, [len(manifest["labels"])], "labels.txt"), (C.ATTENTION, [-1], "")]
    assert check_triton(model) == []
    assert summary["targets"]["triton"]["check"].startswith("config.pbtxt parsed as Triton's ModelConfig")
    assert json.loads((out / SERVING_MANIFEST).read_text()) == summary


@pytest.mark.parametrize("edit,needle", [
    (("max_batch_size", "max_batch_sise"), "does not parse"),
    (("TYPE_INT32", "TYPE_INT64"), "input token_ids: config TYPE_INT64, model tensor(int32)"),
    (("dims: [ 2 ]", "dims: [ 3 ]"), "output probabilities: config dims [3]"),
    (('name: "attention_weights"', 'name: "attention"'), "outputs ['attention', 'probabilities'] in the config"),
    (('backend: "onnxruntime"', 'backend: "tensorflow"'), "expected backend onnxruntime"),
    (("max_batch_size: 64", "max_batch_size: 0"), "dynamic_batching needs max_batch_size > 0"),
], ids=["typo", "dtype", "dims", "name", "backend", "no-batch"])
def test_triton_check_finds_mistakes(served, tmp_path, edit, needle):
    model = tmp_path / "probattn"
    shutil.copytree(served[0] / "triton" / "probattn", model)
    path = model / "config.pbtxt"
    text = path.read_text()
    assert edit[0] in text
    path.write_text(text.replace(edit[0], edit[1]))
    problems = check_triton(model)
    assert any(needle in p for p in problems), problems


def test_triton_label_file_must_match_the_classes(served, tmp_path):
    model = tmp_path / "probattn"
    shutil.copytree(served[0] / "triton" / "probattn", model)
    (model / "labels.txt").write_text("only-one\n")
    assert any("labels.txt has 1 labels" in p for p in check_triton(model))


def test_triton_requests_padded_to_max_length_give_the_same_probabilities(served, manifest, heldout_ids):
    """Triton batches requests of equal shape only, so clients pad to the max length: the
    model file in the repository gives the same probabilities padded (within the padding
    invariance bound). The request a client would build is made with tritonclient."""
    import onnxruntime as ort
    import tritonclient.grpc as grpcclient

    sess = ort.InferenceSession(str(served[0] / "triton" / "probattn" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    length = manifest["max_length"]
    padded = np.zeros((len(heldout_ids), length), np.int32)
    padded[:, :heldout_ids.shape[1]] = heldout_ids
    (a,) = sess.run([C.PROBABILITIES], {C.INPUT: heldout_ids})
    (b,) = sess.run([C.PROBABILITIES], {C.INPUT: padded})
    np.testing.assert_allclose(b, a, rtol=0, atol=FP32_PAD_INVARIANCE)
    request = grpcclient.InferInput(C.INPUT, list(padded[:1].shape), "INT32")
    request.set_data_from_numpy(padded[:1])
    assert request.shape() == [1, length] and request.datatype() == "INT32"


def test_triton_int64_layout(bundle_dir, tmp_path):
    summary = package(bundle_dir, tmp_path / "out", targets="triton", input_dtype="int64", name="clf",
                      log=lambda m: None)
    model = tmp_path / "out" / "triton" / "clf"
    assert (model / "1" / "model.onnx").read_bytes() == (bundle_dir / "model_fp32_int64.onnx").read_bytes()
    assert "data_type: TYPE_INT64" in (model / "config.pbtxt").read_text() and check_triton(model) == []
    assert summary["targets"]["triton"]["input_dtype"] == "int64"
    assert not (tmp_path / "out" / "tfserving").exists()


def test_int64_twins_equal_the_int32_files(bundle_dir, manifest, heldout_ids):
    """Every ONNX precision has an int64-input twin (a Cast in front): the same outputs for
    the same ids, on onnxruntime, exactly."""
    import onnxruntime as ort

    from probattn.export import bundle as B

    twins = [a for a in manifest["artifacts"] if C.input_dtype_of(a) == "int64"]
    assert sorted(a["precision"] for a in twins) == sorted(C.SUPPORTED["onnx"])
    for twin in twins:
        assert twin["format"] == "onnx" and twin["path"] == f"model_{twin['precision']}_int64.onnx"
        base = B.find_artifact(manifest, "onnx", twin["precision"])
        s64 = ort.InferenceSession(str(B.verified_path(bundle_dir, twin)), providers=["CPUExecutionProvider"])
        s32 = ort.InferenceSession(str(B.verified_path(bundle_dir, base)), providers=["CPUExecutionProvider"])
        assert [i.type for i in s64.get_inputs()] == ["tensor(int64)"]
        assert [o.name for o in s64.get_outputs()] == [o.name for o in s32.get_outputs()]
        out64 = s64.run(None, {C.INPUT: heldout_ids.astype(np.int64)})
        out32 = s32.run(None, {C.INPUT: heldout_ids})
        for x, y in zip(out64, out32):
            np.testing.assert_array_equal(x, y, err_msg=f"{twin['path']} vs {base['path']}")
        with pytest.raises(Exception, match="int64"):  # why the twin exists
            s32.run(None, {C.INPUT: heldout_ids.astype(np.int64)})


def test_int64_twins_pass_verify(parity_report):
    """verify runs the twins like every artifact, on every runtime that reads ONNX."""
    rows = {(r["artifact"], r["runtime"]): r["passed"] for r in parity_report.rows}
    for precision in C.SUPPORTED["onnx"]:
        for runtime in ("onnxruntime-all", "onnxruntime-none"):
            assert rows.get((f"model_{precision.replace('-', '_')}_int64.onnx", runtime)) is True, sorted(rows)


# --------------------------------------------------------------------------- TF Serving

def test_tfserving_model(served, bundle_dir, manifest, heldout_ids):
    from probattn.export.loading import load_keras_model

    out, summary = served
    version = out / "tfserving" / "probattn" / "1"
    assert (version / "saved_model.pb").is_file() and (version / "variables" / "variables.index").is_file()
    assets = version / "assets"
    files = ["labels.txt", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    assert sorted(p.name for p in assets.iterdir()) == files
    for name in files:  # the bundle's own files (labels.txt and vocab.txt are export's, for devices too)
        assert (assets / name).read_bytes() == (bundle_dir / name).read_bytes()
    assert (assets / "labels.txt").read_text().splitlines() == manifest["labels"]
    out_tf1, listed = run_tf1_signature(version, heldout_ids)
    assert listed == files, "assets not tracked in the MetaGraph"
    keras = load_keras_model(bundle_dir / "model.keras")
    np.testing.assert_allclose(out_tf1[C.PROBABILITIES], keras(heldout_ids, training=False).numpy(),
                               rtol=0, atol=FP32_MAX_ABS, err_msg="TF Serving signature vs Keras")
    assert set(out_tf1) == {C.PROBABILITIES, C.ATTENTION}
    assert "TF1 session loader" in summary["targets"]["tfserving"]["check"]


# ------------------------------------------------------------------------- CLI and errors

def test_package_cli_triton(bundle_dir, tmp_path):
    proc = run_cli("package", bundle_dir, "--serving", "triton", "--out", tmp_path / "out", "--precision", "int8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("triton: ") and "matches the ONNX session" in proc.stdout
    model = tmp_path / "out" / "triton" / "probattn"
    assert (model / "1" / "model.onnx").read_bytes() == (bundle_dir / "model_int8.onnx").read_bytes()
    again = run_cli("package", bundle_dir, "--serving", "triton", "--out", tmp_path / "out")
    assert "already exists" in assert_one_error_line(again, "package")
    assert run_cli("package", bundle_dir, "--serving", "triton", "--out", tmp_path / "out", "--overwrite").returncode == 0


@pytest.mark.parametrize("kwargs,needle", [
    ({"targets": "kserve"}, "unknown serving target 'kserve'; allowed: triton, tfserving"),
    ({"precision": "int8-dynamic", "targets": "triton"}, "no onnx int8-dynamic artifact"),
    ({"input_dtype": "int16"}, "unknown input dtype 'int16'"),
    ({"input_dtype": "int64", "targets": "tfserving"}, "for triton only"),
    ({"name": "../up"}, "--name must be"),
    ({"version": 0}, "--version must be a positive integer"),
], ids=["target", "precision", "dtype", "dtype-tfserving", "name", "version"])
def test_package_refuses_bad_options(bundle_dir, tmp_path, kwargs, needle):
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        package(bundle_dir, tmp_path / "out", log=lambda m: None, **kwargs)
    assert not (tmp_path / "out").exists()


def test_package_refuses_a_tampered_bundle(bundle_dir, tmp_path):
    bad = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bad)
    data = bytearray((bad / "model_fp32.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (bad / "model_fp32.onnx").write_bytes(bytes(data))
    line = assert_one_error_line(run_cli("package", bad, "--serving", "triton", "--out", tmp_path / "out"), "package")
    assert "model_fp32.onnx does not match its manifest hash" in line
    assert not (tmp_path / "out").exists()

"""Predict: the Predictor and `probattn predict` on onnxruntime and LiteRT, without TensorFlow,
with padding that never changes a result, hash-checked artifacts and clear input errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import assert_one_error_line, run_cli
from probattn.models.errors import UsageError
from probattn.export.parity.tolerances import FP32_MAX_ABS
from probattn.export.predict import Predictor

PAIRS = [("onnxruntime", "fp32"), ("onnxruntime", "fp16"), ("onnxruntime", "int8"),
         ("litert", "fp32"), ("litert", "fp16"), ("litert", "int8-dynamic"), ("litert", "int8")]
TEXTS = ["bad",
         "a gripping, funny and warm film",
         "the plot meanders for two hours and the actors look as bored as the audience , "
         "which is a shame because the first act promised a sharp , clever comedy about ambition",
         "great",
         "not the worst movie of the year , but close"]


@pytest.fixture(scope="module")
def predictors(bundle_dir):
    cache = {}

    def get(runtime, precision="fp32", variant=None):
        key = (runtime, precision, variant)
        if key not in cache:
            cache[key] = Predictor(bundle_dir, runtime=runtime, precision=precision, variant=variant)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def keras_probs(bundle_dir):
    from probattn.export.loading import load_keras_model

    model = load_keras_model(bundle_dir / "model.keras")
    return lambda ids: model(ids, training=False).numpy()


@pytest.fixture(scope="module")
def tampered_bundle(bundle_dir, tmp_path_factory):
    """A copy of the session bundle with one byte changed in three files."""
    bundle = tmp_path_factory.mktemp("tampered") / "bundle"
    shutil.copytree(bundle_dir, bundle)
    for name in ("model_fp32.onnx", "model_fp32.tflite", "tokenizer.json"):
        p = bundle / name
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
    return bundle


def _single_error(proc, verb="predict"):
    line = assert_one_error_line(proc, verb, stdout_empty=True)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    return line


# --------------------------------------------------------------------------- Predictor

@pytest.mark.parametrize("runtime,precision", PAIRS, ids=[f"{r}-{p}" for r, p in PAIRS])
def test_predict_texts_and_ids(predictors, manifest, runtime, precision):
    p = predictors(runtime, precision)
    labels = manifest["labels"]
    results = p.predict(TEXTS)
    assert len(results) == len(TEXTS)
    ids = p.encode(TEXTS)
    assert ids.dtype == np.int32 and ids.shape[0] == len(TEXTS)
    probs = p.predict_ids(ids)
    assert probs.shape == (len(TEXTS), len(labels)) and np.isfinite(probs).all()
    for r, row in zip(results, probs):
        assert set(r) == {"label", "probabilities"} and list(r["probabilities"]) == labels
        assert r["label"] == labels[int(np.argmax(row))]
        # results round to 6 places: at most half a unit of the 6th place away, exactly 5e-7 for a
        # tie such as an int8 output step 214/256 = 0.8359375 (plus the binary value's last bits)
        np.testing.assert_allclose([r["probabilities"][l] for l in labels], row, rtol=0, atol=5e-7 + 1e-12,
                                   err_msg=f"{runtime} {precision}: predict() vs predict_ids()")
    # batch_size splits the work, not the results (fp32; int8 "dynamic" quantizes activations
    # with ranges measured per batch, so there the batch composition legitimately matters)
    if precision == "fp32":
        split = p.predict(TEXTS, batch_size=2)
        assert [r["label"] for r in split] == [r["label"] for r in results]
        np.testing.assert_allclose([list(r["probabilities"].values()) for r in split],
                                   [list(r["probabilities"].values()) for r in results], rtol=0,
                                   atol=FP32_MAX_ABS, err_msg=f"{runtime} fp32: batch_size=2 vs 64")


@pytest.mark.parametrize("runtime", ["onnxruntime", "litert"])
def test_fp32_predictions_equal_keras(predictors, keras_probs, runtime):
    p = predictors(runtime, "fp32")
    ids = p.encode(TEXTS)
    np.testing.assert_allclose(p.predict_ids(ids), keras_probs(ids), rtol=0, atol=FP32_MAX_ABS,
                               err_msg=f"{runtime} fp32 Predictor vs Keras")


@pytest.mark.parametrize("runtime,variant", [("onnxruntime", "all"), ("onnxruntime", "none"),
                                             ("litert", "xnnpack"), ("litert", "reference"),
                                             ("openvino", None)])
def test_mixed_lengths_in_one_batch_equal_each_alone(predictors, runtime, variant):
    p = predictors(runtime, "fp32", variant)
    batch = p.encode(TEXTS)
    lengths = sorted({int(np.count_nonzero(r)) for r in batch})
    assert len(lengths) >= 3 and lengths[0] <= 2 and lengths[-1] >= 30, lengths  # really mixed
    together = p.predict_ids(batch)
    for i, text in enumerate(TEXTS):
        alone = p.predict_ids(p.encode([text]))
        np.testing.assert_allclose(together[i], alone[0], rtol=0, atol=FP32_MAX_ABS,
                                   err_msg=f"{runtime}/{variant}: {text!r} batched (padded to "
                                           f"{batch.shape[1]}) vs alone")


def test_int64_ids_accepted_like_int32(predictors):
    p = predictors("onnxruntime", "fp32")
    ids = p.encode(TEXTS)
    np.testing.assert_array_equal(p.predict_ids(ids.astype(np.int64)), p.predict_ids(ids))


def _bad_inputs(vocab):
    return [
        ("id_too_large", np.array([[2, vocab]], np.int32), [f"Received id {vocab}", f"Expected ids in [0, {vocab})"]),
        ("negative_id", np.array([[2, -1, 3]], np.int32), ["Received id -1", f"[0, {vocab})"]),
        ("float_dtype", np.array([[2.0, 3.0]], np.float32), ["Received dtype float32", "integer dtype"]),
        ("rank_1", np.array([2, 3, 4], np.int32), ["Received rank 1", "Expected rank 2"]),
        ("rank_3", np.ones((1, 2, 3), np.int32), ["Received rank 3", "Expected rank 2"]),
        ("empty_batch", np.zeros((0, 4), np.int32), ["empty batch", "(0, 4)"]),
    ]


@pytest.mark.parametrize("runtime", ["onnxruntime", "litert"])
@pytest.mark.parametrize("case", ["id_too_large", "negative_id", "float_dtype", "rank_1", "rank_3", "empty_batch"])
def test_predict_ids_validation(predictors, manifest, runtime, case):
    p = predictors(runtime, "fp32")
    _, ids, expected = next(c for c in _bad_inputs(int(manifest["vocab_size"])) if c[0] == case)
    with pytest.raises(UsageError) as ei:
        p.predict_ids(ids)
    msg = str(ei.value)
    assert msg.startswith("Input 'token_ids' | "), msg
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_predictor_refuses_unknown_runtime_and_precision(bundle_dir):
    with pytest.raises(UsageError, match="unknown runtime 'tensorflow'; allowed: litert, tflm, onnxruntime, openvino"):
        Predictor(bundle_dir, runtime="tensorflow")
    with pytest.raises(UsageError, match="unknown precision 'fp8'"):
        Predictor(bundle_dir, precision="fp8")
    with pytest.raises(UsageError, match="no onnx int8-dynamic artifact"):
        Predictor(bundle_dir, runtime="onnxruntime", precision="int8-dynamic")


@pytest.mark.parametrize("runtime,precision,name", [("onnxruntime", "fp32", "model_fp32.onnx"),
                                                    ("litert", "fp32", "model_fp32.tflite"),
                                                    ("onnxruntime", "fp16", "tokenizer.json")])
def test_predictor_refuses_tampered_files(tampered_bundle, runtime, precision, name):
    with pytest.raises(UsageError, match=f"{name} does not match its manifest hash"):
        Predictor(tampered_bundle, runtime=runtime, precision=precision)


# --------------------------------------------------------------------------- CLI

def _json_lines(stdout):
    lines = stdout.splitlines()
    return [json.loads(l) for l in lines]


@pytest.mark.parametrize("runtime", ["onnxruntime", "litert"])
def test_cli_predict_json(bundle_dir, predictors, runtime):
    proc = run_cli("predict", bundle_dir, TEXTS[1], TEXTS[0], "--json", "--runtime", runtime)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _json_lines(proc.stdout)
    assert [r["text"] for r in rows] == [TEXTS[1], TEXTS[0]]
    expected = predictors(runtime, "fp32").predict([TEXTS[1], TEXTS[0]])
    for r, e in zip(rows, expected):
        assert set(r) == {"text", "label", "probabilities"}
        assert r["label"] == e["label"]
        np.testing.assert_allclose(list(r["probabilities"].values()), list(e["probabilities"].values()),
                                   rtol=0, atol=1e-6, err_msg=f"CLI vs Predictor ({runtime})")


@pytest.mark.parametrize("runtime", ["onnxruntime", "litert", "tflm"])
def test_cli_predict_never_imports_tensorflow(bundle_dir, runtime):
    code = ("import sys\n"
            "from probattn.export.cli import main\n"
            f"rc = main(['predict', {str(bundle_dir)!r}, 'a gripping film', '--json', '--runtime', {runtime!r}])\n"
            "print('RESULT', rc, 'tensorflow' in sys.modules, 'tf_keras' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[0])["text"] == "a gripping film"
    assert lines[-1] == "RESULT 0 False False", proc.stdout


def test_cli_predict_input_file(bundle_dir, tmp_path):
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    proc = run_cli("predict", bundle_dir, "--input-file", f, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["text"] for r in _json_lines(proc.stdout)] == TEXTS


def test_cli_predict_stdin(bundle_dir):
    proc = run_cli("predict", bundle_dir, "--input-file", "-", "--json", "--runtime", "litert",
                   input="great\nawful , just awful\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _json_lines(proc.stdout)
    assert [r["text"] for r in rows] == ["great", "awful , just awful"]
    assert all(r["label"] in ("fresh", "rotten") for r in rows)


def test_cli_predict_plain_output_one_line_per_text(bundle_dir):
    proc = run_cli("predict", bundle_dir, "great", "awful")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith("\tgreat") and lines[1].endswith("\tawful"), lines


@pytest.mark.parametrize("runtime,name", [("onnxruntime", "model_fp32.onnx"), ("litert", "model_fp32.tflite")])
def test_cli_predict_refuses_hash_mismatch(tampered_bundle, runtime, name):
    proc = run_cli("predict", tampered_bundle, "a fine film", "--runtime", runtime)
    line = _single_error(proc)
    assert f"{name} does not match its manifest hash" in line and "refusing" in line, line


@pytest.mark.parametrize("args,expected", [
    (["--runtime", "tensorflow"], "unknown runtime 'tensorflow'; allowed: litert, tflm, onnxruntime, openvino"),
    (["--precision", "fp8"], "unknown precision 'fp8'; allowed: fp32, fp16, int8-dynamic, int8"),
    (["--precision", "int8-dynamic"], "bundle has no onnx int8-dynamic artifact"),
], ids=["runtime", "precision", "missing-artifact"])
def test_cli_predict_unknown_runtime_or_precision(bundle_dir, args, expected):
    line = _single_error(run_cli("predict", bundle_dir, "a fine film", *args))
    assert expected in line, line


def test_cli_predict_missing_bundle_and_no_texts(bundle_dir, tmp_path):
    assert "bundle not found" in _single_error(run_cli("predict", tmp_path / "nope", "text"))
    assert "no texts given" in _single_error(run_cli("predict", bundle_dir))
    assert "input file not found" in _single_error(run_cli("predict", bundle_dir, "--input-file",
                                                           tmp_path / "missing.txt"))

"""Export: every artifact of the session bundle loads in its own runtime with the documented
signature, the manifest describes the files exactly, and bad inputs fail cleanly (one line,
exit 2, nothing left behind)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_classifier
from helpers import assert_one_error_line, run_cli
from probattn.export import bundle as B
from probattn.export import contract as C
from probattn.models.errors import UsageError
from probattn.export.parity.tolerances import FP16_MAX_ABS, FP32_MAX_ABS, MAX_PAD_ATTENTION

EXPECTED = [("savedmodel", "fp32"), ("tflite", "fp32"), ("tflite", "fp16"), ("tflite", "int8-dynamic"),
            ("tflite", "int8"), ("onnx", "fp32"), ("onnx", "fp16"), ("onnx", "int8")]
#: the fixed-shape device family (tests/test_devices.py checks it): int8 with float32 and int8 outputs
FIXED = [("tflite-fixed", "fp32"), ("tflite-fixed", "int8"), ("tflite-fixed", "int8")]
OUTPUTS = ["attention_weights", "probabilities"]
FLOAT_TOL = {"fp32": FP32_MAX_ABS, "fp16": FP16_MAX_ABS}

#: Texts for the tiny user-model tests: fewer than 50 distinct words, so every id the
#: tokenizer emits is a valid row of tiny_classifier()'s 50-row embedding.
TINY_TEXTS = ["the film was great fun", "a dull and boring plot", "the acting was fine",
              "great cast but a weak script", "boring", "fun fun fun and more fun",
              "not good not bad", "the plot was weak but the cast was great"]


def _user_facing_clean(names):
    for n in names:
        assert "serving_default_" not in n and ":0" not in n, f"internal tensor name leaked: {n!r}"


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def keras_reference(bundle_dir):
    """The bundle's model.keras with the attention output, called directly (the way verify
    calls the reference: the exported output names, no export rewrites)."""
    from probattn.export.loading import load_model
    from probattn.export.signature import serving_for

    serving = serving_for(load_model(bundle_dir / "model.keras"), True, 100)
    return lambda ids: {k: v.numpy() for k, v in serving(ids).items()}


@pytest.fixture(scope="module")
def two_lengths(bundle_dir, manifest):
    """Real held-out texts at two different sequence lengths (the second with padding)."""
    from probattn.models.text.tokenizer import encode, load_tokenizer

    tok = load_tokenizer(bundle_dir / "tokenizer.json")
    texts = [json.loads(l)["text"] for l in (bundle_dir / "test.jsonl").read_text().splitlines()[:6]]
    ids = encode(tok, texts, manifest["max_length"])
    short = np.ascontiguousarray(ids[:, :3])
    long = np.pad(ids, ((0, 0), (0, 9)))
    assert short.shape[1] != long.shape[1]
    return [short, long]


def _open(fmt, path):
    """(input descriptions, user-facing output names, run(ids) -> dict) straight from the runtime."""
    if fmt == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=str(path))
        sigs = interp.get_signature_list()
        assert list(sigs) == ["serving_default"], sigs
        runner = interp.get_signature_runner("serving_default")
        ins = {k: {"dtype": np.dtype(v["dtype"]).name, "shape": [int(x) for x in v["shape_signature"]]}
               for k, v in runner.get_input_details().items()}
        outs = sorted(runner.get_output_details())
        assert sorted(sigs["serving_default"]["outputs"]) == outs
        return ins, outs, lambda ids: runner(token_ids=ids)
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ins = {i.name: {"dtype": i.type, "shape": list(i.shape)} for i in sess.get_inputs()}
        outs = sorted(o.name for o in sess.get_outputs())
        shapes = {o.name: list(o.shape) for o in sess.get_outputs()}
        assert shapes["attention_weights"] == ["batch", "sequence"], shapes
        assert shapes["probabilities"][0] == "batch", shapes
        names = [o.name for o in sess.get_outputs()]
        return ins, outs, lambda ids: dict(zip(names, sess.run(names, {"token_ids": ids})))
    if fmt == "savedmodel":
        import tensorflow as tf

        obj = tf.saved_model.load(str(path))
        assert list(obj.signatures.keys()) == ["serving_default"], list(obj.signatures.keys())
        fn = obj.signatures["serving_default"]
        args, kwargs = fn.structured_input_signature
        assert not args
        ins = {k: {"dtype": v.dtype.name, "shape": v.shape.as_list()} for k, v in kwargs.items()}
        outs = sorted(fn.structured_outputs)
        return ins, outs, lambda ids: {k: v.numpy() for k, v in fn(token_ids=tf.constant(ids)).items()}
    raise AssertionError(fmt)


EXPECTED_INPUT = {"tflite": {"dtype": "int32", "shape": [-1, -1]},
                  "onnx": {"dtype": "tensor(int32)", "shape": ["batch", "sequence"]},
                  "savedmodel": {"dtype": "int32", "shape": [None, None]}}


# --------------------------------------------------------------------------- every artifact

def test_bundle_has_every_format_and_precision(manifest):
    got = [(a["format"], a["precision"], a.get("input_dtype", "int32")) for a in manifest["artifacts"]]
    twins = [(f, p, "int64") for f, p in EXPECTED if f == "onnx"]  # for clients that send int64 ids
    assert sorted(got) == sorted([(f, p, "int32") for f, p in EXPECTED + FIXED + [("keras", "fp32")]] + twins)


@pytest.mark.parametrize("fmt,precision", EXPECTED, ids=[f"{f}-{p}" for f, p in EXPECTED])
def test_artifact_loads_with_dynamic_signature_and_runs(bundle_dir, manifest, keras_reference, two_lengths,
                                                      fmt, precision):
    entry = B.find_artifact(manifest, fmt, precision)
    assert entry is not None, f"{fmt} {precision} missing from manifest"
    ins, outs, run = _open(fmt, bundle_dir / entry["path"])
    assert ins == {"token_ids": EXPECTED_INPUT[fmt]}, f"{entry['path']}: input signature {ins}"
    assert outs == OUTPUTS, f"{entry['path']}: outputs {outs}"
    _user_facing_clean(list(ins) + outs)
    n_classes = len(manifest["labels"])
    for ids in two_lengths:
        out = run(ids)
        assert sorted(out) == OUTPUTS
        p, w = np.asarray(out["probabilities"]), np.asarray(out["attention_weights"])
        assert p.shape == (ids.shape[0], n_classes) and p.dtype == np.float32, (p.shape, p.dtype)
        assert w.shape == ids.shape and w.dtype == np.float32, (w.shape, ids.shape)
        assert np.isfinite(p).all() and np.isfinite(w).all()
        pad_mass = np.sum(np.where(ids == 0, np.abs(w), 0.0), axis=1)
        assert pad_mass.max() <= MAX_PAD_ATTENTION, f"{entry['path']} length {ids.shape[1]}: pad attention {pad_mass}"
        if precision in FLOAT_TOL:
            ref = keras_reference(ids)
            for name in OUTPUTS:
                np.testing.assert_allclose(np.asarray(out[name]), ref[name], rtol=0, atol=FLOAT_TOL[precision],
                                           err_msg=f"{entry['path']} {name} vs Keras at length {ids.shape[1]}")


def test_manifest_hashes_and_sizes_match_files(bundle_dir, manifest):
    for a in manifest["artifacts"]:
        path = bundle_dir / a["path"]
        assert path.exists(), a["path"]
        assert B.sha256_path(path) == a["sha256"], f"{a['path']}: sha256 differs from manifest"
        assert B.size_of(path) == a["bytes"], f"{a['path']}: {B.size_of(path)} bytes, manifest {a['bytes']}"
    tok = manifest["tokenizer"]
    assert B.sha256_path(bundle_dir / tok["path"]) == tok["sha256"]
    # no model file in the bundle that the manifest does not account for (or hash)
    listed = {a["path"] for a in manifest["artifacts"]}
    models = {p.name for p in bundle_dir.iterdir() if p.name.startswith("model") or p.name == "saved_model"}
    assert models == listed, f"unlisted: {sorted(models - listed)}, missing: {sorted(listed - models)}"


def test_manifest_fields(manifest, run_dir):
    from probattn.models.text.tokenizer import load_tokenizer

    assert manifest["schema_version"] == B.SCHEMA_VERSION == 2
    for pkg in ("tensorflow", "tf-keras", "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert"):
        assert isinstance(manifest["versions"].get(pkg), str) and manifest["versions"][pkg], pkg
    assert manifest["labels"] == json.loads((run_dir / "labels.json").read_text())
    assert manifest["pad_id"] == 0 and manifest["unk_id"] == 1
    assert manifest["vocab_size"] == load_tokenizer(run_dir / "tokenizer.json").get_vocab_size()
    assert manifest["max_length"] == json.loads((run_dir / "config.json").read_text())["max_length"]
    sig = manifest["signature"]
    assert sig["inputs"] == [{"name": "token_ids", "dtype": "int32", "shape": ["batch", "sequence"]}]
    assert [o["name"] for o in sig["outputs"]] == ["probabilities", "attention_weights"]
    for a in manifest["artifacts"]:
        if a["format"] == "onnx":
            assert a.get("opset") == 17, a
        if a["precision"] == "int8":
            assert isinstance(a.get("recipe"), dict) and a["recipe"], f"{a['path']}: no int8 recipe"
    tfl_int8 = B.find_artifact(manifest, "tflite", "int8")
    assert "calibration" in tfl_int8["recipe"] and "per channel for dense layers" in tfl_int8["recipe"]["weights"]


def test_int8_recipe_matches_the_file(bundle_dir, manifest):
    """What the manifest says of the full-int8 weights is what the .tflite file holds."""
    from ai_edge_litert.interpreter import Interpreter

    entry = B.find_artifact(manifest, "tflite", "int8")
    interp = Interpreter(model_path=str(bundle_dir / entry["path"]))
    weights = {d["name"]: d for d in interp.get_tensor_details()
               if d["dtype"] == np.int8 and len(d["shape"]) == 2 and d["shape"][0] > 1}
    dense = [d for n, d in weights.items() if "MatMul" in n]
    embedding = [d for n, d in weights.items() if "embedding" in n]
    assert dense and embedding, sorted(weights)
    for d in dense:  # one scale per output channel
        assert len(d["quantization_parameters"]["scales"]) == d["shape"][0], d["name"]
    for d in embedding:
        assert len(d["quantization_parameters"]["scales"]) == 1, d["name"]


@pytest.mark.parametrize("input_dtype", ["int32", "int64"])
def test_onnx_int8_file_holds_what_its_recipe_says(bundle_dir, manifest, input_dtype):
    """The ONNX int8 file against its manifest recipe, read from the file: the embedding
    table (the fp32 file's one Gather of a rank-2 table) is stored uint8 with one scale and
    zero point and dequantized after the lookup, within half a step of the fp32 table; the
    score table and every MatMul weight are the fp32 file's float values; no op quantizes
    anything at run time (a row's outputs are the same alone and inside a batch)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    from probattn.export.formats import onnx as O

    entry = next(a for a in manifest["artifacts"] if a["format"] == "onnx" and a["precision"] == "int8"
                 and a.get("input_dtype", "int32") == input_dtype)
    assert entry["recipe"] == O.INT8_RECIPE and entry["quantization"] == "weight-only", entry
    q = onnx.load(str(bundle_dir / entry["path"])).graph
    f = onnx.load(str(bundle_dir / B.find_artifact(manifest, "onnx", "fp32")["path"])).graph
    q_init = {i.name: numpy_helper.to_array(i) for i in q.initializer}
    f_init = {i.name: numpy_helper.to_array(i) for i in f.initializer}
    ops = [n.op_type for n in q.node]
    assert not {"MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DynamicQuantizeMatMul"} & set(ops), ops
    # every 8-bit tensor of the file is an embedding table: rank 2, uint8, read by a Gather
    eight_bit = {i.name for i in q.initializer if i.data_type in (TensorProto.UINT8, TensorProto.INT8)
                 and len(i.dims) > 0}
    gathers = {n.input[0]: n for n in q.node if n.op_type == "Gather" and n.input[0] in q_init}
    f_gathers = {n.name: n.input[0] for n in f.node if n.op_type == "Gather" and n.input[0] in f_init}
    f_tables = {name: f_init[t] for name, t in f_gathers.items() if f_init[t].ndim == 2}
    f_scores = {name: f_init[t] for name, t in f_gathers.items() if f_init[t].ndim == 1}
    assert len(f_tables) == 1 and len(f_scores) == 1, (sorted(f_tables), sorted(f_scores))  # embedding, score table
    assert eight_bit == {t for t in gathers if q_init[t].dtype == np.uint8}, sorted(eight_bit)
    assert len(eight_bit) == len(f_tables)
    for table in eight_bit:
        node = gathers[table]
        want = f_tables[node.name]
        dq = [n for n in q.node if n.op_type == "DequantizeLinear" and n.input[0] == node.output[0]]
        assert len(dq) == 1, node.name
        scale, zero = q_init[dq[0].input[1]], q_init[dq[0].input[2]]
        assert scale.shape == () and zero.shape == () and zero.dtype == np.uint8  # one scale per table
        assert q_init[table].shape == want.shape
        back = (q_init[table].astype(np.float32) - float(zero)) * float(scale)
        assert np.max(np.abs(back - want)) <= float(scale) / 2 * 1.001, node.name
        assert 250 <= int(q_init[table].max()) - int(q_init[table].min()) <= 255  # the full 8 bits, not 7
    # the score table: the same float values, gathered as they are (no DequantizeLinear after it)
    for name, want in f_scores.items():
        node = next(n for n in q.node if n.name == name)
        assert q_init[node.input[0]].dtype == np.float32 and np.array_equal(q_init[node.input[0]], want)
        assert not [n for n in q.node if n.op_type == "DequantizeLinear" and n.input[0] == node.output[0]]
    # every MatMul weight: the fp32 file's float values
    f_weights = {n.name: f_init[i] for n in f.node if n.op_type == "MatMul" for i in n.input if i in f_init}
    q_weights = {n.name: q_init[i] for n in q.node if n.op_type == "MatMul" for i in n.input if i in q_init}
    assert f_weights and set(q_weights) == set(f_weights), (sorted(f_weights), sorted(q_weights))
    for name, w in q_weights.items():
        assert w.dtype == np.float32 and np.array_equal(w, f_weights[name]), name
    assert ops.count("MatMul") == [n.op_type for n in f.node].count("MatMul")
    # nothing quantized at run time: a row's outputs are the same alone and inside a batch
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle_dir / entry["path"]), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids = np.zeros((8, 40), np.int32)
    for r, n in enumerate((1, 3, 8, 17, 25, 33, 40, 5)):
        ids[r, :n] = rng.integers(2, manifest["vocab_size"], n)
    ids = ids.astype(np.int64 if input_dtype == "int64" else np.int32)
    batched = sess.run(None, {"token_ids": ids})
    for r in range(len(ids)):
        for got, alone in zip(batched, sess.run(None, {"token_ids": ids[r:r + 1]})):
            np.testing.assert_allclose(got[r:r + 1], alone, rtol=0, atol=FP32_MAX_ABS, err_msg=f"row {r}")


def test_float_files_take_the_float_graph_and_full_int8_the_int8_safe_one(bundle_dir, manifest):
    """The default export traces the float artifacts with ProbAttention's float math (no LOG:
    weights e / s, one pooling matmul) and converts full-int8 TFLite from the int8-safe
    graph (LOG and EXP lookup tables, two pooling matmuls); the fixed-shape device files
    keep the int8-safe graph at every precision."""
    import onnx

    from probattn.export.formats.tflite_flatbuffer import op_list

    assert "float_graph" in manifest["rewrites"]

    def tflite_ops(fmt, precision):
        entry = B.find_artifact(manifest, fmt, precision)
        return {o["op"]: o["count"] for o in op_list((bundle_dir / entry["path"]).read_bytes())}

    for precision in ("fp32", "fp16", "int8-dynamic"):
        ops = tflite_ops("tflite", precision)
        assert "LOG" not in ops and ops.get("BATCH_MATMUL") == 1, (precision, ops)
    for fmt, precision in (("tflite", "int8"), ("tflite-fixed", "fp32"), ("tflite-fixed", "int8")):
        ops = tflite_ops(fmt, precision)
        assert "LOG" in ops and ops.get("BATCH_MATMUL", 0) >= 2, (fmt, precision, ops)
    for precision in ("fp32", "fp16", "int8"):
        graph = onnx.load(bundle_dir / B.find_artifact(manifest, "onnx", precision)["path"]).graph
        assert "Log" not in {n.op_type for n in graph.node}, precision


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_onnx_passes_full_checker(bundle_dir, manifest, precision):
    import onnx

    entry = B.find_artifact(manifest, "onnx", precision)
    onnx.checker.check_model(str(bundle_dir / entry["path"]), full_check=True)
    model = onnx.load(str(bundle_dir / entry["path"]))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "sequence"] and not any(d.HasField("dim_value") for d in dims)
    assert [o.name for o in model.graph.output] and all(":" not in o.name for o in model.graph.output)
    assert any(op.domain in ("", "ai.onnx") and op.version == 17 for op in model.opset_import)


@pytest.mark.parametrize("fmt,precision", [("tflite", "int8"), ("tflite", "int8-dynamic"), ("onnx", "int8")])
def test_int8_at_most_30_percent_of_fp32(manifest, fmt, precision):
    q, f = B.find_artifact(manifest, fmt, precision), B.find_artifact(manifest, fmt, "fp32")
    assert q["bytes"] <= 0.30 * f["bytes"], f"{q['path']} is {q['bytes'] / f['bytes']:.1%} of {f['path']}"


# --------------------------------------------------------------------------- user models

@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A tokenizer trained on TINY_TEXTS, calibration texts, the tiny model as .keras and .h5,
    and a model that needs a Select TF op."""
    import tf_keras as keras

    from probattn.models.layers import layer_classes
    from probattn.models.text.tokenizer import train_tokenizer

    ProbAttention = layer_classes("2").ProbAttention  # the flex model below is a tf_keras model
    d = tmp_path_factory.mktemp("user")
    tok = train_tokenizer(TINY_TEXTS, vocab_size=50)
    assert tok.get_vocab_size() <= 50
    tok.save(str(d / "tokenizer.json"))
    (d / "calibration.txt").write_text("\n".join(TINY_TEXTS * 3) + "\n")
    (d / "labels.txt").write_text("neg\nneu\npos\n")
    model = tiny_classifier()
    model.save(d / "tiny.keras")
    model.save(d / "tiny.h5")

    # x[:, :, :, None]: a StridedSlice with new_axis_mask, which TFLite has no builtin for
    keras.utils.set_random_seed(0)
    inp = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    e = keras.layers.Embedding(50, 8, mask_zero=True)(inp)
    x = keras.layers.Reshape((-1, 8))(e[:, :, :, None])
    x = ProbAttention()(x)
    out = keras.layers.Dense(3, activation="softmax", name="probabilities")(x)
    keras.Model(inp, out).save(d / "flex.keras")
    return {"dir": d, "model": model, "tokenizer": tok}


def _leftovers(parent: Path, name: str):
    return sorted(p.name for p in parent.glob(f".probattn-tmp-{name}-*") if not p.name.endswith(".lock"))


def _one_error_line(proc, verb="export"):
    return assert_one_error_line(proc, verb)


def test_flex_op_model_refused_in_process(user_files, tmp_path):
    from probattn.export.exporter import ExportOptions, export

    out = tmp_path / "bundle"
    with pytest.raises(UsageError) as ei:
        export(user_files["dir"] / "flex.keras", out,
               ExportOptions(formats=("tflite",), precisions=("fp32",),
                             tokenizer=str(user_files["dir"] / "tokenizer.json")))
    msg = str(ei.value)
    assert "(StridedSlice)" in msg, msg  # the op, and only the op (no MLIR noise)
    assert "Select TF" in msg and "\n" not in msg
    assert not out.exists() and not _leftovers(tmp_path, "bundle")


def test_flex_op_model_refused_by_cli(user_files, tmp_path):
    out = tmp_path / "bundle"
    proc = run_cli("export", user_files["dir"] / "flex.keras", "--out", out, "--precisions", "fp32",
                   "--tokenizer", user_files["dir"] / "tokenizer.json")
    line = _one_error_line(proc)
    assert "StridedSlice" in line and "not LiteRT builtins" in line, line
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    assert not _leftovers(tmp_path, "bundle")


@pytest.mark.parametrize("opset", ["99", "abc", "12"])
def test_bad_opset_fails_cleanly(run_dir, tmp_path, opset):
    out = tmp_path / "bundle"
    proc = run_cli("export", run_dir, "--out", out, "--opset", opset)
    line = assert_one_error_line(proc, "export")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert line.startswith("probattn export: error: --opset") and "13 to 18" in line, line
    assert opset in line
    assert not out.exists()


@pytest.mark.parametrize("suffix,precisions", [(".keras", "fp32,fp16,int8-dynamic,int8"), (".h5", "fp32")])
def test_export_user_model_file(user_files, tmp_path, suffix, precisions):
    import onnxruntime as ort

    from probattn.models.text.tokenizer import encode

    d = user_files["dir"]
    out = tmp_path / "bundle"
    proc = run_cli("export", d / f"tiny{suffix}", "--out", out, "--tokenizer", d / "tokenizer.json",
                   "--calibration-data", d / "calibration.txt", "--labels", d / "labels.txt",
                   "--precisions", precisions)
    assert proc.returncode == 0, proc.stderr[-3000:]
    man = json.loads((out / "manifest.json").read_text())
    want = {("keras", "fp32"), ("savedmodel", "fp32")} | {(f, p) for f in ("tflite", "tflite-fixed", "onnx")
                                                           for p in precisions.split(",")
                                                           if p in C.SUPPORTED[f]}
    assert {(a["format"], a["precision"]) for a in man["artifacts"]} == want
    assert man["labels"] == ["neg", "neu", "pos"] and man["vocab_size"] == 50
    assert man["test_data"] is None
    for a in man["artifacts"]:
        assert B.sha256_path(out / a["path"]) == a["sha256"], a["path"]
    # the exported graph is the user's model: ONNX fp32 equals Keras on the user's texts
    ids = encode(user_files["tokenizer"], TINY_TEXTS, man["max_length"])
    sess = ort.InferenceSession(str(out / "model_fp32.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["probabilities"], {"token_ids": ids})[0]
    ref = user_files["model"](ids, training=False).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=FP32_MAX_ABS, err_msg=f"ONNX fp32 of tiny{suffix} vs Keras")


@pytest.mark.parametrize("formats, precisions, one_graph, float_graph", [
    ("tflite", "int8", False, False),  # no float artifact: no float trace
    ("tflite,onnx", "fp32,int8", False, True),
    ("tflite,onnx", "fp32,int8", True, False),  # --one-graph
])
def test_which_exports_take_the_float_graph(user_files, tmp_path, formats, precisions, one_graph, float_graph):
    """The float trace is made only when a float artifact is asked for and --one-graph is
    not given; a file built from it has no LOG, full int8 always has; ONNX fp32 equals the
    user's Keras model either way."""
    import onnxruntime as ort

    from probattn.export.exporter import ExportOptions, export
    from probattn.export.formats.tflite_flatbuffer import op_list
    from probattn.models.text.tokenizer import encode

    d = user_files["dir"]
    man = export(d / "tiny.keras", tmp_path / "b", ExportOptions(
        formats=formats, precisions=precisions, tokenizer=str(d / "tokenizer.json"),
        calibration_data=str(d / "calibration.txt"), onnx_int64=False, float_graph=not one_graph))
    assert ("float_graph" in man["rewrites"]) is float_graph
    for a in man["artifacts"]:
        if a["format"] == "tflite":
            ops = {o["op"] for o in op_list((tmp_path / "b" / a["path"]).read_bytes())}
            assert ("LOG" in ops) is (a["precision"] == "int8" or not float_graph), (a["path"], ops)
    if "onnx" in formats:
        ids = encode(user_files["tokenizer"], TINY_TEXTS, man["max_length"])
        sess = ort.InferenceSession(str(tmp_path / "b" / "model_fp32.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(sess.run(["probabilities"], {"token_ids": ids})[0],
                                   user_files["model"](ids, training=False).numpy(), rtol=0, atol=FP32_MAX_ABS)


def test_export_onto_existing_bundle_refused_and_intact(bundle_dir, run_dir, tmp_path):
    target = tmp_path / "existing"
    shutil.copytree(bundle_dir, target)
    before = {str(p.relative_to(target)): B.sha256_path(p) for p in target.rglob("*") if p.is_file()}
    proc = run_cli("export", run_dir, "--out", target, "--precisions", "fp32", "--formats", "onnx")
    line = _one_error_line(proc)
    assert "already exists" in line and "--overwrite" in line, line
    after = {str(p.relative_to(target)): B.sha256_path(p) for p in target.rglob("*") if p.is_file()}
    assert after == before
    assert not _leftovers(tmp_path, "existing")


def test_run_check_runs_tensorflow_in_this_process_and_records_its_errors(bundle_dir, manifest, monkeypatch):
    """The export's run check runs the SavedModel on the exporter's own TensorFlow (no
    worker); an exception there leaves the artifact out as a crash, as the worker would."""
    import tensorflow  # noqa: F401  (the exporter's process holds TensorFlow)

    from probattn.export import contract as C
    from probattn.export.runcheck import check_artifacts
    from probattn.export.runtimes import isolated
    from probattn.export.runtimes.savedmodel import SavedModelRunner

    entries = [a for a in manifest["artifacts"] if a["format"] == "savedmodel"]
    assert entries, manifest["artifacts"]
    names = C.ordered_outputs(["probabilities", "attention_weights"])

    def no_worker(*a, **k):
        raise AssertionError("a worker process was started for TensorFlow")

    monkeypatch.setattr(isolated.Worker, "__init__", no_worker)
    assert check_artifacts(bundle_dir, entries, manifest["vocab_size"], names, log=lambda m: None) == {}

    def broken(self, ids):
        raise ValueError("boom")

    monkeypatch.setattr(SavedModelRunner, "_infer", broken)
    got = check_artifacts(bundle_dir, entries, manifest["vocab_size"], names, log=lambda m: None)
    assert got == {entries[0]["path"]: "crashed savedmodel: ValueError: boom"}, got

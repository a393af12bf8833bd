"""Devices and raw clients: the primary output first and the contract's names in every raw
view (ONNX ``run(None)``, raw LiteRT, TFLite Micro), the fixed-shape ``tflite-fixed`` family
on the real TFLite Micro interpreter, the manifest's measured targets and arena sizes,
``labels.txt`` / ``vocab.txt``, the C sources of ``--c-array`` compiled with gcc, and the
MediaPipe TextClassifier drop-in (regex tokenizer, metadata, the task run inside verify)."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from conftest import tiny_classifier
from helpers import assert_one_error_line, cases_longer_than, run_cli
from probattn.export import bundle as B
from probattn.export import contract as C
from probattn.export.parity.tolerances import FP32_MAX_ABS, INT8_MIN_AGREEMENT
from probattn.models.errors import UsageError

#: texts MediaPipe and our tokenizer must split alike: case, non-ASCII, apostrophes, more words
#: than max_length, empty, punctuation only, control characters, CJK, special-token look-alikes
PROBES = ["The Movie is GREAT", "naïve café — résumé", "it's 'quoted' don't", " ".join(["good"] * 80), "",
          "!!! ... ???", "tab\tnew\nline", "日本語のテキスト", "x" * 300, "<PAD> <START> <UNKNOWN>",
          "under_score hyphen-ated 3.14", "ÀÉÎõü ﬁne ＦＵＬＬ"]


def _texts(bundle, n=None):
    rows = [json.loads(l) for l in (bundle / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["text"] for r in rows[:n]]


def _keras(bundle):
    """The bundle's Keras reference called the way verify calls it: the exported output
    names (probabilities, attention_weights), no export rewrites."""
    from probattn.export.loading import load_model
    from probattn.export.signature import serving_for

    manifest = json.loads((bundle / "manifest.json").read_text())
    serving = serving_for(load_model(bundle / "model.keras"), True, int(manifest["vocab_size"]))

    def run(ids):
        return {k: v.numpy() for k, v in serving(ids).items()}

    return run


def _entries(manifest, *formats):
    return [a for a in manifest["artifacts"] if a["format"] in formats]


# --------------------------------------------------------------------------- raw clients

@pytest.fixture(scope="module")
def heldout_ids(bundle_dir, manifest):
    from probattn.models.text.tokenizer import encode, load_tokenizer

    tok = load_tokenizer(bundle_dir / "tokenizer.json")
    return encode(tok, _texts(bundle_dir, 48), manifest["max_length"])


@pytest.fixture(scope="module")
def keras_session(bundle_dir):
    return _keras(bundle_dir)


def test_onnx_run_none_first_output_is_probabilities(bundle_dir, manifest, heldout_ids, keras_session):
    """``session.run(None, feed)[0]``, the common onnxruntime idiom, gets the probabilities."""
    import onnxruntime as ort

    ref = keras_session(heldout_ids)
    entries = _entries(manifest, "onnx")
    assert {a["precision"] for a in entries} == {"fp32", "fp16", "int8"}
    assert {C.input_dtype_of(a) for a in entries} == set(C.INPUT_DTYPES)  # the int64 twins too
    for a in entries:
        sess = ort.InferenceSession(str(bundle_dir / a["path"]), providers=["CPUExecutionProvider"])
        assert [o.name for o in sess.get_outputs()] == list(C.OUTPUT_ORDER), a["path"]
        ids = heldout_ids.astype(C.input_dtype_of(a))
        first = sess.run(None, {C.INPUT: ids})[0]
        named = sess.run([C.PROBABILITIES], {C.INPUT: ids})[0]
        assert first.shape == (len(heldout_ids), len(manifest["labels"])), (a["path"], first.shape)
        np.testing.assert_array_equal(first, named, err_msg=a["path"])
        if a["precision"] == "fp32":
            np.testing.assert_allclose(first, ref[C.PROBABILITIES], rtol=0, atol=FP32_MAX_ABS, err_msg=a["path"])


def _raw_run(path, ids):
    """LiteRT without the signature runner: raw input 0, every raw output in order."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    inp = interp.get_input_details()[0]
    if list(inp["shape_signature"]) != list(ids.shape):
        interp.resize_tensor_input(inp["index"], ids.shape)
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], ids)
    interp.invoke()
    outs = interp.get_output_details()
    return inp, outs, [interp.get_tensor(d["index"]) for d in outs]


def test_raw_litert_names_and_first_output_are_the_contracts(bundle_dir, manifest, heldout_ids, keras_session):
    """Every TFLite-family file: raw names are token_ids, probabilities, attention_weights; raw
    output 0 is the probabilities; the stored signature lists probabilities first too."""
    from probattn.export.formats.tflite_flatbuffer import describe
    from probattn.export.runtimes.tflm import dequantize

    ref = keras_session(heldout_ids)
    entries = _entries(manifest, *C.TFLITE_FORMATS)
    assert len(entries) == 7, [a["path"] for a in entries]
    for a in entries:
        path = bundle_dir / a["path"]
        sig = describe(path.read_bytes())["signatures"][C.SIGNATURE_KEY]
        assert sig == {"inputs": [C.INPUT], "outputs": list(C.OUTPUT_ORDER)}, (a["path"], sig)
        ids = heldout_ids if "input_shape" not in a else \
            np.pad(heldout_ids[:1], ((0, 0), (0, a["input_shape"][1] - heldout_ids.shape[1])))
        inp, outs, values = _raw_run(path, ids)
        assert inp["name"] == C.INPUT, a["path"]
        assert [d["name"] for d in outs] == list(C.OUTPUT_ORDER), (a["path"], [d["name"] for d in outs])
        p = dequantize(values[0], outs[0])
        assert p.shape == (ids.shape[0], len(manifest["labels"])), (a["path"], p.shape)
        if a["precision"] == "fp32":
            np.testing.assert_allclose(p, keras_session(ids)[C.PROBABILITIES] if ids is not heldout_ids
                                       else ref[C.PROBABILITIES], rtol=0, atol=FP32_MAX_ABS, err_msg=a["path"])
        assert a["raw_outputs"][0]["name"] == C.PROBABILITIES and a["raw_inputs"][0]["name"] == C.INPUT


@pytest.fixture(scope="module")
def tiny_conversions(tmp_path_factory):
    """A tiny classifier's SavedModel converted in-process at fp32 and full int8 with int8
    outputs: (converter output, rewritten) pairs, and a few id batches."""
    import tensorflow as tf

    from probattn.export.formats.tflite import convert
    from probattn.export.formats.tflite_flatbuffer import rewrite_io
    from probattn.export.signature import serving_module

    d = tmp_path_factory.mktemp("rewrite")
    module, concrete = serving_module(tiny_classifier(), attention=True, shape=(1, 12))
    tf.saved_model.save(module, str(d / "sm"), signatures={C.SIGNATURE_KEY: concrete})
    rng = np.random.default_rng(0)
    ids = [np.pad(rng.integers(2, 50, (1, n), dtype=np.int32), ((0, 0), (0, 12 - n))) for n in (1, 3, 7, 12)]
    out = {}
    for name, precision, int8_out in (("fp32", "fp32", False), ("int8-int8out", "int8", True)):
        raw = convert(str(d / "sm"), precision, ids * 4, int8_output=int8_out)
        out[name] = (raw, rewrite_io(raw, C.OUTPUT_ORDER))
    return out, ids, d


@pytest.mark.parametrize("name", ["fp32", "int8-int8out"])
def test_rewrite_keeps_outputs_bit_identical(tiny_conversions, name):
    """The rewrite changes names, order and alignment only: every output, through the
    signature on both kernel families, equals the converter's own file bit for bit."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from probattn.export.formats.tflite_flatbuffer import describe, unaligned_buffers

    convs, batches, _ = tiny_conversions
    raw, new = convs[name]
    before, after = describe(raw), describe(new)
    assert [o["name"] for o in before["outputs"]] != list(C.OUTPUT_ORDER)  # what the converter wrote
    assert [o["name"] for o in after["outputs"]] == list(C.OUTPUT_ORDER)
    assert after["ops"] == before["ops"]
    assert unaligned_buffers(new) == []
    # the same tensors (dtype, shape, quantization), renamed and reordered
    assert sorted((o["dtype"], tuple(o["shape"]), json.dumps(o["quantization"])) for o in before["outputs"]) == \
        sorted((o["dtype"], tuple(o["shape"]), json.dumps(o["quantization"])) for o in after["outputs"])
    for resolver in (OpResolverType.AUTO, OpResolverType.BUILTIN_REF):
        runs = []
        for blob in (raw, new):
            interp = Interpreter(model_content=blob, experimental_op_resolver_type=resolver)
            runner = interp.get_signature_runner(C.SIGNATURE_KEY)
            runs.append([runner(**{C.INPUT: b}) for b in batches])
        for r0, r1 in zip(*runs):
            assert sorted(r0) == sorted(r1) == sorted(C.OUTPUT_ORDER)
            for k in r0:
                np.testing.assert_array_equal(r0[k], r1[k], err_msg=f"{name} {k} {resolver}")


def test_openvino_refuses_a_tflite_without_contract_names(tiny_conversions):
    from probattn.export.runtimes.openvino import OpenVINORunner

    convs, batches, d = tiny_conversions
    (d / "raw.tflite").write_bytes(convs["fp32"][0])
    (d / "named.tflite").write_bytes(convs["fp32"][1])
    with pytest.raises(UsageError) as ei:
        OpenVINORunner(d / "raw.tflite", 50).activate()
    assert "not the contract's" in str(ei.value) and "StatefulPartitionedCall" in str(ei.value)
    with OpenVINORunner(d / "named.tflite", 50, input_shape=[1, 12]) as r:
        assert sorted(r.infer(batches[2])) == sorted(C.OUTPUT_ORDER)


def test_no_attention_weights_gives_probabilities_only_everywhere(tmp_path):
    """--no-attention-weights: one output, probabilities, in every ONNX and TFLite file."""
    import onnxruntime as ort

    from probattn.export.exporter import ExportOptions, export
    from probattn.models.text.tokenizer import train_tokenizer

    texts = ["a good film", "a bad film", "fine", "good good bad"]
    train_tokenizer(texts, vocab_size=50).save(str(tmp_path / "tok.json"))
    tiny_classifier().save(tmp_path / "tiny.keras")
    man = export(tmp_path / "tiny.keras", tmp_path / "b",
                 ExportOptions(formats=("tflite", "tflite-fixed", "onnx"), precisions=("fp32",),
                               tokenizer=str(tmp_path / "tok.json"), attention_weights=False))
    assert [o["name"] for o in man["signature"]["outputs"]] == [C.PROBABILITIES]
    ids = np.array([[2, 3, 4, 0]], np.int32)
    for a in man["artifacts"]:
        if a["format"] in C.TFLITE_FORMATS:
            assert [o["name"] for o in a["raw_outputs"]] == [C.PROBABILITIES], a["path"]
            _, outs, _ = _raw_run(tmp_path / "b" / a["path"], np.pad(ids, ((0, 0), (0, a.get("input_shape", [1, 4])[1] - 4))))
            assert [d["name"] for d in outs] == [C.PROBABILITIES]
        elif a["format"] == "onnx":
            sess = ort.InferenceSession(str(tmp_path / "b" / a["path"]), providers=["CPUExecutionProvider"])
            assert [o.name for o in sess.get_outputs()] == [C.PROBABILITIES]


# --------------------------------------------------------------------------- the fixed-shape family

def test_fixed_family_entries_are_unique_and_self_describing(manifest, bundle_dir):
    from ai_edge_litert.interpreter import Interpreter

    from probattn.export.formats.tflite_flatbuffer import describe

    fixed = _entries(manifest, "tflite-fixed")
    keys = sorted(C.artifact_key(a) for a in fixed)
    assert keys == [("tflite-fixed", "fp32", "float32", "int32"), ("tflite-fixed", "int8", "float32", "int32"),
                    ("tflite-fixed", "int8", "int8", "int32")]
    assert len({C.artifact_key(a) for a in manifest["artifacts"]}) == len(manifest["artifacts"])
    L = manifest["max_length"]
    for a in fixed:
        blob = (bundle_dir / a["path"]).read_bytes()
        info = describe(blob)
        assert a["input_shape"] == [1, L] == info["inputs"][0]["shape_signature"], a["path"]
        assert a["output_dtype"] == info["outputs"][0]["dtype"], a["path"]
        assert a["ops"] == info["ops"] and a["raw_outputs"] == info["outputs"]
        # the op list agrees with what LiteRT itself reports for the file
        ops = [d["op_name"] for d in Interpreter(model_content=blob)._get_ops_details()]
        assert {o["op"]: o["count"] for o in a["ops"]} == {n: ops.count(n) for n in ops}, a["path"]
        assert a["targets"] == ["litert", "tflm"], (a["path"], a["target_checks"])
        assert a["target_checks"]["mediapipe"].startswith("no MediaPipe metadata")
    # TFLite Micro has no int8 EXP or LOG: the device files run those two in float, the rest in int8
    from probattn.export.formats.tflite_fixed import TFLM_FLOAT_OPS
    from probattn.export.formats.tflite_flatbuffer import op_input_dtypes

    for a in fixed:
        if a["precision"] == "int8":
            dtypes = op_input_dtypes((bundle_dir / a["path"]).read_bytes())
            assert {op: dtypes[op] for op in TFLM_FLOAT_OPS if op in dtypes} == \
                {op: {"float32"} for op in TFLM_FLOAT_OPS if op in dtypes}, (a["path"], dtypes)
            assert dtypes["FULLY_CONNECTED"] == {"int8"} and dtypes["BATCH_MATMUL"] == {"int8"}, dtypes
    dyn = op_input_dtypes((bundle_dir / B.find_artifact(manifest, "tflite", "int8")["path"]).read_bytes())
    assert all(dyn[op] == {"int8"} for op in TFLM_FLOAT_OPS if op in dyn), dyn  # LiteRT's file: all int8
    q = B.find_artifact(manifest, "tflite-fixed", "int8", "int8")
    assert q["path"] == "model_fixed_int8_int8out.tflite"
    assert q["quantization"][C.PROBABILITIES] == {"scale": C.INT8_PROBABILITIES_SCALE,
                                                  "zero_point": C.INT8_PROBABILITIES_ZERO_POINT}
    assert set(q["quantization"]) == set(C.OUTPUT_ORDER)
    for a in _entries(manifest, "tflite"):  # the dynamic files: LiteRT only, and why not TFLM
        assert a["targets"] == ["litert"] and "cannot resize" in a["target_checks"]["tflm"], a["path"]
        assert "input_shape" not in a and "arena_bytes" not in a


def test_arena_bytes_is_the_smallest_arena_tflm_runs(manifest, bundle_dir):
    """arena_bytes runs, one byte less does not (on the real TFLM allocator)."""
    from probattn.export.runtimes.tflm import _runs, captured_stderr

    arenas = {}
    for a in _entries(manifest, "tflite-fixed"):
        blob = (bundle_dir / a["path"]).read_bytes()
        with captured_stderr():
            assert _runs(blob, a["arena_bytes"], a["input_shape"]), a["path"]
            assert not _runs(blob, a["arena_bytes"] - 1, a["input_shape"]), a["path"]
        arenas[a["path"]] = a["arena_bytes"]
    # int8 activations take a quarter of the bytes of float32 ones
    assert arenas["model_fixed_int8.tflite"] < arenas["model_fixed_fp32.tflite"]
    print("\nTFLM arena bytes:", arenas)


def test_find_artifact_and_predictor_never_mix_dynamic_and_fixed(bundle_dir, manifest):
    from probattn.export.predict import Predictor

    assert B.find_artifact(manifest, "tflite", "int8")["path"] == "model_int8.tflite"
    assert B.find_artifact(manifest, "tflite-fixed", "int8")["path"] == "model_fixed_int8.tflite"
    assert B.find_artifact(manifest, "tflite-fixed", "int8", "int8")["path"] == "model_fixed_int8_int8out.tflite"
    assert B.find_artifact(manifest, "tflite", "int8", "int8") is None
    lit = Predictor(bundle_dir, runtime="litert", precision="int8")
    assert lit.runner.path.name == "model_int8.tflite" and lit.runner.fixed_length is None
    micro = Predictor(bundle_dir, runtime="tflm", precision="int8")
    assert micro.runner.path.name == "model_fixed_int8.tflite"
    assert (micro.runner.fixed_batch, micro.runner.fixed_length) == (1, manifest["max_length"])
    texts = ["a gripping, funny film", "dull", ""]
    got, want = micro.predict(texts), lit.predict(texts)
    assert [g["label"] for g in got] == [w["label"] for w in want]


def test_manifest_with_duplicate_entries_refused(bundle_dir, tmp_path):
    man = json.loads((bundle_dir / "manifest.json").read_text())
    man["artifacts"].append(dict(B.find_artifact(man, "tflite-fixed", "int8")))
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(UsageError) as ei:
        B.load_manifest(tmp_path)
    assert "tflite-fixed / int8 / float32" in str(ei.value) and "unique" in str(ei.value)


def test_tflm_int8_output_dequantized_equals_float_output(bundle_dir, manifest, heldout_ids):
    """The int8-output file, dequantized with its scale and zero point, gives the float-output
    file's values: both end in the same int8 tensor; one dequantizes it in the graph."""
    from probattn.export.runtimes.tflm import TFLMRunner

    outs = {}
    for dtype in ("float32", "int8"):
        a = B.find_artifact(manifest, "tflite-fixed", "int8", dtype)
        with TFLMRunner(bundle_dir / a["path"], manifest["vocab_size"], input_shape=a["input_shape"]) as r:
            outs[dtype] = r.infer(heldout_ids)
    for k in C.OUTPUT_ORDER:
        assert outs["int8"][k].dtype == np.float32
        np.testing.assert_array_equal(outs["int8"][k], outs["float32"][k], err_msg=k)


def test_tflm_runs_in_verify_and_passes(parity_report, manifest, bundle_dir):
    rows = {(r["artifact"], r["runtime"]): r for r in parity_report.rows}
    longer = cases_longer_than(bundle_dir, manifest["max_length"])
    assert "heldout" not in longer
    for a in _entries(manifest, "tflite-fixed"):
        r = rows[(a["path"], "tflm")]
        assert r["passed"] is True, a["path"]
        if a["precision"] == "int8":
            assert r["top1_agreement"] >= INT8_MIN_AGREEMENT, (a["path"], r["top1_agreement"])
        else:
            assert r["max_abs"] <= FP32_MAX_ABS, (a["path"], r["max_abs"])
        # only the cases longer than the fixed length are left out
        assert set(r["cases_not_applicable"]) == longer, r["cases_not_applicable"]
        print(f"\n{a['path']} on tflm: agreement {r['top1_agreement']:.4f}, accuracy {r['accuracy']:.4f}, "
              f"max abs {r['max_abs']:.3g}")
    by_design = [s for s in parity_report.meta["not_applicable"] if s["runtime"] == "tflm"]
    assert sorted(s["artifact"] for s in by_design) == sorted(a["path"] for a in _entries(manifest, "tflite"))
    assert all("cannot resize" in s["reason"] for s in by_design)


# --------------------------------------------------------------------------- plain files and C arrays

def test_labels_and_vocab_files(bundle_dir, manifest):
    from probattn.models.text.tokenizer import load_tokenizer

    tok = load_tokenizer(bundle_dir / "tokenizer.json")
    labels = (bundle_dir / C.LABELS_FILE).read_text(encoding="utf-8").split("\n")
    vocab = (bundle_dir / C.VOCAB_FILE).read_text(encoding="utf-8").split("\n")
    assert labels[-1] == "" and labels[:-1] == manifest["labels"]
    assert vocab[-1] == "" and len(vocab) - 1 == tok.get_vocab_size() == manifest["vocab_size"]
    assert all(tok.id_to_token(i) == w for i, w in enumerate(vocab[:-1]))
    for key, name in (("labels", C.LABELS_FILE), ("vocabulary", C.VOCAB_FILE)):
        entry = manifest["files"][key]
        assert entry["path"] == name and B.sha256_path(bundle_dir / name) == entry["sha256"]


_HARNESS = r"""
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "model_data.h"
#include "vocab_data.h"
#include "labels_data.h"
#ifdef WITH_TOKENIZER
#include "regex_tokenizer.h"
#endif
/* argv: model dump, vocab dump, labels dump; stdin: NUL-separated texts to tokenize */
int main(int argc, char **argv) {
  unsigned i;
  FILE *f;
  static char buf[1 << 22];
  size_t n, off;
  if (argc != 4) return 2;
  f = fopen(argv[1], "wb"); fwrite(probattn_model, 1, probattn_model_len, f); fclose(f);
  f = fopen(argv[2], "wb");
  for (i = 0; i < PROBATTN_VOCAB_SIZE; ++i)
    fprintf(f, "%s\n", (const char *)(probattn_vocab_strings + probattn_vocab_offsets[i]));
  fclose(f);
  f = fopen(argv[3], "wb");
  for (i = 0; i < PROBATTN_NUM_LABELS; ++i) fprintf(f, "%s\n", probattn_labels[i]);
  fclose(f);
  for (i = 1; i < PROBATTN_VOCAB_SIZE; ++i) {  /* the sorted index is sorted */
    /* strcmp compares as unsigned char: the byte order the index is sorted in */
    if (strcmp((const char *)(probattn_vocab_strings + probattn_vocab_offsets[probattn_vocab_sorted_ids[i - 1]]),
               (const char *)(probattn_vocab_strings + probattn_vocab_offsets[probattn_vocab_sorted_ids[i]])) >= 0)
      return 3;
  }
  printf("align %u arena %d length %d classes %d\n", (unsigned)((uintptr_t)probattn_model % 16),
         PROBATTN_ARENA_BYTES, PROBATTN_MAX_LENGTH, PROBATTN_NUM_CLASSES);
  n = fread(buf, 1, sizeof buf - 1, stdin);
  buf[n] = 0;
#ifdef WITH_TOKENIZER
  for (off = 0; off < n; off += strlen(buf + off) + 1) {
    int32_t ids[PROBATTN_MAX_LENGTH];
    int k;
    probattn_tokenize(buf + off, ids);
    for (k = 0; k < PROBATTN_MAX_LENGTH; ++k) printf(k ? " %d" : "%d", (int)ids[k]);
    printf("\n");
  }
#else
  (void)off;
#endif
  return 0;
}
"""


def compile_and_run(cdir, tmp_path, texts=(), tokenizer=False):
    """Compile the C sources with the harness (C99, every warning an error) and run it."""
    sources = sorted(str(p) for p in cdir.glob("*.c"))
    (tmp_path / "harness.c").write_text(_HARNESS)
    exe = tmp_path / "harness"
    cmd = ["gcc", "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-O1", f"-I{cdir}",
           *(["-DWITH_TOKENIZER"] if tokenizer else []), "-o", str(exe), str(tmp_path / "harness.c"), *sources]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    data = b"".join(t.encode("utf-8") + b"\0" for t in texts)
    dumps = [tmp_path / n for n in ("model.bin", "vocab.txt", "labels.txt")]
    proc = subprocess.run([str(exe), *map(str, dumps)], input=data, capture_output=True)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stdout.decode().splitlines()
    return lines[0], [[int(x) for x in l.split()] for l in lines[1:]], dumps


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_c_arrays_compile_and_hold_the_bundle_files(bundle_dir, manifest, tmp_path):
    """C sources of the session bundle's int8 model (default tokenizer: tables, no C tokenizer)."""
    from probattn.export.c_array import write_c_sources
    from probattn.models.text.tokenizer import load_tokenizer

    entry = B.find_artifact(manifest, "tflite-fixed", "int8")
    work = tmp_path / "b"
    work.mkdir()
    shutil.copyfile(bundle_dir / entry["path"], work / entry["path"])
    rec = write_c_sources(work, entry, load_tokenizer(bundle_dir / "tokenizer.json"), manifest["labels"])
    assert rec["regex_tokenizer"] is False and not (work / "c" / "regex_tokenizer.c").exists()
    for f in rec["files"]:
        assert B.sha256_path(work / f["path"]) == f["sha256"]
    head, _, (model, vocab, labels) = compile_and_run(work / "c", tmp_path)
    assert model.read_bytes() == (bundle_dir / entry["path"]).read_bytes()
    assert vocab.read_bytes() == (bundle_dir / C.VOCAB_FILE).read_bytes()
    assert labels.read_bytes() == (bundle_dir / C.LABELS_FILE).read_bytes()
    assert head == (f"align 0 arena {entry['arena_bytes']} length {manifest['max_length']} "
                    f"classes {len(manifest['labels'])}")


def test_c_array_needs_the_fixed_int8_model(run_dir, tmp_path):
    proc = run_cli("export", run_dir, "--out", tmp_path / "b", "--formats", "onnx", "--c-array")
    line = assert_one_error_line(proc, "export")
    assert "--c-array" in line and "tflite-fixed" in line, line
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- MediaPipe

def test_regex_tokenizer_is_recognised_and_the_default_is_not(run_dir, tmp_path):
    from probattn.models.text.tokenizer import (REGEX_DELIMITER, load_tokenizer, regex_spec,
                                                train_regex_tokenizer, train_tokenizer_of_kind)

    assert regex_spec(load_tokenizer(run_dir / "tokenizer.json")) is None
    texts = ["The Movie is GREAT!", "it's naïve — fun", "fun <PAD> fun"]
    tok = train_regex_tokenizer(texts, 50, 8)
    tok.save(str(tmp_path / "t.json"))
    again = load_tokenizer(tmp_path / "t.json")
    assert regex_spec(again) == {"delimiter": REGEX_DELIMITER, "start": False}
    vocab = again.get_vocab()
    assert vocab["<PAD>"] == 0 and vocab["<UNKNOWN>"] == 1 and "Movie" in vocab and "movie" not in vocab
    # '<PAD>' in a text is not the pad token: it is split like any text ("PAD" is a word here)
    assert again.encode("fun <PAD>").ids == [vocab["fun"], vocab["PAD"]]
    assert again.encode("fun movie").ids == [vocab["fun"], 1]
    start = train_tokenizer_of_kind("regex-start", texts, 50, 4)
    assert regex_spec(start)["start"] is True and start.encode("The Movie is GREAT great").ids[0] == start.token_to_id("<START>")
    assert len(start.encode("The Movie is GREAT great").ids) == 4
    with pytest.raises(UsageError):
        train_tokenizer_of_kind("sentencepiece", texts)


def test_train_refuses_an_unknown_tokenizer(tmp_path):
    proc = run_cli("train", "--out", tmp_path / "r", "--tokenizer", "bpe")
    line = assert_one_error_line(proc, "train")
    assert "--tokenizer" in line and "bpe" in line and "regex" in line, line
    assert not (tmp_path / "r").exists()


def test_mediapipe_format_refused_for_the_default_tokenizer(run_dir, tmp_path):
    proc = run_cli("export", run_dir, "--out", tmp_path / "b", "--formats", "mediapipe", "--precisions", "fp32")
    line = assert_one_error_line(proc, "export")
    assert "regex tokenizer" in line and "--tokenizer regex" in line, line
    assert not (tmp_path / "b").exists()


def _echo_with_metadata(tokenizer, length, tmp):
    """A model whose outputs are its input ids (as floats), with the MediaPipe metadata of
    ``tokenizer``: MediaPipe's scores are then the ids its own tokenizer produced."""
    import tensorflow as tf

    from probattn.export.formats.mediapipe import write_metadata
    from probattn.export.formats.tflite import convert
    from probattn.export.formats.tflite_flatbuffer import rewrite_io
    from probattn.export.signature import serving_module
    from probattn.models.keras_compat import get_keras

    keras = get_keras()
    inp = keras.Input(shape=(None,), dtype="int32", name=C.INPUT)
    model = keras.Model(inp, keras.layers.Rescaling(1.0, name=C.PROBABILITIES)(inp))
    module, concrete = serving_module(model, shape=(1, length))
    tf.saved_model.save(module, str(tmp), signatures={C.SIGNATURE_KEY: concrete})
    blob = rewrite_io(convert(str(tmp), "fp32"), C.OUTPUT_ORDER)
    return write_metadata(blob, tokenizer, [f"position{i}" for i in range(length)])


@pytest.mark.parametrize("kind", ["regex", "regex-start"])
def test_mediapipe_tokenizes_exactly_like_the_regex_tokenizer(kind, run_dir, tmp_path):
    """MediaPipe's own tokenizer (inside TextClassifier) and tokenizer.json give the same ids
    on real held-out texts and on the probes."""
    from probattn.export.runtimes.mediapipe import classifier
    from probattn.models.text.tokenizer import encode_fixed, train_tokenizer_of_kind

    texts = _texts(run_dir)
    tok = train_tokenizer_of_kind(kind, texts[200:], 3000, 24)  # a vocabulary that misses words
    blob, version = _echo_with_metadata(tok, 24, tmp_path / "sm")
    assert version == "1.2.1"
    probe_texts = texts[:200] + PROBES
    with classifier(blob) as clf:
        got = []
        for t in probe_texts:
            scores = np.full(24, -1.0, np.float32)
            for c in clf.classify(t).classifications[0].categories:
                scores[c.index] = c.score
            got.append(scores)
    got = np.array(got)
    assert np.array_equal(got, np.round(got)) and got.min() >= 0
    want = encode_fixed(tok, probe_texts, 24)
    bad = [(t[:60], got[i][:10].tolist(), want[i][:10].tolist()) for i, t in enumerate(probe_texts)
           if not np.array_equal(got[i].astype(np.int64), want[i])]
    assert not bad, bad[:3]
    assert (want == 1).any(), "no unknown word among the texts: the test would not see unknown handling"


@pytest.fixture(scope="module")
def regex_bundle(tmp_path_factory):
    """Rotten Tomatoes trained with MediaPipe's regex tokenizer, exported to the device
    formats with --c-array, and verified."""
    from probattn.export.parity import verify
    from probattn.models.train import TrainConfig, train

    d = tmp_path_factory.mktemp("regex")
    train(TrainConfig(epochs=1, seed=0, tokenizer="regex"), d / "run", verbose=0)
    proc = run_cli("export", d / "run", "--out", d / "bundle", "--formats", "tflite-fixed,mediapipe", "--c-array")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = verify(d / "bundle", report_dir=d / "report", quiet=True)
    return d / "bundle", json.loads((d / "bundle" / "manifest.json").read_text()), report


def test_mediapipe_bundle_passes_verify_on_mediapipe(regex_bundle):
    bundle, man, report = regex_bundle
    assert report.passed, "\n".join(c.message() for c in report.failures[:20])
    rows = {(r["artifact"], r["runtime"]): r for r in report.rows}
    for a in _entries(man, "mediapipe"):
        assert a["targets"] == ["litert", "mediapipe"], a["target_checks"]
        # not a TFLite Micro file: the metadata writer unaligns its buffers, and the int8 one runs
        # EXP and LOG in int8 (for LiteRT), which TFLite Micro has no kernels for
        why = "not 16-byte aligned" if a["precision"] == "fp32" else "Node EXP"
        assert why in a["target_checks"]["tflm"], a["target_checks"]["tflm"]
        assert a["metadata"]["min_parser_version"] == "1.2.1" and a["outputs"] == [C.PROBABILITIES]
        r = rows[(a["path"], "mediapipe")]
        assert r["passed"] is True
        if a["precision"] == "fp32":
            assert r["max_abs"] <= FP32_MAX_ABS, r["max_abs"]
        assert r["top1_agreement"] >= INT8_MIN_AGREEMENT
        # every family of ids a text can produce ran (not only the held-out texts)
        assert {"heldout", "all_padding_row", "length_1", "unknown_heavy", "largest_id"} <= set(r["cases"])
        print(f"\n{a['path']} on mediapipe: agreement {r['top1_agreement']:.4f}, accuracy {r['accuracy']:.4f}, "
              f"max abs {r['max_abs']:.3g}")
    for a in _entries(man, "tflite-fixed"):
        assert rows[(a["path"], "tflm")]["passed"] is True


def test_mediapipe_on_the_original_texts_equals_keras(regex_bundle):
    """End to end, no ids handed over: MediaPipe classifies the raw held-out texts and the
    scores equal Keras on tokenizer.json's ids within the fp32 bound, labels included."""
    from probattn.export.runtimes.mediapipe import classifier
    from probattn.models.text.tokenizer import encode_fixed, load_tokenizer

    bundle, man, _ = regex_bundle
    a = B.find_artifact(man, "mediapipe", "fp32")
    texts = _texts(bundle) + PROBES
    L = man["max_length"]
    ids = encode_fixed(load_tokenizer(bundle / "tokenizer.json"), texts, L)
    keras = _keras(bundle)
    ref = np.concatenate([keras(ids[i:i + 256])[C.PROBABILITIES] for i in range(0, len(ids), 256)])
    got, names = [], []
    with classifier((bundle / a["path"]).read_bytes()) as clf:
        for t in texts:
            cats = clf.classify(t).classifications[0].categories
            row = np.zeros(len(man["labels"]), np.float32)
            for c in cats:
                row[c.index] = c.score
            got.append(row)
            names.append(cats[0].category_name)
    got = np.array(got)
    diff = np.abs(got - ref).max()
    assert diff <= FP32_MAX_ABS, diff
    assert names == [man["labels"][k] for k in got.argmax(1)]
    print(f"\nMediaPipe on {len(texts)} raw texts vs Keras: max abs {diff:.3g}")


def test_mediapipe_runner_refuses_ids_no_text_gives(regex_bundle):
    from probattn.export.runtimes.mediapipe import MediaPipeRunner

    bundle, man, _ = regex_bundle
    a = B.find_artifact(man, "mediapipe", "fp32")
    with MediaPipeRunner(bundle / a["path"], man["vocab_size"], input_shape=a["input_shape"]) as r:
        assert r.accepts(np.array([[5, 6, 0, 0]], np.int32))
        assert not r.accepts(np.array([[0, 5, 6]], np.int32))  # padding before a word
        assert not r.accepts(np.zeros((1, man["max_length"] + 1), np.int32))
        with pytest.raises(UsageError):
            r.infer(np.array([[0, 5, 6]], np.int32))


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_c_regex_tokenizer_gives_the_same_ids(regex_bundle, tmp_path):
    """The C tokenizer shipped for regex bundles: same ids as tokenizer.json on the held-out
    texts and the probes; the embedded model is the int8 file, byte for byte."""
    from probattn.models.text.tokenizer import encode_fixed, load_tokenizer

    bundle, man, _ = regex_bundle
    rec = man["files"]["c_array"]
    assert rec["regex_tokenizer"] is True and rec["model"] == "model_fixed_int8.tflite"
    texts = _texts(bundle) + [p for p in PROBES if "\0" not in p]
    head, c_ids, (model, vocab, labels) = compile_and_run(bundle / "c", tmp_path, texts, tokenizer=True)
    want = encode_fixed(load_tokenizer(bundle / "tokenizer.json"), texts, man["max_length"])
    assert np.array_equal(np.array(c_ids), want)
    assert model.read_bytes() == (bundle / rec["model"]).read_bytes()
    assert vocab.read_bytes() == (bundle / C.VOCAB_FILE).read_bytes()
    assert labels.read_bytes() == (bundle / C.LABELS_FILE).read_bytes()
    assert head.startswith("align 0 ")


def test_device_files_are_hashed_claimed_and_audited(regex_bundle, tmp_path):
    """The files the device work added are covered like every other file of a bundle: the C
    sources and labels.txt are hash-checked, a file no field of the schema claims is refused
    even when the attacker lists it in contents, and a mediapipe file's own metadata (the
    labels and vocabulary MediaPipe reads, not the manifest's) must agree with the bundle."""
    import hostile as H

    bundle, man, _ = regex_bundle
    assert man["files"]["c_array"]["files"] and all(f["path"] in man["contents"] for f in man["files"]["c_array"]["files"])
    assert {man["files"]["labels"]["path"], man["files"]["vocabulary"]["path"]} <= set(man["contents"])

    def refused(b, *needles, verb="verify"):
        argv = [verb, b] + (["--report-dir", b.parent / f"{b.name}-report"] if verb == "verify" else ["x"])
        line = assert_one_error_line(run_cli(*argv), verb)
        for n in needles:
            assert n in line, line
        assert not (b.parent / f"{b.name}-report").exists()

    b = H.copy_bundle(bundle, tmp_path / "c_tampered")
    (b / "c" / "model_data.h").write_text((b / "c" / "model_data.h").read_text() + "#define EVIL 1\n")
    refused(b, "c/model_data.h", "does not match its manifest hash")

    b = H.copy_bundle(bundle, tmp_path / "c_extra")
    (b / "c" / "extra.c").write_text("int evil;\n")
    H.rehash(b)
    refused(b, "'c/extra.c'", "schema does not know")

    b = H.copy_bundle(bundle, tmp_path / "c_listed")
    (b / "c" / "extra.c").write_text("int evil;\n")
    m = H.rehash(b)
    m["files"]["c_array"]["files"].append({"path": "c/extra.c", "sha256": m["contents"]["c/extra.c"]})
    H.write_manifest(b, m)
    refused(b, "c/extra.c", "allowed: c/ + one of")

    # the labels swapped in the manifest and labels.txt, rehashed: MediaPipe would still name
    # the classes from the metadata inside the file
    b = H.copy_bundle(bundle, tmp_path / "labels_swapped")
    m = H.manifest(b)
    m["labels"] = list(reversed(m["labels"]))
    (b / "labels.txt").write_text("".join(f"{l}\n" for l in m["labels"]))
    H.rehash(b, m)
    refused(b, "model_mediapipe_fp32.tflite", "labels in order")

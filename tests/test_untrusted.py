"""Untrusted bundles, models and inputs, through the real command line.

Each case builds one hostile input (a copy of the session bundle with one thing changed and
its hashes updated as an attacker would, a hostile model file, an odd option) in its own work
directory; the commands run in child processes a few at a time. Every refusal must be one
stderr line (exit 2, or 1 where the cause is the model or the machine), no traceback, and
nothing written: the work directory is snapshotted before and after. Cases by family:

1. writing outside the bundle or deleting what probattn did not make;
2. code in a bundle (SavedModel ops, links in its variables);
3. silent wrong results (tokenizer padding, manifest values, line splitting, NaN);
4. unbounded memory, time and disk (expanding graphs, loops, zip bombs, FIFOs, threads,
   long lines, batch sizes);
5. internal errors that must be one clear line (regex, signatures, a broken runtime, a cache
   that is a file, out-of-range numbers);
6. read-only and concurrent use, signals and full disks (the tests after the table).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

import hostile as H
from helpers import assert_one_error_line, run_cli
from probattn.export import bundle as B
from probattn.models.fsutil import OUTPUT_MARKER, TMP_PREFIX

TEXTS = ["a gripping , funny and warm film", "dull", "not the worst movie of the year , but close"]


def _snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "fifo" if p.is_fifo() else "file"
        out[str(p.relative_to(root))] = (kind, 0 if kind == "dir" else st.st_size, st.st_mtime_ns if kind == "file" else 0)
    return out


@pytest.fixture(scope="module")
def shared(tmp_path_factory, bundle_dir, run_dir):
    d = tmp_path_factory.mktemp("untrusted")
    s = {"dir": d, "bundle": H.copy_bundle(bundle_dir, d / "bundle"), "run": d / "run"}
    shutil.copytree(run_dir, s["run"])
    m = H.manifest(s["bundle"])
    s["vocab"], s["labels"] = m["vocab_size"], m["labels"]
    s["tok"] = s["run"] / "tokenizer.json"
    clean = run_cli("predict", s["bundle"], *TEXTS, "--json")
    assert clean.returncode == 0, clean.stderr
    s["clean"] = clean.stdout
    return s


@pytest.fixture(scope="module")
def evil_savedmodel(shared, tmp_path_factory):
    """The bundle's own classifier as a SavedModel whose serving signature also calls
    ``tf.io.write_file``: it returns the right probabilities and writes a file on the side."""
    import tensorflow as tf

    from probattn.export.loading import load_keras_model
    from probattn.export.signature import serving_module

    d = tmp_path_factory.mktemp("evil_sm")
    marker = d / "pwned.txt"
    module, _ = serving_module(load_keras_model(shared["bundle"] / "model.keras"), attention=True)

    class Evil(tf.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="token_ids")])
        def serve(self, token_ids):
            tf.io.write_file(str(marker), "pwned")
            return self.inner.serve(token_ids)

    evil = Evil()
    tf.saved_model.save(evil, str(d / "saved_model"), signatures={"serving_default": evil.serve.get_concrete_function()})
    return d / "saved_model", marker


# ------------------------------------------------------------------------------ the table


@dataclass
class Case:
    id: str
    family: int
    build: Callable  # (work dir, shared) -> argv; may create inputs in the work dir
    needles: tuple = ()  # all must appear in the error line
    code: int = 2
    after: Callable | None = None  # (work dir, shared, proc) -> None: extra checks
    env: dict = field(default_factory=dict)
    timeout: int = 300


def _bundle(w, s, change=None) -> Path:
    b = H.copy_bundle(s["bundle"], w / "b")
    if change:
        change(b, w, s)
    return b


def _predict(change, *extra):
    return lambda w, s: ["predict", _bundle(w, s, change), *TEXTS, *extra]


def _verify(change, *extra):
    return lambda w, s: ["verify", _bundle(w, s, change), "--report-dir", w / "report", *extra]


def _manifest_edit(fn):
    def change(b, w, s):
        m = H.manifest(b)
        fn(m)
        H.write_manifest(b, m)
    return change


def _artifact(rel, data_fn):
    def change(b, w, s):
        H.replace_file(b, rel, data_fn(s))
    return change


def _tokenizer(**changes):
    def change(b, w, s):
        H.replace_file(b, "tokenizer.json", H.tokenizer_with(b / "tokenizer.json", **changes))
    return change


def _link_dir_out(name):
    def change(b, w, s):
        (w / "outside").mkdir()
        (b / name).symlink_to(w / "outside")
    return change


def _outside_untouched(w, s, proc):
    assert list((w / "outside").iterdir()) == [], "a file was written outside the bundle"


def _same_as_clean(w, s, proc):
    assert proc.stdout == s["clean"], "the hostile tokenizer changed the results"


def _fifo_at(rel):
    def change(b, w, s):
        (b / rel).unlink()
        os.mkfifo(b / rel)
    return change


def _variables_file(b):
    return next((b / "saved_model" / "variables").glob("variables.data-*"))


def _symlink_variables(b, w, s):
    data = _variables_file(b)
    shutil.copyfile(data, w / "same_bytes_outside")
    data.unlink()
    data.symlink_to(w / "same_bytes_outside")


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _extra_file(rel):
    def change(b, w, s):
        (b / rel).parent.mkdir(parents=True, exist_ok=True)
        (b / rel).write_text("print('hello')")
    return change


def _lines_file(w, s):
    f = w / "odd.txt"
    f.write_bytes("one\x0cform feed\ntwo\x85nel\r\nthree\x1cfs\nfour\u2028ls\n".encode())
    return ["predict", s["bundle"], "--input-file", f, "--json"]


def _four_rows(w, s, proc):
    assert len(proc.stdout.splitlines()) == 4, "a JSON line holds a raw line separator"
    rows = [json.loads(l) for l in proc.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["one\x0cform feed", "two\x85nel", "three\x1cfs", "four\u2028ls"]


def _nan_bundle(b, w, s):
    H.replace_file(b, "model_fp32.onnx", H.onnx_nan_on_padding(vocab=s["vocab"], classes=len(s["labels"])))


def _nan_json(w, s, proc):
    rows = [json.loads(l) for l in proc.stdout.splitlines()]  # valid JSON: no bare NaN
    assert rows[0]["label"] is None and rows[0]["nan"] is True and "NaN" in rows[0]["error"]
    assert all(v is None for v in rows[0]["probabilities"].values())
    assert rows[1]["label"] in s["labels"] and "nan" not in rows[1]


def _nan_text(w, s, proc):
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("ERROR\t") and not lines[1].startswith("ERROR"), lines


def _keras_bomb(case):
    def build(w, s):
        bombs = H.keras_bombs(w, s["run"] / "model.keras")
        return ["export", bombs[case], "--tokenizer", s["tok"], "--out", w / "out", "--formats", "onnx",
                "--precisions", "fp32"]
    return build


def _h5_bomb(w, s):
    import h5py
    import numpy as np

    from probattn.export.audit.archive import MAX_CONFIG_BYTES

    path = w / "m.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps({"class_name": "Functional", "pad": "x" * (MAX_CONFIG_BYTES + 1)})
        f.create_dataset("w", data=np.zeros(4, np.float32))
    return ["export", path, "--tokenizer", s["tok"], "--out", w / "out", "--formats", "onnx", "--precisions", "fp32"]


def _long_line(w, s):
    (w / "long.txt").write_bytes(b"good " * 2_000_000 + b"\n")  # one 10 MB line
    return ["predict", s["bundle"], "--input-file", w / "long.txt"]


def _broken_onnxruntime(w, s):
    pkg = w / "site" / "onnxruntime"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('libonnxruntime.so.1: cannot open shared object file')\n")
    return ["predict", s["bundle"], "a fine film"]


def _evil_sm_into_bundle(b, w, s):
    sm, _ = s["evil_savedmodel"]
    shutil.rmtree(b / "saved_model")
    shutil.copytree(sm, b / "saved_model")
    H.rehash(b)


def _not_pwned(w, s, proc):
    assert not s["evil_savedmodel"][1].exists(), "the SavedModel's WriteFile ran"


def _foreign_folder(w, name, marker_file):
    f = w / name
    f.mkdir()
    (f / marker_file).write_text("{}")
    (f / "chapter1.tex").write_text("years of work")
    return f


CASES = [
    # 1 ------------------------------------------------ writing outside, deleting what is not ours
    Case("verify-report-dir-is-a-link-out-of-the-bundle", 1,
         lambda w, s: ["verify", _bundle(w, s, _link_dir_out("report"))],
         ("report", "symbolic link", "--report-dir"), after=_outside_untouched),
    Case("bench-dir-is-a-link-out-of-the-bundle", 1,
         lambda w, s: ["bench", _bundle(w, s, _link_dir_out("bench")), "--quick", "--threads", "1", "--runtimes", "onnxruntime"],
         ("bench", "symbolic link", "--out"), after=_outside_untouched),
    Case("export-overwrite-a-folder-with-a-manifest", 1,
         lambda w, s: ["export", s["run"], "--out", _foreign_folder(w, "thesis", "manifest.json"), "--overwrite",
                       "--formats", "onnx", "--precisions", "fp32"],
         ("--overwrite replaces only a bundle probattn made", "left alone")),
    Case("train-overwrite-a-folder-with-metrics", 1,
         lambda w, s: ["train", "--dataset", s["run"] / "test.jsonl", "--out", _foreign_folder(w, "results", "metrics.json"),
                       "--overwrite"],
         ("--overwrite replaces only a run probattn made", "left alone")),
    Case("export-overwrite-a-run", 1,
         lambda w, s: ["export", s["run"], "--out", shutil.copytree(s["run"], w / "run"), "--overwrite",
                       "--formats", "onnx", "--precisions", "fp32"],
         ("replaces only a probattn bundle", "is a probattn run")),
    Case("export-out-is-a-link", 1,
         lambda w, s: (H.copy_bundle(s["bundle"], w / "real"), (w / "link").symlink_to(w / "real"),
                       ["export", s["run"], "--out", w / "link", "--overwrite", "--formats", "onnx",
                        "--precisions", "fp32"])[-1],
         ("link", "symbolic link")),
    Case("tokenizer-path-absolute-without-hash", 1,
         _predict(_manifest_edit(lambda m: m.update(tokenizer={"path": "/etc/hostname"}))),
         ("/etc/hostname", "absolute path")),
    Case("test-data-outside-the-bundle", 1,
         lambda w, s: ["verify", _bundle(w, s, _manifest_edit(lambda m: m.update(test_data="../x.jsonl"))),
                       "--report-dir", w / "report"],
         ("../x.jsonl", "outside the bundle")),
    Case("nul-byte-in-a-path", 1, _predict(_manifest_edit(lambda m: m["artifacts"][-1].update(path="model\0.onnx"))),
         ("NUL",)),
    Case("artifact-is-a-fifo", 1, _predict(_fifo_at("model_fp32.onnx")), ("model_fp32.onnx", "FIFO"), timeout=60),
    Case("manifest-is-a-fifo", 1, _predict(_fifo_at("manifest.json")), ("manifest.json", "FIFO"), timeout=60),
    Case("tokenizer-is-a-fifo", 1, _predict(_fifo_at("tokenizer.json")), ("tokenizer.json", "FIFO"), timeout=60),
    # 2 ------------------------------------------------ code and files in a bundle
    Case("savedmodel-writes-a-file", 2, _verify(_evil_sm_into_bundle), ("WriteFile", "--unsafe"), after=_not_pwned),
    Case("export-from-a-savedmodel-that-writes-a-file", 2,
         lambda w, s: ["export", s["evil_savedmodel"][0], "--tokenizer", s["tok"], "--out", w / "out",
                       "--formats", "onnx", "--precisions", "fp32"],
         ("WriteFile", "--unsafe"), after=_not_pwned),
    Case("savedmodel-variables-link-out-of-the-bundle", 2, _verify(_symlink_variables),
         ("variables.data", "symbolic link")),
    Case("savedmodel-variables-tampered", 2, _verify(lambda b, w, s: _flip(_variables_file(b))),
         ("variables/variables.data", "does not match its manifest hash")),
    Case("savedmodel-extra-file", 2, _verify(_extra_file("saved_model/assets/run_me.py")),
         ("saved_model/assets/run_me.py", "does not list")),
    Case("bundle-extra-file", 2, _verify(_extra_file("hook.py")), ("hook.py", "do not list")),
    # a file the attacker also lists in contents: no field of the schema claims it
    Case("bundle-extra-file-listed-in-contents", 2,
         _predict(lambda b, w, s: (_extra_file("hook.py")(b, w, s), H.rehash(b))),
         ("'hook.py'", "schema does not know")),
    Case("vocab-txt-tampered", 2, _predict(lambda b, w, s: _flip(b / "vocab.txt")),
         ("vocab.txt", "does not match its manifest hash")),
    Case("labels-txt-tampered", 2, _verify(lambda b, w, s: _flip(b / "labels.txt")),
         ("labels.txt", "does not match its manifest hash")),
    # 3 ------------------------------------------------ silent wrong results
    Case("tokenizer-pads-with-id-18", 3, _predict(_tokenizer(padding=H.PAD_18), "--json"), code=0, after=_same_as_clean),
    Case("manifest-max-length-0", 3, _predict(_manifest_edit(lambda m: m.update(max_length=0))),
         ("'max_length'", "1 to 32,768", "found 0")),
    Case("manifest-max-length-negative", 3, _predict(_manifest_edit(lambda m: m.update(max_length=-1))),
         ("'max_length'", "found -1")),
    Case("manifest-max-length-string", 3, _predict(_manifest_edit(lambda m: m.update(max_length="64"))),
         ("'max_length'", "found '64'")),
    Case("manifest-3-labels-for-2-classes", 3, _predict(_manifest_edit(lambda m: m.update(labels=m["labels"] + ["x"]))),
         ("2 classes", "3 labels")),
    Case("manifest-10000-labels", 3,
         _predict(_manifest_edit(lambda m: m.update(labels=[f"l{i}" for i in range(10_000)]))), ("10000 labels",)),
    Case("manifest-duplicate-artifact", 3,
         _predict(_manifest_edit(lambda m: m["artifacts"].append(dict(m["artifacts"][-1])))), ("listed twice",)),
    Case("manifest-int8-entry-served-as-fp32", 3,
         _predict(_manifest_edit(lambda m: (m["artifacts"].remove(B.find_artifact(m, "onnx", "fp32")),
                                            B.find_artifact(m, "onnx", "int8").update(precision="fp32")))),
         ("model_int8.onnx", "listed as onnx fp32", "model_fp32.onnx")),
    Case("int8-file-copied-over-fp32", 3,
         _predict(lambda b, w, s: H.replace_file(b, "model_fp32.onnx", (b / "model_int8.onnx").read_bytes())),
         ("model_fp32.onnx", "listed as fp32", "quantized")),
    # raw clients read labels.txt and vocab.txt, not the manifest: rehashed, they must still agree
    Case("labels-txt-reordered-and-rehashed", 3,
         _predict(lambda b, w, s: H.replace_file(b, "labels.txt",
                                                 "".join(f"{l}\n" for l in reversed(s["labels"])).encode())),
         ("labels.txt differs from the manifest's labels", "line 1")),
    Case("vocab-txt-shifted-and-rehashed", 3,
         _predict(lambda b, w, s: H.replace_file(
             b, "vocab.txt", b"".join(sorted((b / "vocab.txt").read_bytes().splitlines(keepends=True))))),
         ("vocab.txt differs from tokenizer.json's vocabulary",)),
    Case("manifest-vocab-txt-claims-a-c-file", 3,
         _predict(_manifest_edit(lambda m: m["files"]["vocabulary"].update(path="c/x.c"))),
         ("files.vocabulary", "vocab.txt")),
    Case("manifest-fixed-input-shape-lies", 3,
         _verify(_manifest_edit(lambda m: B.find_artifact(m, "tflite-fixed", "fp32").update(input_shape=[1, 9]))),
         ("model_fixed_fp32.tflite", "stores input", "[1, 9]")),
    Case("manifest-fixed-input-shape-dynamic", 3,
         _predict(_manifest_edit(lambda m: B.find_artifact(m, "tflite-fixed", "fp32").update(
             input_shape=["batch", "sequence"]))),
         ("tflite-fixed", "input_shape [1, length]")),
    Case("manifest-int8-output-dtype-on-a-float-file", 3,
         _predict(_manifest_edit(lambda m: B.find_artifact(m, "tflite", "fp32").update(output_dtype="int8"))),
         ("output_dtype 'int8'", "allowed: float32")),
    Case("manifest-unknown-target", 3,
         _predict(_manifest_edit(lambda m: B.find_artifact(m, "tflite-fixed", "int8").update(targets=["esp32"]))),
         ("'targets'", "litert, tflm, mediapipe")),
    Case("fixed-file-swapped-for-the-dynamic-one", 3,
         _verify(lambda b, w, s: H.replace_file(b, "model_fixed_fp32.tflite", (b / "model_fp32.tflite").read_bytes())),
         ("model_fixed_fp32.tflite", "stores input")),
    Case("manifest-vocab-size-2**40", 3, _predict(_manifest_edit(lambda m: m.update(vocab_size=2**40))),
         ("'vocab_size'", "2,000,000")),
    Case("manifest-vocab-past-the-embedding-onnx", 3,
         _predict(_manifest_edit(lambda m: m.update(vocab_size=m["vocab_size"] + 100))), ("embedding has", "rows")),
    Case("manifest-vocab-past-the-embedding-litert", 3,
         _predict(_manifest_edit(lambda m: m.update(vocab_size=m["vocab_size"] + 100)), "--runtime", "litert"),
         ("embedding has", "does not check")),
    Case("input-lines-split-only-on-newline", 3, _lines_file, code=0, after=_four_rows),
    Case("nan-output-json", 3, lambda w, s: ["predict", _bundle(w, s, _nan_bundle), "", "good", "--json"],
         ("1 of 2 texts got no label", "NaN"), code=1, after=_nan_json),
    Case("nan-output-text", 3, lambda w, s: ["predict", _bundle(w, s, _nan_bundle), "", "good"],
         ("got no label",), code=1, after=_nan_text),
    # 4 ------------------------------------------------ unbounded memory, time and disk
    Case("tokenizer-pads-to-2-million", 4, _predict(_tokenizer(padding=H.PAD_FIXED_2M), "--json"), code=0,
         after=_same_as_clean),
    Case("onnx-expands-to-3e9-values", 4,
         _predict(_artifact("model_fp32.onnx", lambda s: H.onnx_constant_bomb(s["vocab"]))),
         ("ConstantOfShape", "3,000,000,000 values")),
    Case("onnx-expands-with-the-input", 4,
         _verify(_artifact("model_fp32.onnx", lambda s: H.onnx_input_scaled_bomb(s["vocab"])), "--formats", "onnx"),
         ("model_fp32.onnx", "2,560,000,000 values")),
    Case("onnx-loop-of-1e12-trips", 4, _predict(_artifact("model_fp32.onnx", lambda s: H.onnx_loop_bomb(s["vocab"]))),
         ("Loop", "1,000,000,000,000")),
    Case("keras-config-inflates-past-4mb", 4, _keras_bomb("config-over-cap"), ("config.json inflates to",)),
    Case("keras-weights-inflate-1000x", 4, _keras_bomb("weights-ratio"), ("model.weights.h5 inflates", "at most 200x")),
    Case("keras-entry-escapes", 4, _keras_bomb("path-traversal"), ("../evil.txt",)),
    Case("keras-entry-is-a-link", 4, _keras_bomb("symlink-entry"), ("symbolic link",)),
    Case("h5-config-past-4mb", 4, _h5_bomb, ("model_config may hold up to",)),
    Case("bench-threads-100000", 4, lambda w, s: ["bench", s["bundle"], "--threads", "100000", "--out", w / "bench"],
         ("100,000", "allowed: 1 to")),
    Case("predict-10mb-line", 4, _long_line, ("line 1 is longer than 100,000 characters",)),
    Case("predict-batch-size-1000000", 4, lambda w, s: ["predict", s["bundle"], "x", "--batch-size", "1000000"],
         ("--batch-size", "1,024")),
    # 5 ------------------------------------------------ one clear line instead of an internal error
    Case("tokenizer-backtracking-regex", 5, _predict(_tokenizer(pre_tokenizer=H.BACKTRACKING_SPLIT)),
         ("regex", "not one of probattn's patterns")),
    *[Case(f"onnx-signature-{k}", 5,
           _predict(_artifact("model_fp32.onnx", lambda s, k=k: H.onnx_signature(k, s["vocab"]))), (needle,))
      for k, needle in (("renamed", "input_1"), ("rank3", "rank 3"), ("extra", "mask"),
                        ("no-probabilities", "outputs are ['scores']"))],
    Case("onnx-signature-float", 5, _predict(_artifact("model_fp32.onnx", lambda s: H.onnx_float_input(s["vocab"]))),
         ("token_ids float rank 2",)),
    # Python's import system may cache the stand-in's bytecode beside it: not a write of ours
    Case("runtime-fails-on-import", 5, _broken_onnxruntime, ("onnxruntime", "failed to import", "--runtime openvino"),
         env={"PYTHONPATH": "{w}/site", "PYTHONDONTWRITEBYTECODE": "1"}),
    Case("cache-dir-is-a-file", 5,
         lambda w, s: ((w / "cache").write_text("x"), ["train", "--dataset", "rotten_tomatoes", "--out", w / "out"])[1],
         ("not a writable directory", "PROBATTN_CACHE_DIR"), env={"PROBATTN_CACHE_DIR": "{w}/cache"}),
    Case("train-max-length-1e12", 5, lambda w, s: ["train", "--out", w / "out", "--max-length", "1000000000000"],
         ("--max-length", "32,768", "1000000000000")),
    Case("train-max-length-1e12-float", 5, lambda w, s: ["train", "--out", w / "out", "--max-length", "1e12"],
         ("--max-length", "32,768", "'1e12'")),
    Case("train-vocab-size-2**40", 5, lambda w, s: ["train", "--out", w / "out", "--vocab-size", str(2**40)],
         ("--vocab-size", "2,000,000")),
    Case("train-embedding-dim-1e9", 5, lambda w, s: ["train", "--out", w / "out", "--embedding-dim", "1000000000"],
         ("--embedding-dim", "4,096")),
    Case("export-max-length-1e9", 5, lambda w, s: ["export", s["run"], "--out", w / "out", "--max-length", "1000000000"],
         ("--max-length", "32,768")),
]

FAMILIES = {f: [c.id for c in CASES if c.family == f] for f in range(1, 6)}


@pytest.fixture(scope="module")
def results(shared, evil_savedmodel, tmp_path_factory):
    shared["evil_savedmodel"] = evil_savedmodel
    root = tmp_path_factory.mktemp("cases")
    jobs = {}
    for case in CASES:
        w = root / case.id
        w.mkdir()
        argv = case.build(w, shared)
        env = {k: v.format(w=w) for k, v in case.env.items()}
        jobs[case.id] = (w, argv, env, _snapshot(w))

    def run(item):
        cid, (w, argv, env, before) = item
        case = next(c for c in CASES if c.id == cid)
        try:
            return cid, run_cli(*argv, env=env, timeout=case.timeout)
        except subprocess.TimeoutExpired:
            return cid, None

    with ThreadPoolExecutor(max_workers=(os.cpu_count() or 2) + 1) as pool:
        procs = dict(pool.map(run, jobs.items()))
    return {cid: (procs[cid], w, argv, before, _snapshot(w)) for cid, (w, argv, env, before) in jobs.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_untrusted_input(case, results, shared):
    proc, w, argv, before, after = results[case.id]
    shown = f"probattn {' '.join(map(str, argv))}"
    assert proc is not None, f"{shown} did not finish within {case.timeout} s (a hang)"
    where = f"{shown}\nexit {proc.returncode}\nstdout: {proc.stdout[-1500:]}\nstderr: {proc.stderr[-3000:]}"
    if case.code == 0:
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, where
    else:
        line = assert_one_error_line(proc, str(argv[0]), code=case.code, stdout_empty=case.code == 2)
        for needle in case.needles:
            assert needle in line, f"{needle!r} missing\n{where}"
    assert before == after, f"files changed: {sorted(set(after.items()) ^ set(before.items()))[:6]}\n{where}"
    if case.after:
        case.after(w, shared, proc)


def test_every_family_has_cases():
    assert all(len(ids) >= 4 for ids in FAMILIES.values()), FAMILIES


# ------------------------------------------------------------------------------ 6: read-only, full disks, concurrency


def _unshare_ok() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && echo ok"],
                       capture_output=True, text=True)
    return r.stdout.strip() == "ok"


UNSHARE = _unshare_ok()
needs_unshare = pytest.mark.skipif(not UNSHARE, reason="no unprivileged user and mount namespaces here")


def _in_namespace(setup: str, argv, env=None, timeout=900):
    """Run ``probattn ARGV`` after ``setup`` (shell, e.g. mounts) in a private user and mount
    namespace (``unshare -rm``): nothing of it is visible outside."""
    cmd = " ".join(f"'{a}'" for a in [sys.executable, "-m", "probattn.export.cli", *map(str, argv)])
    script = f"{setup} && {cmd}; rc=$?; exit $rc"
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


@needs_unshare
def test_read_only_bundle_verifies_into_a_writable_report_dir(shared, tmp_path):
    """No lock file, no write in the bundle: a read-only mount of it verifies; the report goes
    to --report-dir and the verdict is not recorded (the manifest cannot be written)."""
    b = H.copy_bundle(shared["bundle"], tmp_path / "ro")
    before = _snapshot(b)
    ro = f"mount --bind '{b}' '{b}' && mount -o remount,ro,bind '{b}'"
    refused = _in_namespace(ro, ["verify", b])
    line = assert_one_error_line(refused, "verify")
    assert "Read-only file system" in line and "--report-dir" in line, line
    proc = _in_namespace(ro, ["verify", b, "--formats", "onnx", "--report-dir", tmp_path / "report"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "read-only; the verdict is not recorded" in proc.stderr
    assert json.loads((tmp_path / "report" / "parity.json").read_text())["passed"] is True
    assert _snapshot(b) == before


@needs_unshare
def test_read_only_home_is_one_clear_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc = _in_namespace(f"mount --bind '{home}' '{home}' && mount -o remount,ro,bind '{home}'",
                         ["train", "--dataset", "rotten_tomatoes", "--out", tmp_path / "out"],
                         env={"HOME": str(home), "PROBATTN_CACHE_DIR": ""})
    line = assert_one_error_line(proc, "train")
    assert "not a writable directory" in line and "PROBATTN_CACHE_DIR" in line, line


def _full_disk(argv_of, tmp_path, size):
    """Run ``argv_of(out_parent)`` with its output on a full file system: a tmpfs of ``size``
    in a private mount namespace, or (without namespaces) a file-size limit."""
    fs = tmp_path / "fs"
    fs.mkdir()
    if UNSHARE:
        proc = _in_namespace(f"mount -t tmpfs -o size={size} tmpfs '{fs}'", argv_of(fs))
        return proc, "no space left on the device"
    import resource

    limit = {"64k": 64 << 10, "1m": 1 << 20}[size]
    proc = subprocess.run([sys.executable, "-m", "probattn.export.cli", *map(str, argv_of(fs))], capture_output=True,
                          text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=900,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    return proc, "file-size limit"


def test_full_disk_during_export_is_one_line_and_leaves_nothing(shared, tmp_path):
    proc, needle = _full_disk(lambda fs: ["export", shared["run"], "--out", fs / "bundle", "--formats", "onnx",
                                          "--precisions", "fp32"], tmp_path, "1m")
    line = assert_one_error_line(proc, "export", code=1)
    assert needle in line and "nothing was written" in line, line
    if not UNSHARE:  # the tmpfs vanished with its namespace; on the real disk nothing may remain
        assert [p.name for p in (tmp_path / "fs").iterdir()] == [f"{TMP_PREFIX}bundle.lock"]


def test_full_disk_during_train_is_one_line(shared, tmp_path):
    proc, needle = _full_disk(lambda fs: ["train", "--dataset", shared["run"] / "test.jsonl", "--out", fs / "run",
                                          "--epochs", "1", "--vocab-size", "2000", "--embedding-dim", "32",
                                          "--max-length", "16"], tmp_path, "64k")
    line = assert_one_error_line(proc, "train", code=1)
    assert needle in line, line


def test_predict_streams_stdin_as_it_arrives(shared):
    """Results come out while the input is still open (a pipe, a log tail): two lines in, two
    results out, before stdin is closed."""
    import queue
    import threading

    p = subprocess.Popen([sys.executable, "-m", "probattn.export.cli", "predict", shared["bundle"], "--input-file", "-",
                          "--json"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in p.stdout], daemon=True).start()
    try:
        p.stdin.write("a fine film\nawful\n")
        p.stdin.flush()
        try:
            got = [json.loads(lines.get(timeout=120))["text"] for _ in range(2)]
        except queue.Empty:
            pytest.fail("no output before the end of the input")
        assert got == ["a fine film", "awful"]
        p.stdin.write("third\n")
        p.stdin.close()
        assert json.loads(lines.get(timeout=120))["text"] == "third"
        assert p.wait(60) == 0
    finally:
        if p.poll() is None:
            p.kill()


def test_predict_memory_stays_flat_on_a_long_stream(shared, tmp_path):
    """60,000 lines (4.6 MB) against 600: the peak memory grows by less than the input's own
    size, so the input is not held (the batch is: --batch-size texts, at most
    limits.BATCH_CHAR_BUDGET characters)."""
    import random

    r = random.Random(0)
    words = "the a film movie good bad plot actor funny dull great awful story".split()
    peaks = {}
    for n in (600, 60_000):
        f = tmp_path / f"lines{n}.txt"
        f.write_text("".join(" ".join(r.choice(words) for _ in range(r.randint(1, 30))) + "\n" for _ in range(n)))
        # VmHWM (kB): this process's own peak since exec; ru_maxrss would keep the test worker's
        # peak from before exec (vfork) and hide any growth
        code = ("import sys\nfrom probattn.export.cli import main\n"
                f"rc = main(['predict', {str(shared['bundle'])!r}, '--input-file', {str(f)!r}, '--json'])\n"
                "print('RSS', next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')), "
                "file=sys.stderr)\nsys.exit(rc)\n")
        p = subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           timeout=900)
        assert p.returncode == 0, p.stderr[-2000:]
        peaks[n] = int(p.stderr.split("RSS ")[-1]) * 1024
    size = (tmp_path / "lines60000.txt").stat().st_size
    assert peaks[60_000] - peaks[600] < size, f"peak grew by {(peaks[60_000] - peaks[600]) / 2**20:.1f} MB"


def test_predict_never_mixes_two_bundles_while_they_are_swapped(shared, tmp_path):
    """A writer swaps two different valid bundles at one path over and over while predictors
    load from it: every load sees one whole bundle (its hashes all match)."""
    import threading

    from probattn.export.predict import Predictor
    from probattn.models import fsutil

    target = tmp_path / "B"
    one = H.copy_bundle(shared["bundle"], tmp_path / "one")
    two = H.copy_bundle(shared["bundle"], tmp_path / "two")
    tok = json.loads((two / "tokenizer.json").read_text())
    (two / "tokenizer.json").write_text(json.dumps(tok, indent=2))  # same tokenizer, other bytes
    H.rehash(two)
    shutil.copytree(one, target, symlinks=True)
    stop = threading.Event()
    swaps = [0]

    def writer():
        from probattn.models.errors import UsageError

        while not stop.is_set():
            for src in (two, one):
                try:
                    with fsutil.atomic_directory(target, overwrite=True, kind="bundle") as tmp:
                        for p in src.iterdir():
                            if p.name != OUTPUT_MARKER:
                                (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
                    swaps[0] += 1
                except UsageError:  # a predictor held the bundle for longer than the writer waits: try again
                    pass

    th = threading.Thread(target=writer, daemon=True)
    th.start()
    try:
        loads = 0
        t_end = time.monotonic() + 20
        while time.monotonic() < t_end or (swaps[0] < 4 and time.monotonic() < t_end + 120):
            Predictor(target).predict(["a fine film"])  # a UsageError (hash mismatch) would fail the test
            loads += 1
    finally:
        stop.set()
        th.join(60)
    assert swaps[0] >= 4 and loads >= 4, (swaps[0], loads)

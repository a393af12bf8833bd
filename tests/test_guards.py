"""The checks of untrusted files, one by one, on hostile files built here (no TensorFlow):
paths and writes that never follow a link, the tokenizer guard, the ONNX audit, the .keras /
.h5 audit, resource limits, line splitting, and the signal watchdog. The CLI families are in
test_untrusted.py."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import hostile as H
from probattn.models import fsutil
from probattn.models.errors import UsageError

# --------------------------------------------------------------------------- paths and writes


def test_write_file_at_replaces_a_planted_link_never_its_target(tmp_path):
    outside = tmp_path / "thesis.txt"
    outside.write_text("precious")
    d = tmp_path / "report"
    d.mkdir()
    (d / "parity.json").symlink_to(outside)
    fd = fsutil.open_output_dir(d)
    try:
        fsutil.write_file_at(fd, "parity.json", "{}")
    finally:
        os.close(fd)
    assert outside.read_text() == "precious"
    assert not (d / "parity.json").is_symlink() and (d / "parity.json").read_text() == "{}"


def test_write_file_at_never_follows_a_link_planted_at_its_temporary_name(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.write_text("precious")
    d = tmp_path / "d"
    d.mkdir()
    import secrets

    monkeypatch.setattr(secrets, "token_hex", lambda n: "fixed")  # fsutil imports it when it writes
    (d / ".parity.json.fixed.tmp").symlink_to(outside)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            fsutil.write_file_at(fd, "parity.json", "{}")
    finally:
        os.close(fd)
    assert outside.read_text() == "precious"


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_output_dir_that_is_a_link_or_a_file_is_refused(tmp_path, kind):
    target = tmp_path / "elsewhere"
    target.mkdir()
    out = tmp_path / "report"
    if kind == "symlink":
        out.symlink_to(target)
    else:
        out.write_text("x")
    with pytest.raises(UsageError, match="symbolic link" if kind == "symlink" else "not a directory"):
        fsutil.open_output_dir(out)
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("rel", ["/etc/passwd", "../x.jsonl", "a/../../x", "a//b", "./a", "a\\b", "a\0b", ""])
def test_safe_relpath_refuses_what_leaves_the_bundle(rel):
    with pytest.raises(UsageError) as e:
        fsutil.safe_relpath(rel)
    assert "\n" not in str(e.value)


def _bundle_dir(tmp_path):
    d = tmp_path / "bundle"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("a")
    (d / "sub" / "b.txt").write_text("b")
    return d


def test_locked_directory_reads_plain_files_and_refuses_links_and_fifos(tmp_path):
    d = _bundle_dir(tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    (d / "link.txt").symlink_to(outside)
    (d / "linkdir").symlink_to(d / "sub")
    os.mkfifo(d / "fifo")
    with fsutil.LockedDirectory(d) as r:
        assert r.read("sub/b.txt", 100) == b"b"
        with pytest.raises(UsageError, match="symbolic link"):
            r.read("link.txt", 100)
        with pytest.raises(UsageError, match="symbolic link or not a directory"):
            r.read("linkdir/b.txt", 100)
        t = time.monotonic()
        with pytest.raises(UsageError, match="FIFO"):
            r.read("fifo", 100)
        assert time.monotonic() - t < 30, "opening a FIFO blocked"
        with pytest.raises(UsageError, match="at most 0"):
            r.read("a.txt", 0)
        with pytest.raises(UsageError, match="points outside"):
            r.read("../outside.txt", 100)


def test_hash_tree_refuses_links_and_fifos_anywhere(tmp_path):
    d = _bundle_dir(tmp_path)
    assert set(fsutil.hash_tree(d)) == {"a.txt", "sub/b.txt"}
    (d / "sub" / "l").symlink_to(tmp_path)
    with pytest.raises(UsageError, match="sub/l is a symbolic link"):
        fsutil.hash_tree(d)
    (d / "sub" / "l").unlink()
    os.mkfifo(d / "sub" / "f")
    with pytest.raises(UsageError, match="sub/f is a FIFO"):
        fsutil.hash_tree(d)


def test_a_reader_sees_one_generation_while_a_writer_replaces_the_directory(tmp_path):
    """The writer's swap waits for the reader's shared lock; the reader, meanwhile, reads the
    old directory whole, never a mix."""
    target = tmp_path / "B"
    with fsutil.atomic_directory(target, kind="bundle") as tmp:
        (tmp / "manifest").write_text("old")
        (tmp / "model").write_text("old")
    done = threading.Event()
    with fsutil.LockedDirectory(target) as r:
        assert r.read("manifest", 10) == b"old"

        def write_new():
            with fsutil.atomic_directory(target, overwrite=True, kind="bundle") as tmp:
                (tmp / "manifest").write_text("new")
                (tmp / "model").write_text("new")
            done.set()

        fsutil.START_WAIT_SECONDS, saved = 0.0, fsutil.START_WAIT_SECONDS
        try:
            with pytest.raises(UsageError, match="another probattn process is writing or verifying"):
                write_new()  # refused at the start: a reader holds the bundle
        finally:
            fsutil.START_WAIT_SECONDS = saved
        writer = threading.Thread(target=lambda: fsutil._install(_prepared(tmp_path), target))
        writer.start()
        time.sleep(0.5)
        assert writer.is_alive(), "the writer swapped the directory under a reader"
        assert r.read("model", 10) == b"old"
    writer.join(30)
    assert (target / "model").read_text() == "new" and (target / "manifest").read_text() == "new"


def _prepared(tmp_path):
    d = tmp_path / f"{fsutil.TMP_PREFIX}B-abcdefgh"
    d.mkdir()
    (d / "manifest").write_text("new")
    (d / "model").write_text("new")
    return d


def test_overwrite_needs_the_marker_of_the_same_kind(tmp_path):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "manifest.json").write_text("{}")
    (foreign / "metrics.json").write_text("{}")
    for kind in ("bundle", "run"):
        with pytest.raises(UsageError, match=f"replaces only a {kind} probattn made"):
            fsutil.check_output_dir(foreign, overwrite=True, kind=kind)
    run = tmp_path / "run"
    with fsutil.atomic_directory(run, kind="run") as tmp:
        (tmp / "metrics.json").write_text("{}")
    marker = json.loads((run / fsutil.OUTPUT_MARKER).read_text())
    assert marker["tool"] == "probattn" and marker["kind"] == "run" and marker["created"]
    fsutil.check_output_dir(run, overwrite=True, kind="run")
    with pytest.raises(UsageError, match="is a probattn run"):
        fsutil.check_output_dir(run, overwrite=True, kind="bundle")
    (run / fsutil.OUTPUT_MARKER).unlink()
    (run / fsutil.OUTPUT_MARKER).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(UsageError, match="has none"):
        fsutil.check_output_dir(run, overwrite=True, kind="run")


def test_out_that_is_a_link_is_refused_and_nothing_is_left_beside_it(tmp_path):
    real = tmp_path / "real"
    with fsutil.atomic_directory(real, kind="bundle") as tmp:
        (tmp / "keep").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(UsageError, match="is a symbolic link"):
        with fsutil.atomic_directory(link, overwrite=True, kind="bundle"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["link", "real"]
    assert (real / "keep").read_text() == "x"


# --------------------------------------------------------------------------- predict's line reader


def _lines(data: bytes):
    import tempfile

    from probattn.export.cli import read_blocks

    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        return [t for block, _ in read_blocks(f.fileno(), "input") for t in block]


def test_lines_split_on_newline_only():
    """str.splitlines would split these 4 lines into 8 (form feed, NEL, U+001C, U+2028)."""
    texts = ["a\x0cb", "c\x85d", "e\x1cf", "g\u2028h"]
    data = ("\n".join(texts[:2]) + "\r\n" + "\n".join(texts[2:])).encode()
    assert len(data.decode().splitlines()) == 8
    assert _lines(data) == texts
    assert _lines(b"a\rb\n") == ["a\rb"]  # a lone \r is text
    assert _lines(b"") == [] and _lines(b"\n") == [""]


def test_line_reader_refuses_long_lines_and_bad_utf8_by_number():
    from probattn.models.text.data import MAX_TEXT_CHARS

    with pytest.raises(UsageError, match=f"line 2 has {MAX_TEXT_CHARS + 1:,} characters"):
        _lines(b"ok\n" + b"x" * (MAX_TEXT_CHARS + 1) + b"\n")
    with pytest.raises(UsageError, match="line 1 is longer than"):
        _lines(b"x" * (10 << 20))  # 10 MB without a newline: refused after reading ~400 KB
    with pytest.raises(UsageError, match=r"not valid UTF-8 \(line 2, byte 4\)"):
        _lines(b"fine\ncaf\xe9\n")


# --------------------------------------------------------------------------- tokenizer guard


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    from probattn.models.text.tokenizer import train_tokenizer

    texts = ["the movie was great and fun", "a bad film , not good at all", "naïve école café"] * 5
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(texts, vocab_size=200, max_length=64).save(str(path))
    return path


def _load(data, **kw):
    from probattn.models.text.tokenizer import load_tokenizer

    notes = []
    return load_tokenizer(data, notes=notes, **kw), notes


def test_tokenizer_padding_pad_id_18_is_turned_off(tok_file):
    from tokenizers import Tokenizer

    data = H.tokenizer_with(tok_file, padding=H.PAD_18)
    raw = Tokenizer.from_str(data.decode())
    assert [e.ids for e in raw.encode_batch(["good", "the movie was great"])][0][1:] == [18, 18, 18]
    tok, notes = _load(data, max_length=64)
    assert [len(e.ids) for e in tok.encode_batch(["good", "the movie was great"])] == [1, 4]
    assert any("padding" in n and "turned off" in n for n in notes)


def test_tokenizer_fixed_padding_and_huge_truncation_are_forced_to_max_length(tok_file):
    from probattn.models.text.tokenizer import encode

    data = H.tokenizer_with(tok_file, padding=H.PAD_FIXED_2M,
                            truncation={"max_length": 10**9, "stride": 0, "strategy": "LongestFirst", "direction": "Right"})
    tok, notes = _load(data, max_length=64)
    assert encode(tok, ["good"]).shape == (1, 1)
    assert encode(tok, ["good " * 10_000]).shape == (1, 64)
    assert any("truncation" in n and "64" in n for n in notes)


def test_tokenizer_stride_panic_is_removed_and_a_panic_is_one_error(tok_file):
    from tokenizers import Tokenizer

    from probattn.models.text.tokenizer import encode

    data = H.tokenizer_with(tok_file, truncation={"max_length": 4, "stride": 10, "strategy": "LongestFirst",
                                                  "direction": "Right"})
    raw = Tokenizer.from_str(data.decode())
    with pytest.raises(UsageError, match="panicked"):  # a BaseException turned into one line
        encode(raw, ["the movie was great and fun"])
    tok, _ = _load(data, max_length=4)
    assert encode(tok, ["the movie was great and fun"]).shape == (1, 4)


@pytest.mark.parametrize("change,needle", [
    (lambda c: c.update(pre_tokenizer=H.BACKTRACKING_SPLIT), "not one of probattn's patterns"),
    (lambda c: c.update(normalizer={"type": "Precompiled", "precompiled_charsmap": "AAAA"}), "type 'Precompiled'"),
    (lambda c: c["model"].update(type="BPE"), "model 'BPE' is not allowed"),
    (lambda c: c.update(added_tokens=[{"id": 5, "content": "zzz-not-in-vocab", "special": True}]),
     "not in the vocabulary with the same id"),
    (lambda c: c["model"]["vocab"].update({"[PAD]": 7, c["model"]["unk_token"]: 1}), "ids must be exactly"),
    (lambda c: c.update(post_processor={"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0]}),
     "post_processor 'RobertaProcessing'"),
], ids=["backtracking-regex", "unknown-normalizer", "bpe-model", "added-token-outside-vocab", "ids-not-dense",
        "post-processor"])
def test_tokenizer_guard_refuses(tok_file, change, needle):
    cfg = json.loads(tok_file.read_text())
    change(cfg)
    with pytest.raises(UsageError, match=needle):
        _load(json.dumps(cfg).encode(), max_length=64)


def test_tokenizer_guard_refuses_duplicate_keys_and_a_vocabulary_past_the_model(tok_file):
    text = tok_file.read_text()
    dup = text.replace('"[UNK]":1', '"[UNK]":1,"[UNK]":2', 1).replace('"[UNK]": 1', '"[UNK]": 1, "[UNK]": 2', 1)
    assert dup != text
    with pytest.raises(UsageError, match="twice"):
        _load(dup.encode(), max_length=64)
    n = len(json.loads(text)["model"]["vocab"])
    with pytest.raises(UsageError, match=f"holds {n:,} tokens"):
        _load(text.encode(), max_length=64, vocab_size=n - 1)


def test_tokenizer_guard_accepts_a_character_class_regex_and_a_start_token_template(tok_file):
    from probattn.models.text.tokenizer import encode

    cfg = json.loads(tok_file.read_text())
    cfg["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"Regex": r"[\x{378}-\x{379}\x{E000}-\x{F8FF}]"}, "content": "\ufffd"},
        {"type": "NFKC"}, {"type": "Lowercase"}]}
    vocab = cfg["model"]["vocab"]
    start = next(t for t, i in vocab.items() if i == 2)
    cfg["post_processor"] = {"type": "TemplateProcessing",
                             "single": [{"SpecialToken": {"id": start, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                             "special_tokens": {start: {"id": start, "ids": [2], "tokens": [start]}}}
    tok, _ = _load(json.dumps(cfg).encode(), max_length=64)
    assert encode(tok, ["good"])[0, 0] == 2


# --------------------------------------------------------------------------- ONNX audit


def _audit(data, **kw):
    from probattn.export.audit import onnx as A

    return A.audit(data, what="m.onnx", **kw)


def test_onnx_audit_passes_a_classifier_and_reads_its_signature_without_onnx(tmp_path):
    f = tmp_path / "benign.onnx"
    f.write_bytes(H.onnx_benign())
    code = ("import sys; from probattn.export.audit import onnx as A; "
            "r = A.audit(open(sys.argv[1], 'rb').read(), vocab_size=50, n_classes=2); "
            "print(r['embedding_rows'], r['inputs'], 'onnx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "50 [['token_ids', 'int32', ['batch', 'sequence']]] False"


@pytest.mark.parametrize("build,needle", [
    (H.onnx_constant_bomb, "ConstantOfShape '' makes 3,000,000,000 values"),
    (H.onnx_loop_bomb, "trip count of up to 1,000,000,000,000"),
    (lambda: H.onnx_signature("renamed"), "inputs are [input_1 int32 rank 2]"),
    (H.onnx_float_input, "inputs are [token_ids float rank 2]"),
    (lambda: H.onnx_signature("rank3"), "token_ids int32 rank 3"),
    (lambda: H.onnx_signature("extra"), "mask int32 rank 2"),
    (lambda: H.onnx_signature("no-probabilities"), "outputs are ['scores']"),
    (lambda: H.onnx_benign(vocab=10), "the embedding has 10 rows but the bundle's vocabulary has 50"),
    (lambda: H.onnx_benign(classes=3), "has 3 classes; the bundle has 2 labels"),
], ids=["constant-bomb", "loop-bomb", "renamed-input", "float-input", "rank3-input", "extra-input",
        "no-probabilities", "embedding-too-small", "class-count"])
def test_onnx_audit_refuses(build, needle):
    with pytest.raises(UsageError) as e:
        _audit(build(), vocab_size=50, n_classes=2)
    assert needle in str(e.value), str(e.value)


def test_onnx_audit_refuses_a_lying_initializer_and_unknown_domains():
    import onnx
    from onnx import helper

    n, i = H.classifier_nodes()
    i[0].dims[:] = [100_000, 100_000]  # declares 10**10 values, holds 200
    with pytest.raises(UsageError, match="declares 10,000,000,000 values"):
        _audit(H.onnx_model(n, i))
    m = onnx.load_from_string(H.onnx_benign())
    m.opset_import.append(helper.make_opsetid("com.evil", 1))
    with pytest.raises(UsageError, match="opset domain 'com.evil'"):
        _audit(m.SerializeToString())


def test_onnx_shape_check_refuses_a_shape_computed_from_the_input():
    from probattn.export.audit import onnx as A

    data = H.onnx_input_scaled_bomb()
    _audit(data)  # nothing constant to see
    with pytest.raises(UsageError, match="2,560,000,000 values"):
        A.shape_check(data, (1, 256), "m.onnx")


def test_onnx_audit_bounds_a_converted_while_loop():
    """What converters make of a while loop: no trip count, ``i + 1 < n`` in the body, ``n``
    from the input's shape: bounded by the input's length."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper as nh

    n, i = H.classifier_nodes()
    n[-1] = helper.make_node("Softmax", ["logits"], ["probs0"], axis=-1)
    body = helper.make_graph(
        [helper.make_node("Add", ["k_in", "one"], ["k_out"]),
         helper.make_node("Less", ["k_out", "limit_in"], ["cond_out"]),
         helper.make_node("Identity", ["limit_in"], ["limit_out"]),
         helper.make_node("Identity", ["v_in"], ["v_out"])], "body",
        [helper.make_tensor_value_info("it", TP.INT64, []), helper.make_tensor_value_info("cond_in", TP.BOOL, []),
         helper.make_tensor_value_info("k_in", TP.INT64, []), helper.make_tensor_value_info("limit_in", TP.INT64, []),
         helper.make_tensor_value_info("v_in", TP.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TP.BOOL, []), helper.make_tensor_value_info("k_out", TP.INT64, []),
         helper.make_tensor_value_info("limit_out", TP.INT64, []), helper.make_tensor_value_info("v_out", TP.FLOAT, None)],
        initializer=[nh.from_array(np.array(1, np.int64), "one")])
    i += [nh.from_array(np.array(0, np.int64), "zero"), nh.from_array(np.array(True), "yes"),
          nh.from_array(np.array([1], np.int64), "ax1"), nh.from_array(np.array([2], np.int64), "ax2")]
    n += [helper.make_node("Shape", ["token_ids"], ["shape"]),
          helper.make_node("Slice", ["shape", "ax1", "ax2"], ["seq1"]),
          helper.make_node("Squeeze", ["seq1"], ["seq"]),
          helper.make_node("Loop", ["", "yes", "zero", "seq", "probs0"], ["k", "lim", "probabilities"], body=body)]
    report = _audit(H.onnx_model(n, i))
    assert "Loop" in report["ops"]
    n[-1] = helper.make_node("Loop", ["", "yes", "zero", "huge", "probs0"], ["k", "lim", "probabilities"], body=body)
    i.append(nh.from_array(np.array(10**9, np.int64), "huge"))
    with pytest.raises(UsageError, match="trip count of up to 1,000,000,001"):
        _audit(H.onnx_model(n, i))


# --------------------------------------------------------------------------- .keras and .h5


@pytest.fixture(scope="module")
def real_keras(tmp_path_factory):
    """A real .keras archive's members (config, metadata, weights), written without Keras."""
    d = tmp_path_factory.mktemp("keras")
    cfg = json.dumps({"module": "keras", "class_name": "Functional", "config": {"layers": []}}).encode()
    return H.keras_zip(d / "real.keras", {"config.json": cfg, "metadata.json": b'{"keras_version": "2.21.0"}',
                                          "model.weights.h5": os.urandom(1 << 16)})


@pytest.mark.parametrize("case,needle", [
    ("config-over-cap", "config.json inflates to"),
    ("weights-ratio", "inflates 1,0"),
    ("path-traversal", "'../evil.txt' is not allowed"),
    ("unknown-entry", "'payload.py' is not part of a .keras file"),
    ("symlink-entry", "symbolic link or special file"),
])
def test_keras_archive_audit_refuses(real_keras, tmp_path, case, needle):
    from probattn.export.audit.archive import audit_zip

    audit_zip(real_keras)
    bombs = H.keras_bombs(tmp_path, real_keras)
    t = time.perf_counter()
    with pytest.raises(UsageError) as e:
        audit_zip(bombs[case])
    assert needle in str(e.value), str(e.value)
    del t


def test_h5_audit_refuses_a_config_over_its_cap_unread(tmp_path):
    import h5py

    from probattn.export.audit.archive import MAX_CONFIG_BYTES, audit_h5

    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps({"class_name": "Sequential", "pad": "x" * (MAX_CONFIG_BYTES + 1)})
        f.create_dataset("w", data=np.zeros(4, np.float32))
    with pytest.raises(UsageError, match="model_config may hold up to"):
        audit_h5(path)
    small = tmp_path / "s.h5"
    with h5py.File(small, "w") as f:
        f.attrs["model_config"] = json.dumps({"class_name": "Sequential"})
        f.create_dataset("w", data=np.zeros(4, np.float32))
        f["ext"] = h5py.ExternalLink("other.h5", "/w")
    with pytest.raises(UsageError, match="ExternalLink"):
        audit_h5(small)


# --------------------------------------------------------------------------- limits


def test_threads_and_batch_sizes_are_capped_with_what_is_allowed():
    from probattn.export import limits

    cpus = limits.usable_cpus()
    assert limits.cap_threads(cpus) == cpus
    with pytest.raises(UsageError, match=f"more than the {cpus} CPUs this process may use; allowed: 1 to {cpus}"):
        limits.cap_threads(100_000)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(UsageError):
            limits.cap_threads(bad)
    with pytest.raises(UsageError, match="from 1 to 1,024"):
        limits.check_batch_size(1_000_000)


def _child_rss(code: str, timeout=300):
    """Run ``code`` in a child; return (returncode, stdout, peak RSS in MB)."""
    # VmHWM: the high-water mark of this process's own memory since exec. (ru_maxrss also keeps
    # the parent's high-water mark from before exec when the child was started by vfork, so a
    # big test worker would be measured instead of the child.)
    full = code + ("\nimport sys\nprint('RSS', next(int(l.split()[1]) for l in open('/proc/self/status') "
                   "if l.startswith('VmHWM:')), file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-c", full], capture_output=True, text=True, timeout=timeout,
                       cwd=Path(__file__).parent)
    rss = [int(l.split()[1]) for l in p.stderr.splitlines() if l.startswith("RSS ")]
    return p.returncode, p.stdout + p.stderr, (rss[0] / 1024 if rss else None)


def test_onnxruntime_arena_caps_a_graph_that_expands_from_the_input(tmp_path):
    """The input-scaled bomb passes the byte-level audit (its size comes from the input); at a
    256-token input it asks for 2.56e9 floats (10 GB). onnxruntime's capped arena refuses the
    allocation: one error, and the process stays far below the request."""
    from probattn.export.limits import ORT_ARENA_BYTES

    path = tmp_path / "bomb.onnx"
    path.write_bytes(H.onnx_input_scaled_bomb())
    code = textwrap.dedent(f"""
        import numpy as np
        from probattn.export.runtimes.onnxruntime import OnnxRuntimeRunner
        from probattn.models.errors import UsageError
        r = OnnxRuntimeRunner({str(path)!r}, vocab_size=50).activate()
        r.infer(np.ones((1, 1), np.int32))  # small input: runs (4e7 bytes)
        try:
            r.infer(np.ones((1, 256), np.int32))
            print("RAN")
        except UsageError as e:
            print("REFUSED", str(e)[:300])
    """)
    rc, out, rss = _child_rss(code)
    assert rc == 0 and "REFUSED" in out and "onnxruntime failed" in out, out
    assert rss < ORT_ARENA_BYTES / 2**20, f"peak RSS {rss:.0f} MB"


def test_onnxruntime_folding_limit_keeps_session_creation_small(tmp_path):
    """A 3e9-value ConstantOfShape that the audit would refuse, given straight to the session
    options probattn uses: onnxruntime does not fold it at creation (its default folds up to
    1 GiB), so creating the session stays small."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper as nh

    n, i = H.classifier_nodes()
    i.append(nh.from_array(np.array([200_000_000], np.int64), "big"))  # 800 MB of floats
    n += [helper.make_node("ConstantOfShape", ["big"], ["c"], value=helper.make_tensor("v", TP.FLOAT, [1], [1.0])),
          helper.make_node("ReduceMax", ["c"], ["cm"], keepdims=0)]
    n[3] = helper.make_node("Softmax", ["logits"], ["p0"], axis=-1)
    n.append(helper.make_node("Add", ["p0", "cm"], ["probabilities"]))
    path = tmp_path / "fold.onnx"
    path.write_bytes(H.onnx_model(n, i))
    code = textwrap.dedent(f"""
        import onnxruntime as ort
        from probattn.export.limits import ort_session_options
        ort.InferenceSession({str(path)!r}, ort_session_options(1), providers=["CPUExecutionProvider"])
        print("CREATED")
    """)
    rc, out, rss = _child_rss(code)
    assert rc == 0 and "CREATED" in out, out
    assert rss < 700, f"peak RSS {rss:.0f} MB: the 800 MB constant was folded at session creation"


# --------------------------------------------------------------------------- signals


def test_watchdog_cleans_up_when_the_main_thread_is_stuck_in_native_code(tmp_path):
    """The main thread is inside onnxruntime's Loop (no Python handler can run there): after
    the grace period the watchdog removes the temporary directory and exits 143."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper

    body = helper.make_graph([helper.make_node("Identity", ["c"], ["c_out"]), helper.make_node("Neg", ["v"], ["v_out"])],
                             "body", [helper.make_tensor_value_info("i", TP.INT64, []),
                                      helper.make_tensor_value_info("c", TP.BOOL, []),
                                      helper.make_tensor_value_info("v", TP.FLOAT, [1])],
                             [helper.make_tensor_value_info("c_out", TP.BOOL, []),
                              helper.make_tensor_value_info("v_out", TP.FLOAT, [1])])
    trips = helper.make_tensor("t", TP.INT64, [], [10**15])
    yes = helper.make_tensor("y", TP.BOOL, [], [True])
    g = helper.make_graph([helper.make_node("Constant", [], ["trips"], value=trips),
                           helper.make_node("Constant", [], ["yes"], value=yes),
                           helper.make_node("Loop", ["trips", "yes", "x"], ["y"], body=body)], "spin",
                          [helper.make_tensor_value_info("x", TP.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, [1])])
    model = tmp_path / "spin.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    work = tmp_path / "work"
    code = textwrap.dedent(f"""
        import os, numpy as np, onnxruntime as ort
        from probattn.models import fsutil, termination
        termination.GRACE_SECONDS = 1.0
        with termination.graceful_termination(grace=1.0):
            os.mkdir({str(work)!r})
            fsutil.LIVE_TEMP_DIRS.add({str(work)!r})
            s = ort.InferenceSession({str(model)!r}, providers=["CPUExecutionProvider"])
            print("RUNNING", flush=True)
            s.run(None, {{"x": np.ones(1, np.float32)}})
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "RUNNING"
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 143
    finally:
        if p.poll() is None:
            p.kill()
    assert not work.exists()
    assert "terminated by SIGTERM" in p.stderr.read()

"""The fast text path of ``predict`` (issue: end-to-end speed) gives what the plain path
gives: the batch tokenizer's ids, LiteRT's raw interpreter calls, the bulk line formatter.
Speed itself is measured by ``probattn bench --end-to-end``, never asserted here."""
from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest

from probattn.models.text.fast import FastTokenizer
from probattn.models.text.tokenizer import pad_rows, spec_of, train_tokenizer_of_kind

from tokenizer_battery import BATTERY, random_mix

from helpers import run_cli

TEXTS = BATTERY + random_mix(400) + [
    "", " ", "a\nb", "tab\there", "x" * 3000, "word " * 200, "Ünïcödé café", "ς σ Σ",
    "".join(chr(i) for i in range(128)), "".join(chr(i) for i in range(127, -1, -1)), "A_b-C'd^e`f{}|~",
    "control\x00\x01\x1b\x7fchars", "sep\x1c\x1d\x1e\x1fhere", "\u2028line\x85breaks\u2029"]


@pytest.fixture(scope="module", params=["portable", "regex", "regex-start"])
def fast_tokenizer(request):
    train = [t for t in TEXTS if t.strip()] * 2
    tok = train_tokenizer_of_kind(request.param, train, vocab_size=300, max_length=16)
    return tok, FastTokenizer.from_spec(spec_of(tok))


@pytest.mark.parametrize("cut", [None, 16, 5, 1])
def test_batch_encoding_equals_text_by_text(fast_tokenizer, cut):
    """``encode_padded`` (the batch scanned as one string) == ``pad_rows`` of the per-text
    ids == ``tokenizers``' ids, for batches of every mix: ASCII, non-ASCII, texts holding
    the separator, empty texts, one text."""
    tok, fast = fast_tokenizer
    want_all = [e.ids for e in tok.encode_batch(TEXTS)]
    assert fast.encode_batch(TEXTS) == want_all
    rng = np.random.default_rng(0)
    batches = [TEXTS, TEXTS[:1], ["a\nb", "c d"], ["", ""], [t for t in TEXTS if t.isascii()]]
    batches += [[TEXTS[i] for i in rng.choice(len(TEXTS), size=int(rng.integers(2, 40)))] for _ in range(30)]
    for batch in batches:
        want = pad_rows([e.ids for e in tok.encode_batch(batch)], cut)
        got = fast.encode_padded(batch, cut)
        assert got.dtype == np.int32 and got.shape == want.shape and np.array_equal(got, want), batch[:3]


def test_litert_raw_calls_equal_the_signature_runner(bundle_dir):
    """LiteRT through ``set_tensor``/``invoke``/``get_tensor`` (with resizes between shapes)
    gives exactly the SignatureRunner's outputs, for every TFLite file of the bundle on both
    kernel families; asking for one output gives that output alone."""
    from probattn.export.runtimes.litert import LiteRTRunner

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    rng = np.random.default_rng(1)
    checked = 0
    for a in manifest["artifacts"]:
        if a["format"] not in ("tflite", "tflite-fixed"):
            continue
        for variant in LiteRTRunner.variants:
            kw = dict(vocab_size=manifest["vocab_size"], threads=1, variant=variant, input_shape=a.get("input_shape"))
            raw = LiteRTRunner(bundle_dir / a["path"], **kw).activate()
            sig = LiteRTRunner(bundle_dir / a["path"], **kw)
            sig._raw_indexes = lambda sigs: None  # the SignatureRunner path
            sig.activate()
            assert raw._raw is not None and raw.runner is None, a["path"]
            assert sig._raw is None and sig.runner is not None
            for shape in [(1, 5), (3, 9), (1, 5), (2, 1), (4, 16)]:
                if raw.fixed_length and shape[1] > raw.fixed_length:
                    continue
                ids = rng.integers(0, manifest["vocab_size"], shape, dtype=np.int32)
                x, y = raw.infer(ids), sig.infer(ids)
                assert set(x) == set(y)
                for k in x:
                    assert np.array_equal(x[k], y[k]), (a["path"], variant, shape, k)
                only = raw.infer(ids, outputs=["probabilities"])
                assert list(only) == ["probabilities"] and np.array_equal(only["probabilities"], x["probabilities"])
            checked += 1
    assert checked >= 4


def _lines(write, *args):
    buf, saved = io.StringIO(), sys.stdout
    sys.stdout = buf
    try:
        write(*args)
    finally:
        sys.stdout = saved
    return buf.getvalue().splitlines()


def test_bulk_lines_equal_the_result_dicts(bundle_dir):
    """The plain lines formatted straight from the probability array are the lines the
    result dicts print, also for values next to a rounding edge of the 3 printed places
    (there the dicts' 6-place rounding decides); a NaN row goes the dict way."""
    from probattn.export.cli import _Output
    from probattn.export.predict import Predictor

    p = Predictor(bundle_dir)
    n = len(p.labels)
    edges = [0.0005, 0.0015, 0.1234995, 0.1235004999, 0.12349951, 0.9995, 0.99949996, 1.0, 0.0, 0.5]
    rng = np.random.default_rng(2)
    probs = np.vstack([np.full(n, e, np.float32) for e in edges] + [rng.random((200, n)).astype(np.float32)])
    texts = [f"text {i}\u2028x\ty" for i in range(len(probs))]
    fast = _lines(_Output(False).write_outputs, texts, {"probabilities": probs}, p)
    slow = _lines(_Output(False).write, texts, [p.result(r) for r in probs])
    assert fast == slow and len(fast) == len(probs)
    probs[3, 0] = np.nan
    out = _Output(False)
    assert _lines(out.write_outputs, texts, {"probabilities": probs}, p) == \
        _lines(_Output(False).write, texts, [p.result(r) for r in probs])
    assert out.failed == 1


def test_cli_bulk_predict_equals_one_text_at_a_time(bundle_dir, tmp_path):
    """``predict --input-file`` (length-sorted windows, the runtime on its own thread, lines
    formatted from arrays) prints what ``Predictor.predict`` of each text alone gives."""
    from probattn.export.cli import _Output
    from probattn.export.predict import Predictor

    texts = [t.replace("\n", " ").replace("\r", " ") for t in TEXTS if len(t) < 2000][:300] * 3
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(texts) + "\n", encoding="utf-8")
    for runtime in ("onnxruntime", "litert"):
        proc = run_cli("predict", bundle_dir, "--input-file", f, "--runtime", runtime, "--batch-size", "16")
        assert proc.returncode == 0, proc.stderr
        p = Predictor(bundle_dir, runtime=runtime)
        want = _lines(_Output(False).write, texts, [p.predict([t])[0] for t in texts])
        got = proc.stdout.splitlines()
        assert len(got) == len(want)
        same = sum(a == b for a, b in zip(got, want))
        # a row computed in a batch of other lengths may differ from the row alone in the last
        # float bit; printed to 3 places that shows only right at a rounding edge
        assert same >= len(want) - 2, [(a, b) for a, b in zip(got, want) if a != b][:3]
        assert [l.split("\t")[0] for l in got] == [l.split("\t")[0] for l in want]


def test_bench_end_to_end_reports_each_figure_against_its_floor(bundle_dir, tmp_path):
    """``probattn bench --end-to-end`` writes, per runtime, bulk texts/s next to the bare
    runtime's, one text next to a bare call, cold start next to the bare imports, each as
    a ratio; the bulk output is compared line by line with the bare runtime's."""
    out = tmp_path / "e2e"
    proc = run_cli("bench", bundle_dir, "--end-to-end", "--quick", "--e2e-texts", "1500", "--out", out, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "bench_e2e.json").read_text())
    rows = {r["runtime"]: r for r in doc["end_to_end"]}
    assert set(rows) == {"onnxruntime", "litert"}
    for r in rows.values():
        b, s, c = r["bulk"], r["single"], r["cold_start"]
        assert r["texts"] == 1500 and b["lines"] == b["printed_lines"] == 1500
        assert b["identical_lines"] >= 1498, b
        assert b["share_of_bare"] == pytest.approx(b["predict_texts_per_s"] / b["bare_texts_per_s"], rel=0.01)
        assert s["ratio"] == pytest.approx(s["predict_us"] / s["bare_us"], rel=0.02)
        assert c["ratio"] == pytest.approx(c["predict_s"] / c["imports_s"], rel=0.02)
    md = (out / "bench_e2e.md").read_text()
    assert "bulk predict texts/s" in md and "onnxruntime" in md and "litert" in md
    assert run_cli("bench", bundle_dir, "--texts", tmp_path / "none.txt").returncode == 2


def test_one_text_padded_for_litert_equals_its_exact_length(bundle_dir):
    """LiteRT pads one text to a fixed length (a new shape costs a reallocation): the
    answer equals the same text run at its exact length, within fp32 rounding (the pads are
    masked), with the same label; onnxruntime runs the exact length."""
    from probattn.export.predict import Predictor
    from probattn.export.runtimes.litert import LiteRTRunner

    assert LiteRTRunner.single_lengths and LiteRTRunner.single_lengths[0] >= 16
    texts = [t for t in TEXTS if t.strip()][:60]
    for runtime in ("litert", "onnxruntime"):
        p = Predictor(bundle_dir, runtime=runtime)
        exact = np.vstack([p.predict_ids(p.encode([t])) for t in texts])
        got = [p.predict([t])[0] for t in texts]
        probs = np.array([[g["probabilities"][l] for l in p.labels] for g in got])
        assert np.abs(probs - exact).max() <= 1e-5, runtime
        assert [g["label"] for g in got] == [p.labels[k] for k in exact.argmax(1)]

"""The fast text path of ``predict`` (issue: end-to-end speed) gives what the plain path
gives: the batch tokenizer's ids, LiteRT's raw interpreter calls, the bulk line formatter.
Speed itself is measured by ``probattn bench --end-to-end``, never asserted here."""
from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# --------------------------------------------------------------------------- the NumPy scanner

def _regex_ids(fast, texts):
    """``_bulk_ids`` of ``texts`` (the regex scan and dict lookup the scanner replaces)."""
    from probattn.models.text import fast as F

    joined = F.SEPARATOR.join(texts)
    joined = joined.lower() if fast._bulk_lower else joined
    vocab = dict(fast.vocab)
    vocab[F.SEPARATOR] = F._SEP_ID
    return F._bulk_ids(joined, fast._bulk_pattern, vocab, fast.unk_id, len(texts))


def _scanned_ids(scanner, fast, texts):
    from probattn.models.text import fast as F

    joined = F.SEPARATOR.join(texts)
    joined = joined.lower() if fast._bulk_lower else joined
    return scanner.scan(joined.encode("utf-8", "surrogatepass"), len(texts), fast.unk_id)


def _hostile_vocab(fast):
    """The tokenizer's vocabulary plus entries at every length around the scanner's 8-byte
    chunks and its longest scanned token, entries sharing their first 8 or 16 bytes, entries
    no scan produces (a space, two classes, non-ASCII, the separator) and one over the
    longest scanned token."""
    from probattn.models.text.fast import SCAN_TOKEN_BYTES

    vocab = dict(fast.vocab)
    extra = ["x" * n for n in range(1, SCAN_TOKEN_BYTES + 3)]
    extra += ["abcdefgh" + s for s in ("", "i", "ij", "ijklmnop", "ijklmnopq")] + ["abcdefgz", "abcdefghijklmnoz"]
    extra += ["a b", "a,", "caf\u00e9", "\u00e9t\u00e9", "two\nlines", "_", "'", "''", "--", "!!!", "a" * 100, "b" * 65]
    for t in extra:
        vocab.setdefault(t if fast._bulk_lower is False else t.lower(), len(vocab))
    return vocab


@pytest.mark.parametrize("kind", ["portable", "regex", "regex-start"])
def test_scanner_equals_the_regex_scan(kind):
    """The NumPy scanner gives the ids of the regex scan and dict lookup, text by text, on
    the battery and on texts built from a hostile vocabulary (tokens of every length around
    8-byte chunks and the longest scanned token, shared prefixes, unknown near-misses, tokens
    far longer than any entry); ``encode_plan`` of a plan equals ``encode_padded`` of each
    batch."""
    from probattn.models.text import fast as F

    train = [t for t in TEXTS if t.strip()] * 2
    fast = F.FastTokenizer.from_spec(spec_of(train_tokenizer_of_kind(kind, train, vocab_size=300, max_length=16)))
    vocab = _hostile_vocab(fast)
    scanner = F._Scanner.build(vocab, fast._bulk_classes())
    assert scanner is not None
    fast.vocab, fast._scanner = vocab, scanner
    words = [w for w in vocab if w.strip()] + ["x" * 300, "abcdefghijklmnopq", "abcdefgh" * 9, "ABCDEFGHI", "zzzz"]
    rng = np.random.default_rng(3)
    made = [" ".join(rng.choice(words, size=int(rng.integers(0, 12)))).replace("\n", " ") for _ in range(300)]
    for texts in ([t for t in TEXTS if fast._bulk_eligible(t)], made, made[:2], ["", ""], ["x", ""]):
        want, got = _regex_ids(fast, texts), _scanned_ids(scanner, fast, texts)
        assert np.array_equal(want[0], got[0]) and np.array_equal(want[1], got[1])
    ids = _scanned_ids(scanner, fast, ["abcdefghijklmnoq abcdefghijklmnoz", "x" * 65])[0].tolist()
    assert ids == [fast.unk_id, vocab["abcdefghijklmnoz"], vocab["x" * 65]]  # a near miss; past the scanned length
    plan = [[2, 0], [1], [5, 4, 3], list(range(6, 40))]
    texts = made[:40]
    assert [m.tolist() for m in fast.encode_plan(texts, plan, 16)] == \
        [fast.encode_padded([texts[i] for i in rows], 16).tolist() for rows in plan]


def test_scanner_takes_no_entry_whose_bytes_differ():
    """A token whose key matches an entry of its length but not its bytes (a hash collision,
    made here by giving an entry the key of an unknown token) gets the unknown id: the
    scanner compares every byte of a long token before it takes the entry's id."""
    from probattn.models.text import fast as F

    vocab = {"[PAD]": 0, "[UNK]": 1, "abcdefghijklmnop": 2, "short": 3}
    scanner = F._Scanner.build(vocab, F.FastTokenizer._bulk_classes())
    data = b"abcdefghijklmnoq short\nabcdefghijklmnop"
    a = np.frombuffer(data, np.uint8)
    words = F._words8(a)
    starts, lengths = np.array([0, 17, 23]), np.array([16, 5, 16])
    assert scanner.lookup(data, words, starts, lengths, 1).tolist() == [1, 3, 2]
    forged = F._keys(words, starts[:1], lengths[:1])[0]  # the unknown token's key, given to entry 2
    slot = int(np.flatnonzero(scanner.slot_entries == np.flatnonzero(scanner.ids == 2)[0])[0])
    scanner.slot_keys[slot] = forged
    home = int((np.array([forged], np.uint64) * F._MIX >> scanner.shift)[0])
    scanner.slot_keys[home], scanner.slot_entries[home] = forged, scanner.slot_entries[slot]
    assert scanner.lookup(data, words, starts[:1], lengths[:1], 1).tolist() == [1]


def _windows_one_by_one(pairs, batch_size):
    """The windowing rule text by text: a window ends at the text that fills it (texts or
    characters) or after which no more input is waiting (then it is flushed)."""
    from probattn.export import limits
    from probattn.export.predict import SORT_WINDOW_BATCHES

    window, chars = [], 0
    for t, more in pairs:
        window.append(t)
        chars += len(t)
        if len(window) >= batch_size * SORT_WINDOW_BATCHES or \
                chars >= limits.BATCH_CHAR_BUDGET * SORT_WINDOW_BATCHES or not more:
            yield window, not more
            window, chars = [], 0
    if window:
        yield window, True


def test_blocks_make_the_windows_of_lines():
    """``windows_of_blocks`` (the CLI's lines a block at a time) cuts the windows, with the
    flushes, that the rule applied line by line cuts, at every block size, with the text and
    character budgets both reached; ``windows`` of single texts too."""
    from probattn.export import limits
    from probattn.export.predict import SORT_WINDOW_BATCHES, windows, windows_of_blocks

    rng = np.random.default_rng(4)
    big = "y" * limits.MAX_TEXT_CHARS  # enough of them reach the character budget
    assert 400 * len(big) > limits.BATCH_CHAR_BUDGET * SORT_WINDOW_BATCHES
    texts = ["y" * n for n in rng.integers(0, 40, 3000)] + [big] * 400 + ["y" * n for n in rng.integers(0, 9, 500)]
    cuts = {"texts": 0, "chars": 0}
    for size in (1, 7, 64, 1000, len(texts)):
        blocks, i = [], 0
        while i < len(texts):
            step = int(rng.integers(1, size + 1))
            blocks.append((texts[i:i + step], bool(rng.integers(0, 2)) and i + step < len(texts)))
            i += step
        pairs = [(t, j < len(b) - 1 or more) for b, more in blocks for j, t in enumerate(b)]
        for batch in (1, 4, 64):
            want = list(_windows_one_by_one(pairs, batch))
            assert list(windows_of_blocks(iter(blocks), batch)) == want
            assert list(windows(iter(pairs), batch)) == want
            cuts["texts"] += sum(len(w) == batch * SORT_WINDOW_BATCHES for w, _ in want)
            cuts["chars"] += sum(len(w) < batch * SORT_WINDOW_BATCHES and not f for w, f in want)
    assert cuts["texts"] and cuts["chars"], cuts


def test_run_row_equals_infer(bundle_dir):
    """``run_row`` (``predict``'s single-text call: LiteRT's tensor buffers, onnxruntime's
    inner run) gives exactly what ``infer`` gives on the same padded ids, for every dynamic
    artifact the two runtimes run, and after shapes change in between."""
    from probattn.export.runtimes.litert import LiteRTRunner
    from probattn.export.runtimes.onnxruntime import OnnxRuntimeRunner

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    rng = np.random.default_rng(5)
    checked = 0
    for a in manifest["artifacts"]:
        cls = {"tflite": LiteRTRunner, "onnx": OnnxRuntimeRunner}.get(a["format"])
        if cls is None:
            continue
        r = cls(bundle_dir / a["path"], vocab_size=manifest["vocab_size"], threads=1,
                input_shape=a.get("input_shape")).activate()
        for n in (1, 5, 17, 64, 3, 70):
            row = rng.integers(2, manifest["vocab_size"], n).tolist()
            ids = np.zeros((1, r.row_width(n, 128)), np.int32)
            ids[0, :n] = row
            want = r.infer(ids, outputs=["probabilities"])["probabilities"][0]
            r.infer(rng.integers(0, 9, (3, 11), dtype=np.int32))  # another shape in between
            got = r.run_row(row, 128, "probabilities")
            assert type(got) is list and np.array_equal(np.float32(got), want), (a["path"], n)
        checked += 1
    assert checked >= 6


_PIECES = ["a", "ab", "abcdefgh", "abcdefghi", "Zz9_", "don't", "x" * 16, "x" * 17, "...", "!?", "-", "'", "é",
           "ß", "\u0301", " ", "  ", "\t", "\x00", "\x1f", "\r", "日本", "\U0001f600", "a" * 70]


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(st.lists(st.sampled_from(_PIECES), max_size=12).map("".join), min_size=2, max_size=30),
       st.sampled_from(["portable", "regex"]), st.integers(0, 2 ** 31))
def test_scanner_property(texts, kind, seed):
    """On random texts built from pieces at the scanner's edges (8-byte chunks, classes,
    controls, non-ASCII, over-long tokens) and a random vocabulary of their tokens and near
    misses, the scanner's ids equal the regex scan's."""
    from probattn.models.text import fast as F

    cls = F.FastTokenizer if kind == "portable" else F.RegexFastTokenizer
    fast = cls.__new__(cls)
    fast.unk_id = 1
    texts = [t for t in texts if fast._bulk_eligible(t)]
    if len(texts) < 2:
        return
    pattern = F._ASCII_SIMPLE if kind == "portable" else F.RegexFastTokenizer.WORD
    tokens = sorted({w for t in texts for w in pattern.findall(t.lower() if fast._bulk_lower else t)})
    rng = np.random.default_rng(seed)
    chosen = [w for w in tokens if rng.random() < 0.6] + [w[:-1] + "q" for w in tokens if len(w) > 1][:5]
    fast.vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(chosen))}}
    scanner = F._Scanner.build(fast.vocab, fast._bulk_classes())
    want, got = _regex_ids(fast, texts), _scanned_ids(scanner, fast, texts)
    assert np.array_equal(want[0], got[0]) and np.array_equal(want[1], got[1])


_UNICODE_PIECES = ["a", "é", "e\u0301", "\u0301", "\u0301\u0302", "!\u0301", " \u0301x", "ΟΔΟΣ", "σς", "Σ", "İ",
                   "ﬁne", "①②", "Ⅻ", "ｆｕｌｌ", "\u1100\u1161", "日本語", "\U0001f600", "\U0001d400", "\ufffd", "\u00ad",
                   "\u200b", "\ud800", "tab\t", " ", "--", "don't", "Ünïcödé", "x" * 20, "ß" * 20, "\x85", "\u2028"]


@pytest.fixture(scope="module")
def unicode_tokenizer():
    rng = np.random.default_rng(6)
    train = ["".join(rng.choice(_UNICODE_PIECES, size=8)) for _ in range(400)] + [t for t in TEXTS if t.strip()]
    train = [t.encode("utf-8", "replace").decode("utf-8") for t in train]  # tokenizers takes no lone surrogate
    tok = train_tokenizer_of_kind("portable", train, vocab_size=400, max_length=24)
    return tok, FastTokenizer.from_spec(spec_of(tok))


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.sampled_from(_UNICODE_PIECES), max_size=10).map("".join), min_size=2, max_size=40))
def test_code_point_scan_equals_tokenizers(unicode_tokenizer, texts):
    """Non-ASCII texts of the portable kind, normalized together and scanned as code points
    (marks joining the run before them or making their own, NFKC expansions, final sigma,
    lone surrogates, astral characters), get exactly the ids of ``tokenizers``."""
    tok, fast = unicode_tokenizer
    fast._bulk_more(["é", "ü"], [0, 1])  # the code-point scanner exists
    assert fast._code_scanner not in (None, False)
    clean = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]  # tokenizers takes no lone surrogate
    want = pad_rows([e.ids for e in tok.encode_batch(clean)], 24)
    assert np.array_equal(fast.encode_padded(clean, 24), want)
    # with lone surrogates (U+FFFD for the fast path, text by text too)
    assert np.array_equal(fast.encode_padded(texts, 24), pad_rows(fast.encode_batch(texts), 24))

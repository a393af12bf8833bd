"""The tokenizer kinds (portable, the default; wordlevel, the earlier default; MediaPipe's
regex and regex-start), their pure-Python fast path (the same ids as ``tokenizers`` on real
texts, hard inputs and a code-point sample, or an explicit refusal and ``tokenizers``), and
bundles made with the earlier wordlevel kind, which keep working as they are."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

from probattn.models.errors import UsageError
from probattn.models.text import tokenizer as T
from probattn.models.text.fast import FastTokenizer, NotPortable, RegexFastTokenizer, WordLevelFastTokenizer
from tokenizer_battery import BATTERY, code_points, pre_tokenized, random_mix, random_unicode

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def datasets():
    from probattn.models.text.data import load_dataset

    return {name: load_dataset(name, quiet=True) for name in ("rotten_tomatoes", "bbc_news", "20newsgroups")}


@pytest.fixture(scope="module")
def portable(datasets):
    """(tokenizer.json as a dict, a tokenizers.Tokenizer): trained on Rotten Tomatoes and BBC
    texts, truncating at 64, as ``probattn train`` makes it."""
    texts = datasets["rotten_tomatoes"].texts[:9000] + datasets["bbc_news"].texts[:1500]
    tok = T.train_tokenizer(texts, vocab_size=20000, max_length=MAX_LENGTH)
    return json.loads(tok.to_str()), tok


@pytest.fixture(scope="module")
def held_out(datasets):
    """Texts the tokenizer never saw: short reviews, long articles, Usenet posts (odd bytes,
    signatures, quoted headers)."""
    return {"rotten_tomatoes": datasets["rotten_tomatoes"].texts[9000:],
            "bbc_news": datasets["bbc_news"].texts[1500:],
            "20newsgroups": datasets["20newsgroups"].texts[:600]}


def _untruncated(spec):
    from tokenizers import Tokenizer

    spec = dict(spec, truncation=None)
    return spec, Tokenizer.from_str(json.dumps(spec))


def _hf_ids(tok, texts):
    return [e.ids for e in tok.encode_batch(list(texts))]


def _assert_same_ids(expected, got, texts, what):
    bad = [i for i, (a, b) in enumerate(zip(expected, got)) if a != b]
    assert len(expected) == len(got) == len(texts)
    assert not bad, (f"{what}: {len(bad)} of {len(texts)} texts differ; first {texts[bad[0]][:80]!r}: "
                     f"tokenizers {expected[bad[0]][:12]} vs fast {got[bad[0]][:12]}")


# ---------------------------------------------------------------------------- the recipe

def test_portable_recipe(portable):
    spec, tok = portable
    assert T.kind_of(spec) == T.KIND_PORTABLE and T.portable_problem(spec) is None
    assert spec["added_tokens"] == [], "added tokens are matched in raw text before normalising"
    assert spec["pre_tokenizer"]["pattern"]["Regex"] == T.SPLIT_PATTERN
    assert spec["truncation"]["max_length"] == MAX_LENGTH and spec["padding"] is None
    assert tok.token_to_id(T.PAD_TOKEN) == T.PAD_ID and tok.token_to_id(T.UNK_TOKEN) == T.UNK_ID
    # a user's literal "[PAD]" is three plain tokens, never the pad id
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str("[PAD] [UNK]"))]
    assert pieces == ["[", "pad", "]", "[", "unk", "]"], pieces
    assert T.PAD_ID not in tok.encode("[PAD] [UNK]").ids
    assert len(tok.encode("word " * 500).ids) == MAX_LENGTH
    # the repertoire: surrogates, this Python's unassigned code points, and nothing assigned
    # that every engine agrees on (checked on every code point by scripts/tokenizer_codepoints.py)
    outside = T.parse_outside_pattern(spec["normalizer"]["normalizers"][0]["pattern"]["Regex"])
    assert outside == list(T.outside_ranges())
    assert any(a <= 0xD800 and 0xDFFF <= b for a, b in outside), "surrogates are not mapped to U+FFFD"


def test_tokenizer_config(portable, tmp_path):
    spec, tok = portable
    assert T.save_tokenizer(tok, tmp_path, MAX_LENGTH) == [T.TOKENIZER_FILE, T.TOKENIZER_CONFIG_FILE]
    cfg = json.loads((tmp_path / T.TOKENIZER_CONFIG_FILE).read_text())
    # what tokenizers.js reads unk_token from, what transformers.js needs, where JS truncates
    assert cfg["unk_token"] == T.UNK_TOKEN and cfg["pad_token"] == T.PAD_TOKEN
    assert cfg["model_max_length"] == MAX_LENGTH and cfg["model_input_names"] == ["token_ids"]
    assert json.loads((tmp_path / T.TOKENIZER_FILE).read_text()) == spec


# ------------------------------------------------------------------- fast path == tokenizers

@pytest.mark.parametrize("truncate", [True, False], ids=["truncated", "full-length"])
def test_fast_path_equals_tokenizers_on_real_texts(portable, held_out, truncate):
    spec, tok = portable if truncate else _untruncated(portable[0])
    fast = FastTokenizer.from_spec(spec)
    for name, texts in held_out.items():
        _assert_same_ids(_hf_ids(tok, texts), fast.encode_batch(texts), texts, name)
        assert [fast.encode(t) for t in texts[:50]] == _hf_ids(tok, texts[:50])


@pytest.mark.parametrize("truncate", [True, False], ids=["truncated", "full-length"])
def test_fast_path_equals_tokenizers_on_hard_inputs(portable, truncate):
    spec, tok = portable if truncate else _untruncated(portable[0])
    fast = FastTokenizer.from_spec(spec)
    for name, texts in (("battery", BATTERY), ("random_unicode", random_unicode()), ("random_mix", random_mix())):
        _assert_same_ids(_hf_ids(tok, texts), fast.encode_batch(texts), texts, name)


def test_fast_path_equals_tokenizers_on_a_code_point_sample(portable):
    """Every code point where this Python's General_Category changes (and its neighbours),
    and every 23rd, in five positions each: normalized and pre-tokenized strings compared, so
    a difference in an unknown word shows too. All 1,112,064 code points take about 50 s:
    scripts/tokenizer_codepoints.py."""
    spec, tok = _untruncated(portable[0])
    fast = FastTokenizer.from_spec(spec)
    cps = code_points(stride=23)
    assert len(cps) > 45_000
    norm, pre = tok.normalizer, tok.pre_tokenizer
    want = pre_tokenized(lambda s: [p for p, _ in pre.pre_tokenize_str(norm.normalize_str(s))], cps)
    got = pre_tokenized(lambda s: fast.pre_tokenize(fast.normalize(s)), cps)
    bad = [i for i, (a, b) in enumerate(zip(want, got)) if a != b]
    assert not bad, f"{len(bad)} chunks of 2048 code points differ, first from U+{cps[bad[0] * 2048]:04X}"


def test_fast_path_refuses_other_tokenizers(portable):
    spec = portable[0]
    old = copy.deepcopy(spec)
    old["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]}
    old["pre_tokenizer"] = {"type": "Whitespace"}
    assert T.kind_of(old) == T.KIND_WORDLEVEL
    assert isinstance(FastTokenizer.from_spec(old), WordLevelFastTokenizer)  # its own twin, not this one
    mutations = {
        "wordlevel_with_a_split": dict(old, pre_tokenizer=spec["pre_tokenizer"]),
        "added_tokens": dict(spec, added_tokens=[{"id": 0, "content": "[PAD]", "single_word": False, "lstrip": False,
                                                  "rstrip": False, "normalized": False, "special": True}]),
        "pattern": dict(spec, pre_tokenizer=dict(spec["pre_tokenizer"], pattern={"Regex": r"\w+"})),
        "not_inverted": dict(spec, pre_tokenizer=dict(spec["pre_tokenizer"], invert=False)),
        "post_processor": dict(spec, post_processor={"type": "ByteLevel"}),
        "padding": dict(spec, padding={"strategy": "BatchLongest"}),
        "stride": dict(spec, truncation=dict(spec["truncation"], stride=2)),
        "left_truncation": dict(spec, truncation=dict(spec["truncation"], direction="Left")),
        "no_lowercase": dict(spec, normalizer={"type": "Sequence", "normalizers": spec["normalizer"]["normalizers"][:2]}),
        "repertoire_not_a_class": dict(spec, normalizer={"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"Regex": "[\\x{378}]|.*"}, "content": "\ufffd"}]
            + spec["normalizer"]["normalizers"][1:]}),
        "unk_id": dict(spec, model=dict(spec["model"], vocab={**spec["model"]["vocab"], "[UNK]": 5})),
    }
    for name, bad in mutations.items():
        assert T.portable_problem(bad), name
        assert T.kind_of(bad) == T.KIND_CUSTOM, name
        with pytest.raises(NotPortable):
            FastTokenizer.from_spec(bad)


# ------------------------------------------------- every kind probattn trains: fast == tokenizers

@pytest.fixture(scope="module")
def kinds(datasets):
    """{kind: (tokenizer.json as a dict, a tokenizers.Tokenizer)} for every kind ``train``
    makes, trained on the texts of the ``portable`` fixture."""
    texts = datasets["rotten_tomatoes"].texts[:9000] + datasets["bbc_news"].texts[:1500]
    out = {}
    for kind in T.TOKENIZER_KINDS:
        tok = T.train_tokenizer_of_kind(kind, texts, vocab_size=20000, max_length=MAX_LENGTH)
        out[kind] = json.loads(tok.to_str()), tok
    return out


def test_train_makes_every_kind_and_kind_of_tells_them_apart(kinds):
    assert T.DEFAULT_TOKENIZER_KIND == T.KIND_PORTABLE == T.TOKENIZER_KINDS[0]
    assert set(T.TOKENIZER_KINDS) == {"portable", "wordlevel", "regex", "regex-start"}
    for kind, (spec, tok) in kinds.items():
        assert T.kind_of(spec) == T.kind_of(tok) == kind
        assert spec["truncation"]["max_length"] == MAX_LENGTH
    twins = {kind: type(FastTokenizer.from_spec(spec)) for kind, (spec, _) in kinds.items()}
    assert twins == {"portable": FastTokenizer, "wordlevel": WordLevelFastTokenizer,
                     "regex": RegexFastTokenizer, "regex-start": RegexFastTokenizer}
    with pytest.raises(UsageError, match="allowed: portable, wordlevel, regex, regex-start"):
        T.train_tokenizer_of_kind("sentencepiece", ["a b"])


@pytest.mark.parametrize("kind", ["wordlevel", "regex", "regex-start"])
@pytest.mark.parametrize("truncate", [True, False], ids=["truncated", "full-length"])
def test_fast_path_equals_tokenizers_for_every_kind(kinds, held_out, kind, truncate):
    """Real held-out texts of the three bundled datasets (369 of them not ASCII), the hard
    battery and random Unicode: the same ids as tokenizers for every text. The wordlevel
    kind hands every non-ASCII text (and only those) to tokenizers; the regex kinds need
    no fallback at all."""
    spec, tok = kinds[kind] if truncate else _untruncated(kinds[kind][0])
    handed = []

    def fallback(texts):
        handed.extend(texts)
        return _hf_ids(tok, texts)

    fast = FastTokenizer.from_spec(spec, fallback=fallback)
    assert fast.kind == kind
    corpora = dict(held_out, battery=BATTERY, random_unicode=random_unicode(), random_mix=random_mix())
    for name, texts in corpora.items():
        handed.clear()
        _assert_same_ids(_hf_ids(tok, texts), fast.encode_batch(texts), texts, f"{kind} {name}")
        assert [fast.encode(t) for t in texts[:50]] == _hf_ids(tok, texts[:50])
        if kind == "wordlevel":
            assert fast.needs_fallback()
            assert sorted(set(handed)) == sorted({t for t in texts if not t.isascii()}), name
        else:
            assert handed == [] and not fast.needs_fallback(), name
    assert any(not t.isascii() for texts in held_out.values() for t in texts), "no non-ASCII real text was tried"


def test_wordlevel_fast_path_on_every_ascii_pair_and_refuses_non_ascii_without_fallback(kinds):
    """Every pair of ASCII characters (controls, \\x1c-\\x1f, which Python's \\s calls space
    and Oniguruma does not, punctuation next to words) and the raw-text [PAD]/[UNK] matches
    of the added tokens."""
    import itertools

    spec, tok = kinds["wordlevel"]
    assert {a["content"] for a in spec["added_tokens"]} == {T.PAD_TOKEN, T.UNK_TOKEN}
    fast = FastTokenizer.from_spec(spec)
    texts = ["".join(p) for p in itertools.product(map(chr, range(128)), repeat=2)]
    texts += ["[PAD]", "a[PAD]b", "[UNK][PAD] x", "[pad] [ PAD ]", "[[PAD]]", "word " * 300]
    _assert_same_ids(_hf_ids(tok, texts), fast.encode_batch(texts), texts, "wordlevel ascii")
    assert fast.encode("a[PAD]b")[1] == T.PAD_ID
    with pytest.raises(NotPortable, match="outside ASCII"):
        fast.encode_batch(["ascii", "naïve"])
    with pytest.raises(NotPortable, match="outside ASCII"):
        fast.encode("naïve")


def test_regex_fast_path_keeps_room_for_start_and_case(kinds):
    spec, tok = kinds["regex-start"]
    fast = FastTokenizer.from_spec(spec)
    start = spec["model"]["vocab"][T.REGEX_START]
    for text in ["", "word " * 300, "The the THE naïve <PAD> don't", "\t<START> \u00e9t\u00e9"]:
        ids = fast.encode(text)
        assert ids == tok.encode(text).ids and ids[0] == start and len(ids) <= MAX_LENGTH
    assert len(fast.encode("word " * 300)) == MAX_LENGTH


def test_fast_path_refuses_a_tokenizer_of_no_kind(kinds):
    """A tokenizer.json that is none of the kinds exactly: refused with a reason, and the
    Predictor then runs tokenizers (test_earlier_bundle... covers that path)."""
    spec = kinds["regex"][0]
    mutations = {
        "regex_lowercased": dict(spec, normalizer={"type": "Lowercase"}),
        "regex_other_delimiter": dict(spec, pre_tokenizer=dict(spec["pre_tokenizer"], pattern={"Regex": "\\W+"})),
        "regex_left_truncation": dict(spec, truncation=dict(spec["truncation"], direction="Left")),
        "wordlevel_added_token": dict(kinds["wordlevel"][0], added_tokens=kinds["wordlevel"][0]["added_tokens"] + [
            {"id": 5, "content": "hello", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": True, "special": False}]),
    }
    for name, bad in mutations.items():
        assert T.kind_of(bad) == T.KIND_CUSTOM, name
        with pytest.raises(NotPortable, match="not a tokenizer probattn reproduces"):
            FastTokenizer.from_spec(bad)


@pytest.mark.parametrize("regex", ["[a-z]", "", "[\\x{41}", "[\\x{110000}]", "[\\x{42}-\\x{41}]", "[\\x{41}]+"])
def test_repertoire_pattern_must_be_a_class_of_code_points(regex):
    with pytest.raises(ValueError):
        T.parse_outside_pattern(regex)


def test_a_repertoire_this_python_does_not_know_falls_back(portable):
    """A tokenizer.json built with a newer Unicode database keeps code points this Python
    calls unassigned: the fast path then sends non-ASCII texts to tokenizers."""
    spec, tok = portable
    outside = T.parse_outside_pattern(spec["normalizer"]["normalizers"][0]["pattern"]["Regex"])
    assert outside[0] == (0x378, 0x379)  # unassigned in every Unicode version so far
    newer = copy.deepcopy(spec)
    newer["normalizer"]["normalizers"][0]["pattern"]["Regex"] = T.outside_pattern(outside[1:])
    calls = []

    def fallback(texts):
        calls.append(list(texts))
        return _hf_ids(tok, texts)

    fast = FastTokenizer.from_spec(newer, fallback=fallback)
    assert "U+0378..U+0379" in fast.unicode_problem()
    texts = ["plain ascii text", "naïve café", "another one"]
    assert fast.encode_batch(texts) == _hf_ids(tok, texts)
    assert calls == [["naïve café"]], calls
    with pytest.raises(NotPortable, match="U\\+0378"):
        FastTokenizer.from_spec(newer).encode("naïve")
    assert FastTokenizer.from_spec(newer).encode("ascii only") == tok.encode("ascii only").ids


# ------------------------------------------------------------ bundles: new and earlier recipes

def test_bundle_ships_the_portable_tokenizer(bundle_dir, manifest):
    from probattn.export.bundle import verified_path
    from probattn.export.predict import Predictor

    tok = manifest["tokenizer"]
    assert tok["kind"] == T.KIND_PORTABLE
    cfg = json.loads(verified_path(bundle_dir, tok["config"]).read_text())
    assert cfg["model_max_length"] == manifest["max_length"] and cfg["unk_token"] == T.UNK_TOKEN
    p = Predictor(bundle_dir)
    assert p.text_path == "fast"
    texts = [json.loads(l)["text"] for l in (bundle_dir / "test.jsonl").read_text().splitlines()] + BATTERY
    np.testing.assert_array_equal(p.encode(texts), T.encode(p.tokenizer, texts, p.max_length),
                                  err_msg="Predictor's fast path vs tokenizers")


def _wordlevel_twin(spec):
    """The recipe of earlier probattn versions, with the same vocabulary."""
    old = copy.deepcopy(spec)
    old["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]}
    old["pre_tokenizer"] = {"type": "Whitespace"}
    old["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for i, t in enumerate((T.PAD_TOKEN, T.UNK_TOKEN))]
    return old


def test_earlier_bundle_with_wordlevel_tokenizer_predicts_as_before(bundle_dir, tmp_path):
    """A bundle exported before the portable recipe: the wordlevel kind (Whitespace), no
    tokenizer_config.json, a manifest tokenizer entry without kind. Predictor gives the ids
    of tokenizers, as before: its fast path does ASCII texts and hands the others over."""
    from tokenizers import Tokenizer

    from probattn.export import bundle as B
    from probattn.export.predict import Predictor

    old = tmp_path / "bundle"
    shutil.copytree(bundle_dir, old)
    spec = _wordlevel_twin(json.loads((old / T.TOKENIZER_FILE).read_text()))
    (old / T.TOKENIZER_FILE).write_text(json.dumps(spec), encoding="utf-8")
    (old / T.TOKENIZER_CONFIG_FILE).unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["tokenizer"] = {"path": T.TOKENIZER_FILE, "sha256": B.sha256_path(old / T.TOKENIZER_FILE)}
    from hostile import rehash

    rehash(old, manifest)  # contents as the earlier exporter would have listed them
    p = Predictor(old)
    assert p.text_path == "fast" and p.fast.kind == T.KIND_WORDLEVEL and p.fast.needs_fallback()
    texts = ["don't miss it !", "naïve clichés", "[PAD]"]
    want = T.encode(Tokenizer.from_str(json.dumps(spec)), texts, p.max_length)
    np.testing.assert_array_equal(p.encode(texts), want)
    p.fast = None  # the same Predictor on tokenizers alone
    np.testing.assert_array_equal(p.encode(texts), want)
    assert want[2, 0] == T.PAD_ID, "the earlier recipe matched [PAD] in raw text (why it changed)"
    assert [r["label"] for r in p.predict(texts)] == [r["label"] for r in p.predict(texts, batch_size=1)]


def test_export_with_a_wordlevel_tokenizer_records_it_and_ships_no_config(tmp_path, portable):
    """JavaScript gives other ids for that recipe: no tokenizer_config.json, so JS clients
    refuse the bundle instead (the session bundle covers the portable case)."""
    from probattn.export.exporter import ExportOptions, export
    from conftest import tiny_classifier

    spec = _wordlevel_twin(portable[0])
    model = tiny_classifier(vocab_size=len(spec["model"]["vocab"]), num_classes=2)
    model.save(tmp_path / "m.keras")
    (tmp_path / "wordlevel.json").write_text(json.dumps(spec), encoding="utf-8")
    out = tmp_path / "bundle"
    manifest = export(tmp_path / "m.keras", out, ExportOptions(
        tokenizer=str(tmp_path / "wordlevel.json"), formats=("onnx",), precisions=("fp32",), onnx_int64=False))
    assert manifest["tokenizer"]["kind"] == T.KIND_WORDLEVEL and "config" not in manifest["tokenizer"]
    assert not (out / T.TOKENIZER_CONFIG_FILE).exists()
    assert [a["path"] for a in manifest["artifacts"]] == ["model.keras", "model_fp32.onnx"]


def test_load_tokenizer_still_refuses_wrong_special_ids(tmp_path, portable):
    spec = copy.deepcopy(portable[0])
    vocab = spec["model"]["vocab"]
    first = next(t for t, i in vocab.items() if i == 2)
    vocab[first], vocab[T.PAD_TOKEN] = 0, 2
    (tmp_path / "t.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(UsageError, match=r"expected \[PAD\]=0 and \[UNK\]=1"):
        T.load_tokenizer(tmp_path / "t.json")

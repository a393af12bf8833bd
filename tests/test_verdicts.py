"""Verdicts that generalise: length buckets, padding on either side, rows alone vs inside a
batch, verify without data, and --strict. Each family must make verify fail, by name, when
what it checks is broken."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import tiny_classifier
from helpers import run_cli
from probattn.export import parity, runtimes
from probattn.export.parity.cases import BATCH_SIZES, build_cases, length_buckets, pad_left, pad_right
from probattn.export.runtimes.onnxruntime import OnnxRuntimeRunner

TEXTS = ["the film was great fun", "a dull and boring plot", "the acting was fine",
         "great cast but a weak script", "boring", "fun fun fun and more fun",
         "not good not bad", "the plot was weak but the cast was great"]
LABELS = ["neg", "neu", "pos"]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A tiny classifier exported to fp32 ONNX and TFLite, no test split in the bundle."""
    from probattn.export.exporter import ExportOptions, export
    from probattn.models.text.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("verdicts")
    train_tokenizer(TEXTS, vocab_size=50).save(str(d / "tokenizer.json"))
    (d / "labels.txt").write_text("\n".join(LABELS) + "\n")
    tiny_classifier().save(d / "tiny.keras")
    export(d / "tiny.keras", d / "bundle", ExportOptions(formats=("tflite", "onnx"), precisions=("fp32",),
                                                       tokenizer=str(d / "tokenizer.json"),
                                                       labels=str(d / "labels.txt")))
    rows = [{"text": t, "label": LABELS[i % 3]} for i, t in enumerate(TEXTS * 8)]
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_length_buckets_cover_short_texts_and_longer_than_training():
    names = [b[0] for b in length_buckets(64)]
    assert names == ["1", "2", "3-4", "5-8", "9-16", "17-64", ">64"]
    assert [b[0] for b in length_buckets(8)] == ["1", "2", "3-4", "5-8", ">8"]


def test_padding_helpers():
    rows = [[5, 6], [7]]
    assert pad_right(rows, 3).tolist() == [[5, 6, 0], [7, 0, 0]]
    assert pad_left(rows, 3).tolist() == [[0, 5, 6], [0, 0, 7]]


def test_cases_cut_real_texts_to_each_bucket(tiny_bundle):
    from probattn.models.text.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_bundle / "tokenizer.json")
    manifest = json.loads((tiny_bundle / "bundle" / "manifest.json").read_text())
    cases = {c.name: c for c in build_cases(tok, manifest, TEXTS * 8, [LABELS[i % 3] for i in range(64)])}
    one = cases["bucket:1"]
    assert one.real and all((b != 0).sum(axis=1).max() == 1 for b in one.batches)
    # each bucket holds every text long enough, cut to the bucket's top, each distinct row once
    # (TEXTS * 8 repeats every text 8 times: a row counted 8 times would weigh its decision 8 times)
    ids = [tok.encode(t).ids for t in TEXTS * 8]
    for bname, lo, hi in length_buckets(manifest["max_length"]):
        if hi is None:
            continue
        expected = {tuple(r[:hi]) for r in ids if len(r) >= lo}
        case = cases.get(f"bucket:{bname}")
        if not expected:
            assert case is None, bname
            continue
        got = [tuple(int(i) for i in row if i != 0) for b in case.batches for row in b]
        assert len(got) == len(set(got)), f"bucket {bname} repeats a row"
        assert set(got) == expected and case.rows == len(expected), bname
    assert 0 < cases["bucket:3-4"].rows < sum(1 for r in ids if len(r) >= 3)  # repeats were dropped
    left = cases["left_padding"].batches[0]
    assert (left[:, -1] != 0).all(), "left padding puts every text at the end"
    assert {f"batch_{n}" for n in BATCH_SIZES} <= set(cases)
    assert cases["batch_7"].invariance == "batch" and len(cases["batch_7"].base) == 7


def test_verify_without_data_runs_generated_ids_and_says_so(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle / "bundle", tmp_path / "bundle")
    report = parity.verify(bundle, quiet=True)
    assert report.meta["real_texts"] is False and report.meta["accuracy_checked"] is False
    assert report.passed, [c.message() for c in report.failures]
    assert "accuracy not checked" in report.verdict_line()
    assert not any(c.metric == "accuracy_drop" for c in report.checks)
    verdict = json.loads((bundle / "manifest.json").read_text())["verdict"]
    assert verdict["accuracy_checked"] is False and "generated ids only" in verdict["data"]


class RowsDependOnBatch(OnnxRuntimeRunner):
    """A test double of a runtime bug: a row's answer depends on the other rows of its
    batch (as when activations are quantized per batch)."""

    def _infer(self, ids):
        out = dict(super()._infer(ids))
        p = np.array(out["probabilities"], np.float64)
        p[:, 0] += 0.01 * (ids.shape[0] > 1)
        out["probabilities"] = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
        return out


def test_runtime_that_answers_differently_inside_a_batch_fails_by_family(tiny_bundle, tmp_path, monkeypatch):
    bundle = _copy(tiny_bundle / "bundle", tmp_path / "bundle")
    real = runtimes.pairs_for
    monkeypatch.setattr(runtimes, "pairs_for",
                        lambda fmt: [(RowsDependOnBatch, "all")] if fmt == "onnx" else real(fmt))
    report = parity.verify(bundle, data=str(tiny_bundle / "test.jsonl"), formats=["onnx"], quiet=True)
    failed = {(c.case, c.metric) for c in report.failures}
    assert ("batch_7", "batch_invariance") in failed and ("batch_64", "batch_invariance") in failed, failed
    assert all(c.runtime == "onnxruntime-all" for c in report.failures)
    assert not report.passed


class RightPaddingOnly(OnnxRuntimeRunner):
    """A test double of a runtime whose masking breaks on left padding: it answers for
    a left-padded row as if the row were all padding."""

    def _infer(self, ids):
        ids = np.where(np.cumsum(ids != 0, axis=1) == 0, ids, ids)  # same ids...
        left = (ids[:, 0] == 0) & (ids[:, -1] != 0)
        out = dict(super()._infer(ids))
        if left.any():
            empty = dict(super()._infer(np.zeros((1, 1), np.int32)))["probabilities"][0]
            p = np.array(out["probabilities"], copy=True)
            p[left] = empty
            out["probabilities"] = p
        return out


def test_left_padding_family_catches_a_right_padding_only_runtime(tiny_bundle, tmp_path, monkeypatch):
    bundle = _copy(tiny_bundle / "bundle", tmp_path / "bundle")
    real = runtimes.pairs_for
    monkeypatch.setattr(runtimes, "pairs_for",
                        lambda fmt: [(RightPaddingOnly, "all")] if fmt == "onnx" else real(fmt))
    report = parity.verify(bundle, data=str(tiny_bundle / "test.jsonl"), formats=["onnx"], quiet=True)
    failed = {c.case for c in report.failures}
    assert {"left_padding", "mixed_padding"} <= failed, failed
    assert not any(c.startswith("pad+") for c in failed), "right padding was fine"


def test_skipped_runtime_passes_only_without_strict(tiny_bundle, tmp_path, monkeypatch):
    from probattn.export.runtimes.openvino import OpenVINORunner

    bundle = _copy(tiny_bundle / "bundle", tmp_path / "bundle")
    monkeypatch.setattr(OpenVINORunner, "unavailable", classmethod(lambda cls: "openvino not installed (test)"))
    # every artifact OpenVINO would run (its formats, not ruled out by design) is a skipped pair
    manifest = json.loads((bundle / "manifest.json").read_text())
    on_openvino = [a["path"] for a in manifest["artifacts"] if a["format"] in OpenVINORunner.formats
                   and not OpenVINORunner.cannot_run(a["format"], a["precision"], a)]
    assert {"model_fp32.tflite", "model_fp32.onnx", "model_fp32_int64.onnx"} <= set(on_openvino), on_openvino
    n = len(on_openvino)
    report = parity.verify(bundle, quiet=True)
    assert [(s["artifact"], s["runtime"]) for s in report.skipped] == [(a, "openvino") for a in on_openvino]
    assert report.passed and f"; {n} artifact x runtime pairs skipped" in report.verdict_line()
    strict = parity.verify(bundle, quiet=True, strict=True)
    assert not strict.passed and strict.verdict_line().startswith(f"FAIL (--strict): {n} artifact x runtime")


def test_format_that_ran_nowhere_is_not_verified(tiny_bundle, tmp_path, monkeypatch):
    from probattn.export.runtimes.onnxruntime import OnnxRuntimeRunner as Ort
    from probattn.export.runtimes.openvino import OpenVINORunner

    bundle = _copy(tiny_bundle / "bundle", tmp_path / "bundle")
    for cls in (Ort, OpenVINORunner):
        monkeypatch.setattr(cls, "unavailable", classmethod(lambda cls: "not installed (test)"))
    report = parity.verify(bundle, quiet=True, formats=["onnx"])
    assert not report.passed
    assert report.verdict_line().startswith("NOT VERIFIED: requested format(s) onnx ran on no runtime")
    assert "checks passed" not in report.verdict_line().split("(")[0]


def test_cli_strict_exit_codes(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle / "bundle", tmp_path / "bundle")
    proc = run_cli("verify", bundle, "--strict", "--formats", "onnx", "--report-dir", tmp_path / "r")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-2]
    assert last.startswith("all ") and "accuracy not checked" in last, last

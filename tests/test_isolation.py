"""Runtimes in child processes (export/runtimes/isolated.py): a crash or a hang fails the
row with its cause, and verify goes on. The crash is real: LiteRT's reference int8 SOFTMAX
kernel aborts the process on a long enough row (600 steps here)."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from probattn.export.runtimes.isolated import IsolatedRunner, Limits, RuntimeCrash
from probattn.models.errors import UsageError

TEXTS = ["a good film", "a bad film that is long", "fine acting and a plot", "dull", "a long plot"] * 8


@pytest.fixture(scope="module")
def naive_int8(tmp_path_factory):
    """A bundle with a full-int8 TFLite of the naive-masking classifier, whose reference-kernel
    SOFTMAX aborts on rows of ~600 steps; max length 160 makes verify run 640-step rows."""
    from probattn.export.exporter import ExportOptions, export
    from probattn.models.classifier import build_classifier
    from probattn.models.keras_compat import get_keras
    from probattn.models.layers import layer_classes
    from probattn.models.text.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("naive")
    keras = get_keras()
    keras.utils.set_random_seed(0)
    model = build_classifier(50, 2, 8, 16, attention_layer=layer_classes().NaiveProbAttention())
    model.save(d / "naive.keras")
    train_tokenizer(TEXTS, vocab_size=50).save(str(d / "tokenizer.json"))
    with open(d / "data.jsonl", "w") as f:
        for i, t in enumerate(TEXTS):
            f.write(json.dumps({"text": t, "label": "ab"[i % 2]}) + "\n")
    (d / "labels.json").write_text('["a", "b"]')
    export(d / "naive.keras", d / "bundle", ExportOptions(
        formats=("tflite",), precisions=("int8",), tokenizer=str(d / "tokenizer.json"),
        calibration_data=str(d / "data.jsonl"), labels=str(d / "labels.json"), max_length=160))
    return d


def _runner(bundle, variant, **kw):
    from probattn.export.runtimes.litert import LiteRTRunner

    return IsolatedRunner(LiteRTRunner, bundle / "model_int8.tflite", 50, variant=variant, **kw)


def test_a_crash_is_an_error_with_its_cause(naive_int8):
    ids = np.random.default_rng(0).integers(2, 50, (1, 600)).astype(np.int32)
    with _runner(naive_int8 / "bundle", "reference") as r:
        assert r.infer(ids[:, :100])["probabilities"].shape == (1, 2)  # short rows run
        with pytest.raises(RuntimeCrash, match=r"SIGABRT") as err:
            r.infer(ids)
    assert "running model_int8.tflite on litert-reference" in str(err.value)
    with _runner(naive_int8 / "bundle", "xnnpack") as r:  # the other kernels run the same row
        assert np.isfinite(r.infer(ids)["probabilities"]).all()


def test_one_worker_answers_every_call_and_bad_input_is_not_a_crash(naive_int8):
    with _runner(naive_int8 / "bundle", "xnnpack") as r:
        pid = r.worker.proc.pid
        for n in (1, 5, 40):
            r.infer(np.ones((2, n), np.int32))
        with pytest.raises(UsageError, match=r"Received id 99"):
            r.infer(np.full((1, 3), 99, np.int32))
        r.infer(np.ones((1, 3), np.int32))
        assert r.worker.proc.pid == pid and r.worker.proc.poll() is None


def test_a_hang_is_killed_and_reported(naive_int8):
    r = _runner(naive_int8 / "bundle", "xnnpack", limits=Limits(call_seconds=3))
    with r:
        proc = r.worker.proc
        os.kill(proc.pid, signal.SIGSTOP)  # a real stopped process: it will never answer
        with pytest.raises(RuntimeCrash, match=r"no answer within 3 s .*hung"):
            r.infer(np.ones((1, 4), np.int32))
        assert proc.poll() is not None, "the hung process was not killed"


def test_verify_fails_the_crashed_row_and_goes_on(naive_int8):
    from probattn.export.parity import verify

    report = verify(naive_int8 / "bundle", data=str(naive_int8 / "data.jsonl"), quiet=True)
    assert not report.passed
    crashes = [c for c in report.failures if c.metric == "runtime_crash"]
    assert [(c.artifact, c.runtime) for c in crashes] == [("model_int8.tflite", "litert-reference")], crashes
    assert "SIGABRT" in crashes[0].detail
    rows = {(r["artifact"], r["runtime"]): r for r in report.rows}
    xnn = rows[("model_int8.tflite", "litert-xnnpack")]
    assert "4x_max_length" in xnn["cases"], "verify did not go on with the other kernels"
    assert ("model.keras", "keras") in rows

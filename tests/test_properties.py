"""Property-based parity: random shapes, padding and token ids, on every fp32 runtime.

One small model is built and exported (TFLite + ONNX, fp32) once for this module. Hypothesis
then draws the batch size (1 to 64), the sequence length (1 to 512), how much padding is
appended (0 to 256) and the token ids (rows of any real length, all-padding rows included),
and checks that

* Keras, onnxruntime (all / no graph optimizations) and LiteRT (XNNPACK / reference
  kernels) agree within the fp32 bound (1e-5), on probabilities and attention weights;
* appending padding moves no runtime's probabilities by more than 1e-6 and puts no
  attention on the pads;
* an out-of-range id is refused, the same way, by every runner before any runtime runs.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import tiny_classifier
from probattn.models.errors import UsageError
from probattn.export.parity.tolerances import FP32_MAX_ABS, FP32_PAD_INVARIANCE, MAX_PAD_ATTENTION

VOCAB = 300
TEXTS = ["a gripping and funny film", "dull, slow and far too long", "the cast is superb",
         "i did not like the ending", "an honest, moving story", "flat jokes and a thin plot"]

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    """Keras, onnxruntime x2 and LiteRT x2 runners over one freshly exported tiny model."""
    from probattn.export import bundle as B
    from probattn.export.exporter import ExportOptions, export
    from probattn.export.runtimes.keras import KerasRunner
    from probattn.export.runtimes.litert import LiteRTRunner
    from probattn.export.runtimes.onnxruntime import OnnxRuntimeRunner as OnnxRunner
    from probattn.models.text.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("props")
    model = tiny_classifier(vocab_size=VOCAB, embedding_dim=16, seed=3)
    model.save(d / "tiny.keras")
    train_tokenizer(TEXTS, vocab_size=VOCAB).save(str(d / "tokenizer.json"))
    manifest = export(d / "tiny.keras", d / "bundle",
                      ExportOptions(tokenizer=str(d / "tokenizer.json"), formats=("tflite", "onnx"),
                                    precisions=("fp32",), onnx_int64=False))
    assert manifest["vocab_size"] == VOCAB
    paths = {(a["format"], a["precision"]): B.verified_path(d / "bundle", a) for a in manifest["artifacts"]}
    out = [KerasRunner(paths[("keras", "fp32")], VOCAB),
           OnnxRunner(paths[("onnx", "fp32")], VOCAB, variant="all"),
           OnnxRunner(paths[("onnx", "fp32")], VOCAB, variant="none"),
           LiteRTRunner(paths[("tflite", "fp32")], VOCAB, variant="xnnpack"),
           LiteRTRunner(paths[("tflite", "fp32")], VOCAB, variant="reference")]
    for r in out:
        r.activate()
    yield out
    for r in out:
        r.deactivate()


def _ids(batch, length, seed, allpad_fraction):
    """int32 [batch, length]: each row has a random real length (0 = all padding) followed
    by pads; real ids are drawn from [1, VOCAB)."""
    rng = np.random.default_rng(seed)
    real = rng.integers(1, length + 1, batch)
    real[rng.random(batch) < allpad_fraction] = 0
    ids = rng.integers(1, VOCAB, (batch, length)).astype(np.int32)
    ids[np.arange(length)[None, :] >= real[:, None]] = 0
    return ids


shapes = dict(batch=st.integers(1, 64), length=st.integers(1, 512), pad=st.integers(0, 256),
              seed=st.integers(0, 2**32 - 1), allpad_fraction=st.sampled_from([0.0, 0.2, 1.0]))


@SETTINGS
@given(**shapes)
@example(batch=1, length=1, pad=0, seed=0, allpad_fraction=1.0)  # a single pad token
@example(batch=64, length=512, pad=256, seed=1, allpad_fraction=0.2)  # the largest case
def test_fp32_runtimes_agree_and_ignore_padding(runners, batch, length, pad, seed, allpad_fraction):
    ids = _ids(batch, length, seed, allpad_fraction)
    padded = np.concatenate([ids, np.zeros((batch, pad), np.int32)], axis=1)
    reference = None
    for runner in runners:
        out = runner.infer(ids)
        assert sorted(out) == ["attention_weights", "probabilities"], runner.name
        assert out["probabilities"].shape == (batch, 3) and out["attention_weights"].shape == (batch, length)
        for name, value in out.items():
            assert np.isfinite(value).all(), f"{runner.name}: non-finite {name}"
        if reference is None:
            reference = out  # Keras
        else:
            for name in ("probabilities", "attention_weights"):
                np.testing.assert_allclose(out[name], reference[name], rtol=0, atol=FP32_MAX_ABS,
                                           err_msg=f"{runner.name} vs keras, {name}, ids {ids.shape}")
        # padding invariance on the same runner
        more = runner.infer(padded)
        np.testing.assert_allclose(more["probabilities"], out["probabilities"], rtol=0, atol=FP32_PAD_INVARIANCE,
                                   err_msg=f"{runner.name}: {pad} pads moved the probabilities")
        np.testing.assert_allclose(more["attention_weights"][:, :length], out["attention_weights"], rtol=0,
                                   atol=FP32_PAD_INVARIANCE, err_msg=f"{runner.name}: pads moved attention")
        pad_attention = np.abs(more["attention_weights"] * (padded == 0)).max()
        assert pad_attention <= MAX_PAD_ATTENTION, f"{runner.name}: {pad_attention} attention on pads"
        # an all-padding row puts no attention anywhere
        allpad = ids.max(axis=1) == 0
        if allpad.any():
            assert np.all(out["attention_weights"][allpad] == 0), runner.name


@SETTINGS
@given(batch=st.integers(1, 8), length=st.integers(1, 64), seed=st.integers(0, 2**32 - 1),
       bad=st.one_of(st.integers(-2**31, -1), st.integers(VOCAB, 2**31 - 1)),
       dtype=st.sampled_from(["int32", "int64"]))
@example(batch=1, length=1, seed=0, bad=VOCAB, dtype="int32")  # one past the end
@example(batch=1, length=1, seed=0, bad=-1, dtype="int32")
def test_out_of_range_ids_are_refused_by_every_runner(runners, batch, length, seed, bad, dtype):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (batch, length)).astype(dtype)
    ids[rng.integers(batch), rng.integers(length)] = bad
    for runner in runners:
        with pytest.raises(UsageError) as ei:
            runner.infer(ids)
        msg = str(ei.value)
        assert f"Received id {bad}." in msg and f"[0, {VOCAB})" in msg, (runner.name, msg)

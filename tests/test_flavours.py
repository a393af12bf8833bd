"""One ProbAttention and one model family in both Kerases: the same math, the same
registered name, identical outputs on the same weights."""
from __future__ import annotations

import numpy as np
import pytest

from probattn.models.zoo import ARCHITECTURES, build_model


def _ids():
    rng = np.random.default_rng(0)
    ids = np.zeros((6, 14), np.int32)
    for i, n in enumerate((14, 9, 3, 1, 6, 0)):  # the last row is all padding
        ids[i, :n] = rng.integers(1, 60, n)
    return ids


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_both_flavours_give_identical_outputs_on_the_same_weights(architecture):
    """Every architecture, built in Keras 3 and in tf_keras, with the same weights gives the
    same probabilities and attention weights (float32 op for op: exactly, or within a few
    ulps where the two Kerases order a reduction differently)."""
    from probattn.export.signature import KerasServing

    m3 = build_model(architecture, 60, 3, 8, 8, flavour="3")
    m2 = build_model(architecture, 60, 3, 8, 8, flavour="2")
    rng = np.random.default_rng(1)
    weights = [rng.normal(0, 0.5, w.shape).astype(np.float32) for w in m3.get_weights()]
    assert [w.shape for w in m2.get_weights()] == [w.shape for w in weights]
    m3.set_weights(weights)
    m2.set_weights(weights)
    ids = _ids()
    a = {k: v.numpy() for k, v in KerasServing(m3, True, 60)(ids).items()}
    b = {k: v.numpy() for k, v in KerasServing(m2, True, 60)(ids).items()}
    assert sorted(a) == sorted(b) == ["attention_weights", "probabilities"]
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=2e-7, err_msg=f"{architecture}: {name}")
    assert np.all(a["attention_weights"][ids == 0] == 0.0)


def test_prob_attention_has_one_registered_name():
    import keras
    import tf_keras

    from probattn.models.layers import layer_classes

    c3, c2 = layer_classes("3").ProbAttention, layer_classes("2").ProbAttention
    assert c3 is not c2 and issubclass(c3, keras.layers.Layer) and issubclass(c2, tf_keras.layers.Layer)
    assert keras.saving.get_registered_name(c3) == tf_keras.saving.get_registered_name(c2) == "probattn>ProbAttention"
    assert c3().get_config().keys() == c2().get_config().keys()


def test_keras3_symbolic_call_with_attention_scores_returns_both():
    """Keras 3 builds symbolic outputs from compute_output_spec: a call asking for the weights
    must return two tensors, not silently one."""
    import keras

    from probattn.models.layers import layer_classes

    x = keras.Input((None, 8))
    out = layer_classes("3").ProbAttention()(x, return_attention_scores=True)
    assert isinstance(out, (tuple, list)) and len(out) == 2
    assert tuple(out[0].shape) == (None, 8) and tuple(out[1].shape) == (None, None)


@pytest.mark.parametrize("flavour", ["3", "2"])
def test_train_builds_the_asked_flavour_and_model(flavour, tmp_path):
    """``probattn train --keras F --model dot`` writes a file the asked Keras wrote."""
    from probattn.export.flavour import detect
    from probattn.models.train import TrainConfig, train

    words = "good bad film plot dull great fine acting".split()
    rng = np.random.default_rng(0)
    csv = tmp_path / "tiny.csv"
    rows = ["text,label"] + [f"{' '.join(rng.choice(words, 5))},{'ab'[i % 2]}" for i in range(60)]
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    metrics = train(TrainConfig(dataset=str(csv), epochs=1, vocab_size=50, embedding_dim=8, hidden_units=8,
                                model="dot", keras=flavour), out, verbose=0)
    assert (metrics["model"], metrics["keras"]) == ("dot", flavour)
    assert detect(out / "model.keras").flavour == flavour

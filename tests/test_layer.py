"""ProbAttention: the math against a NumPy reference, masking and padding invariance,
precision (float32 / float16 / mixed_float16), serialization and convertibility."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_classifier
from probattn.models import (GATE, ProbAttention, build_classifier, find_attention_layer,
                             prob_attention_pool)
from probattn.models.keras_compat import DEFAULT_FLAVOUR, get_keras
from probattn.models.layers import GATE_MARGIN

#: the Keras of probattn's default flavour (Keras 3: what tf.keras is on TensorFlow 2.21)
keras = get_keras()

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


# --------------------------------------------------------------------------- reference

def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def reference_pool(x, kernel, mask=None):
    """Attention pooling in float64 NumPy: the function the layer computes.

    scores = x @ w; weights = softmax over the valid steps only (padded steps exactly 0; an
    all-padding row all 0); pooled = weights @ x.
    """
    x = np.asarray(x, np.float64)
    scores = (x @ np.asarray(kernel, np.float64))[..., 0]  # (B, T)
    if mask is None:
        weights = _softmax(scores)
    else:
        m = np.asarray(mask, bool)
        z = np.where(m, scores, -np.inf)
        best = z.max(axis=-1, keepdims=True)
        e = np.where(m, np.exp(z - np.where(np.isfinite(best), best, 0.0)), 0.0)
        total = e.sum(axis=-1, keepdims=True)
        weights = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    pooled = np.einsum("bt,btf->bf", weights, x)
    return pooled, weights


def _case(name):
    """(x, kernel, mask) for a named situation; float32, batch 4, time 12, features 5."""
    rng = np.random.default_rng(sum(map(ord, name)))
    b, t, f = 4, 12, 5
    x = rng.normal(0.0, 1.0, (b, t, f)).astype(np.float32)
    kernel = rng.normal(0.0, 1.5, (f, 1)).astype(np.float32)
    lengths = np.array([12, 7, 3, 1])
    if name == "all_padding_row":
        lengths = np.array([12, 5, 0, 2])
    if name == "valid_scores_below_minus_20":
        # every real score is far below zero: the pads (at 0 after masking) must not win the max
        x = rng.uniform(0.6, 1.0, (b, t, f)).astype(np.float32)
        kernel = np.full((f, 1), -10.0, np.float32)  # scores in [-50, -30]
    mask = np.arange(t)[None, :] < lengths[:, None]
    return x, kernel, (None if name == "no_mask" else mask)


LAYER_CASES = ["no_mask", "ragged_mask", "all_padding_row", "valid_scores_below_minus_20"]


@pytest.mark.parametrize("case", LAYER_CASES)
def test_prob_attention_pool_matches_numpy_reference(case):
    x, kernel, mask = _case(case)
    pooled, weights = prob_attention_pool(tf.constant(x), tf.constant(kernel),
                                          None if mask is None else tf.constant(mask))
    ref_pooled, ref_weights = reference_pool(x, kernel, mask)
    np.testing.assert_allclose(weights.numpy(), ref_weights, rtol=0, atol=1e-6,
                               err_msg=f"attention weights differ from the NumPy reference ({case})")
    np.testing.assert_allclose(pooled.numpy(), ref_pooled, rtol=0, atol=1e-5,
                               err_msg=f"pooled output differs from the NumPy reference ({case})")


def _unit_groups(v, size):
    """Each group of ``size`` features L2-normalised (the whole vector when ``size`` does not
    divide the feature count); the zero vector stays zero."""
    f = v.shape[-1]
    size = size if f % size == 0 else f
    g = v.reshape(v.shape[0], f // size, size)
    n = np.linalg.norm(g, axis=-1, keepdims=True)
    return np.divide(g, n, out=np.zeros_like(g), where=n > 0).reshape(v.shape)


@pytest.mark.parametrize("features", [5, 32])
def test_normalized_pooling_is_the_unit_pooled_vector(features):
    """normalize=True (the classifier's): the plain pooled vector, L2-normalised per group of
    NORM_GROUP features, on both paths (short rows below the gate, long ones above it); the
    weights are the plain ones; an all-padding row pools to the zero vector."""
    from probattn.models.layers import NORM_GROUP

    rng = np.random.default_rng(features)
    b, t = 4, 40
    x = rng.normal(0.0, 1.0, (b, t, features)).astype(np.float32)
    kernel = rng.normal(0.0, 0.05, (features, 1)).astype(np.float32)  # spread: mass ~ length
    mask = np.arange(t)[None, :] < np.array([40, 17, 3, 0])[:, None]
    pooled, weights = prob_attention_pool(tf.constant(x), tf.constant(kernel), tf.constant(mask), normalize=True)
    ref_pooled, ref_weights = reference_pool(x, kernel, mask)
    np.testing.assert_allclose(weights.numpy(), ref_weights, rtol=0, atol=1e-6)
    np.testing.assert_allclose(pooled.numpy(), _unit_groups(ref_pooled, NORM_GROUP), rtol=0, atol=1e-5)
    assert not pooled.numpy()[3].any()
    layer = ProbAttention(normalize=True)
    assert ProbAttention.from_config(layer.get_config()).normalize is True
    assert ProbAttention().normalize is False  # models saved before the option load as they were


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_call_returns_weights_summing_to_one(case):
    x, kernel, mask = _case(case)
    layer = ProbAttention()
    layer.build(x.shape)
    layer.kernel.assign(kernel)
    pooled, weights = layer(tf.constant(x), mask=None if mask is None else tf.constant(mask),
                            return_attention_scores=True)
    assert tuple(weights.shape) == x.shape[:2], "weights must be (batch, time)"
    assert tuple(pooled.shape) == (x.shape[0], x.shape[2]), "pooled must be (batch, features)"
    pooled_only = layer(tf.constant(x), mask=None if mask is None else tf.constant(mask))
    np.testing.assert_allclose(pooled_only.numpy(), pooled.numpy(), rtol=0, atol=0,
                               err_msg="return_attention_scores changed the pooled output")
    w = weights.numpy()
    valid = np.ones(x.shape[:2], bool) if mask is None else mask
    has_valid = valid.any(axis=1)
    np.testing.assert_allclose(w[has_valid].sum(axis=1), 1.0, rtol=0, atol=1e-6,
                               err_msg=f"weights of rows with a valid step must sum to 1 ({case})")
    assert np.all(w[~valid] == 0.0), f"padded steps must get exactly zero weight ({case})"
    assert np.all(pooled.numpy()[~has_valid] == 0.0), "an all-padding row must pool to zeros"
    ref_pooled, ref_weights = reference_pool(x, kernel, mask)
    np.testing.assert_allclose(w, ref_weights, rtol=0, atol=1e-6,
                               err_msg=f"layer weights differ from the NumPy reference ({case})")


@pytest.mark.parametrize("case", ["ragged_mask", "valid_scores_below_minus_20"])
@pytest.mark.parametrize("extra", [16, 244], ids=["pad+16", "pad+244"])
def test_layer_padding_invariance(case, extra):
    """Appending masked steps (any values) moves the pooled output by <= 1e-6."""
    x, kernel, mask = _case(case)
    rng = np.random.default_rng(extra)
    pad_x = rng.uniform(-1.0, 1.0, (x.shape[0], extra, x.shape[2])).astype(np.float32)
    x = np.clip(x, -1.0, 1.0)  # |x| <= 1: exp(-20) * 256 pads is then < 6e-7 on the output
    x_long = np.concatenate([x, pad_x], axis=1)
    mask_long = np.concatenate([mask, np.zeros((x.shape[0], extra), bool)], axis=1)
    short, _ = prob_attention_pool(tf.constant(x), tf.constant(kernel), tf.constant(mask))
    long, w_long = prob_attention_pool(tf.constant(x_long), tf.constant(kernel),
                                       tf.constant(mask_long))
    np.testing.assert_allclose(long.numpy(), short.numpy(), rtol=0, atol=1e-6,
                               err_msg=f"appending {extra} padded steps changed the output ({case})")
    np.testing.assert_allclose(w_long.numpy().sum(axis=1), 1.0, rtol=0, atol=1e-6,
                               err_msg=f"weights do not sum to 1 after padding ({case})")


# ----------------------------------------------------------------- classifier padding

def _ragged_ids(rows=8, max_len=64, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((rows, max_len), np.int32)
    lengths = np.linspace(1, max_len, rows).astype(int)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(2, vocab, n)
    return ids


@pytest.fixture(scope="module")
def ragged_ids():
    return _ragged_ids()


@pytest.mark.parametrize("width", [128, 256], ids=["64->128", "64->256"])
def test_classifier_is_padding_invariant(ragged_ids, width):
    model = tiny_classifier()
    base = model.predict(ragged_ids, verbose=0)
    padded = np.pad(ragged_ids, ((0, 0), (0, width - ragged_ids.shape[1])))
    out = model.predict(padded, verbose=0)
    np.testing.assert_allclose(out, base, rtol=0, atol=1e-6,
                               err_msg=f"padding 64 -> {width} steps changed the probabilities")


@pytest.mark.parametrize("width", [128, 256], ids=["64->128", "64->256"])
def test_seed_masking_layer_is_not_padding_invariant(ragged_ids, width):
    """The seed page's Embedding(mask_zero) -> Masking() -> ProbAttention: Masking()
    recomputes the mask from the embedding values (token 0's row is not zero), so every
    pad gets attention. The same check as above must catch it."""
    model = tiny_classifier(masking_layer=True)
    base = model.predict(ragged_ids, verbose=0)
    padded = np.pad(ragged_ids, ((0, 0), (0, width - ragged_ids.shape[1])))
    out = model.predict(padded, verbose=0)
    change = float(np.max(np.abs(out - base)))
    assert change > 1e-4, f"expected the Masking() model to change with padding; max change {change:g}"


# ------------------------------------------------------------------------- precision

@pytest.fixture
def mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_all_padding_rows_are_defined(policy, ragged_ids):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = tiny_classifier()
        ids = np.concatenate([np.zeros((2, 64), np.int32), ragged_ids])  # rows 0-1: all pads
        probs = model.predict(ids, verbose=0)
        assert np.isfinite(probs).all(), f"non-finite probabilities under {policy}"
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=1e-3,
                                   err_msg=f"probabilities do not sum to 1 under {policy}")
        emb = model.get_layer("embedding")
        att = find_attention_layer(model)
        x = emb(ids)
        pooled, weights = att(x, mask=emb.compute_mask(ids), return_attention_scores=True)
        if policy == "mixed_float16":
            assert pooled.dtype == tf.float16, "mixed_float16 should compute attention in float16"
        pooled, weights = pooled.numpy(), weights.numpy()
        assert np.isfinite(pooled).all() and np.isfinite(weights).all(), f"NaN/inf under {policy}"
        assert np.all(pooled[:2] == 0.0), f"all-padding rows must pool to zeros under {policy}"
        assert np.all(weights[:2] == 0.0), f"all-padding rows must get zero weights under {policy}"
        np.testing.assert_allclose(weights[2:].astype(np.float64).sum(axis=1), 1.0, rtol=0,
                                   atol=1e-2 if policy == "mixed_float16" else 1e-6,
                                   err_msg=f"weights of real rows must sum to 1 under {policy}")
        assert np.all(weights[ids == 0] == 0.0), f"pads got weight under {policy}"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_mixed_precision_matches_float32_on_normal_rows(mixed_precision, ragged_ids):
    probs16 = tiny_classifier().predict(ragged_ids, verbose=0)
    keras.mixed_precision.set_global_policy("float32")
    probs32 = tiny_classifier().predict(ragged_ids, verbose=0)
    assert np.isfinite(probs16).all(), "mixed_float16 produced NaN/inf on normal rows"
    np.testing.assert_allclose(probs16, probs32, rtol=0, atol=5e-3,
                               err_msg="mixed_float16 probabilities far from float32")


@pytest.mark.parametrize("mass", [1.0, 2.0, GATE - 0.5, GATE, GATE + 0.5, GATE + 1.0, GATE + 1.5,
                                  GATE + GATE_MARGIN, GATE + GATE_MARGIN + 0.5, 4 * GATE, 300.0])
def test_both_normalisation_paths_are_exact_softmax(mass):
    """Rows whose attention mass sum(exp(c)) sits below, at, between and above the gate and
    its margin: whichever path (or blend) the gate picks, float weights are the softmax."""
    if mass == 1.0:  # a single valid step
        n, scores = 1, np.zeros((1, 1), np.float32)
    else:  # one step at score 0 (weight e^0 = 1) and n-1 equal steps sharing mass - 1
        n = int(np.ceil(mass)) + 1
        scores = np.array([[0.0] + [np.log((mass - 1.0) / (n - 1))] * (n - 1)], np.float32)
    x = np.eye(n, dtype=np.float32)[None]  # pooled = weights
    kernel = np.ones((n, 1), np.float32)
    inputs = x * scores[..., None]  # scores = inputs @ 1 = the row above
    pooled, weights = prob_attention_pool(tf.constant(inputs), tf.constant(kernel),
                                          tf.constant(np.ones((1, n), bool)))
    _, ref = reference_pool(inputs, kernel, np.ones((1, n), bool))
    np.testing.assert_allclose(weights.numpy(), ref, rtol=0, atol=2e-6, err_msg=f"mass {mass}")


def test_layer_graph_avoids_the_ops_int8_kernels_get_wrong():
    """SOFTMAX (fixed 1/256 int8 output step; the reference kernel aborts past an exponent
    sum of 512), DIV (saturates on small numerators) and SUM over time (wrong on the
    reference kernels) must not appear in the pooling graph."""
    fn = tf.function(prob_attention_pool).get_concrete_function(
        tf.TensorSpec([None, None, 8], tf.float32), tf.TensorSpec([8, 1], tf.float32),
        tf.TensorSpec([None, None], tf.bool))
    ops = {op.type for op in fn.graph.get_operations()}
    assert not ops & {"Softmax", "RealDiv", "Div", "Sum"}, sorted(ops)
    assert {"BatchMatMulV2", "Exp", "Log"} <= ops, sorted(ops)


def _graph_constants(fn, *specs):
    graph = tf.function(fn).get_concrete_function(*specs).graph
    values = []
    for op in graph.get_operations():
        if op.type == "Const":
            values.append(tf.make_ndarray(op.get_attr("value")))
    return graph, values


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16], ids=["float32", "float16"])
def test_no_graph_constant_outside_float16_range(dtype):
    _, consts = _graph_constants(
        prob_attention_pool, tf.TensorSpec([None, None, 8], dtype),
        tf.TensorSpec([8, 1], dtype), tf.TensorSpec([None, None], tf.bool))
    floats = [c for c in consts if np.issubdtype(c.dtype, np.floating)]
    assert floats, "expected at least the gate constant in the graph"
    worst = max(float(np.max(np.abs(c.astype(np.float64)))) for c in floats if c.size)
    assert worst < FLOAT16_MAX, f"a float constant of magnitude {worst:g} does not fit float16"


def test_float16_pool_has_no_nan_or_inf():
    x, kernel, mask = _case("all_padding_row")
    x = x * 20.0  # scores of several hundred: exercises the centring in float16
    pooled, weights = prob_attention_pool(tf.constant(x, tf.float16),
                                          tf.constant(kernel, tf.float16), tf.constant(mask))
    assert pooled.dtype == tf.float16
    p, w = pooled.numpy().astype(np.float64), weights.numpy().astype(np.float64)
    assert np.isfinite(p).all() and np.isfinite(w).all(), "float16 pooling produced NaN/inf"
    assert np.all(p[~mask.any(axis=1)] == 0.0), "float16 all-padding row is not zero"
    ref_pooled, ref_weights = reference_pool(x.astype(np.float16), kernel.astype(np.float16), mask)
    np.testing.assert_allclose(w, ref_weights, rtol=0, atol=2e-3,
                               err_msg="float16 weights far from the reference")
    # two float16 steps at the output's magnitude (values reach ~40, where one step is 1/32)
    two_steps = 2 * float(np.spacing(np.float16(np.abs(ref_pooled).max())))
    np.testing.assert_allclose(p, ref_pooled, rtol=0, atol=two_steps,
                               err_msg="float16 pooled output more than two float16 steps from the reference")


# --------------------------------------------------------------------- serialization

def test_get_config_round_trip():
    layer = ProbAttention(kernel_initializer="glorot_uniform", name="att", dtype="float32")
    config = layer.get_config()
    assert config["name"] == "att"
    clone = ProbAttention.from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone.kernel_initializer, keras.initializers.GlorotUniform)
    serialized = keras.layers.serialize(layer)
    assert serialized["registered_name"] == "probattn>ProbAttention"
    again = keras.layers.deserialize(serialized)
    assert type(again) is ProbAttention and again.get_config() == config


def _seed_layer_class():
    """A minimal stand-in for the seed page's layer: same class *name*, not registered,
    one (features, 1) kernel, plain softmax over time (no mask handling)."""

    class ProbAttention(keras.layers.Layer):  # noqa: F811 - the name is the point
        def build(self, input_shape):
            self.W = self.add_weight(name="att_weight", shape=(int(input_shape[-1]), 1),
                                     initializer="normal")
            super().build(input_shape)

        def call(self, x):
            e = tf.squeeze(tf.matmul(x, self.W), -1)
            a = tf.nn.softmax(e, axis=-1)
            return tf.reduce_sum(x * tf.expand_dims(a, -1), axis=1)

    return ProbAttention


LOADER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    from probattn.models.keras_compat import get_keras
    import probattn.models
    from probattn.models import ProbAttention

    d = Path(sys.argv[1])
    keras = get_keras()
    load = keras.saving.load_model if hasattr(keras.saving, "load_model") else keras.models.load_model
    own = {}
    if keras.__name__ == "keras":  # a Keras 3 .h5 names the Embedding mask op NotEqual, which
        from keras.src.ops.numpy import NotEqual  # its own .h5 reader does not know
        own = {"NotEqual": NotEqual}
    ids = np.load(d / "ids.npy")
    seed_ids = np.load(d / "seed_ids.npy")
    classes = {}
    for name in ("model.keras", "model.h5"):
        m = load(d / name, custom_objects=own if name.endswith(".h5") else None)
        np.save(d / ("got_" + name + ".npy"), m.predict(ids, verbose=0))
        classes[name] = [type(l).__module__ + "." + type(l).__name__ for l in m.layers]
    for name in ("seed.keras", "seed.h5"):
        m = load(d / name, custom_objects={"ProbAttention": ProbAttention, **own})
        np.save(d / ("got_" + name + ".npy"), m.predict(seed_ids, verbose=0))
        classes[name] = [type(l).__module__ + "." + type(l).__name__ for l in m.layers]
    (d / "classes.json").write_text(json.dumps(classes))
""")


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Save our classifier and a seed-class model as .keras and .h5, then load all four in a
    fresh interpreter that only imports ``probattn.models``."""
    d = tmp_path_factory.mktemp("saved")
    ids = _ragged_ids(rows=6, max_len=20)
    model = tiny_classifier()
    np.save(d / "ids.npy", ids)
    np.save(d / "expected_model.keras.npy", model.predict(ids, verbose=0))
    np.save(d / "expected_model.h5.npy", model.predict(ids, verbose=0))
    model.save(d / "model.keras")
    with warnings.catch_warnings():  # "HDF5 ... is considered legacy": testing it on purpose
        warnings.simplefilter("ignore", UserWarning)
        model.save(d / "model.h5")

    keras.utils.set_random_seed(1)
    seed_cls = _seed_layer_class()
    inputs = keras.Input(shape=(20,), dtype="int32")
    x = keras.layers.Embedding(50, 8)(inputs)
    x = seed_cls()(x)
    x = keras.layers.Dense(16, activation="relu")(x)
    seed_model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    seed_ids = np.random.default_rng(1).integers(1, 50, (6, 20)).astype(np.int32)  # no pads
    np.save(d / "seed_ids.npy", seed_ids)
    for name in ("seed.keras", "seed.h5"):
        np.save(d / f"expected_{name}.npy", seed_model.predict(seed_ids, verbose=0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            seed_model.save(d / name)

    script = d / "load.py"
    script.write_text(LOADER)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, str(script), str(d)], capture_output=True, text=True,
                          cwd=d, env=env, timeout=300)
    assert proc.returncode == 0, f"loader failed:\n{proc.stderr[-3000:]}"
    return d, json.loads((d / "classes.json").read_text())


@pytest.mark.parametrize("name", ["model.keras", "model.h5"])
def test_saved_model_reloads_in_fresh_process(reloaded, name):
    """``import probattn.models`` is all a fresh process needs to load our models (plus, for a
    Keras 3 ``.h5``, Keras' own ``NotEqual`` op class, which its .h5 reader does not know)."""
    d, classes = reloaded
    assert "probattn.models.layers.ProbAttention" in classes[name]
    np.testing.assert_allclose(np.load(d / f"got_{name}.npy"), np.load(d / f"expected_{name}.npy"),
                               rtol=0, atol=1e-6, err_msg=f"{name} predicts differently after reload")


@pytest.mark.parametrize("name", ["seed.keras", "seed.h5"])
def test_seed_class_model_loads_with_custom_objects(reloaded, name):
    """A user who *chooses* to run a model saved with the seed page's unregistered
    ``ProbAttention`` with ours instead passes it by hand::

        keras.saving.load_model(path, custom_objects={"ProbAttention": ProbAttention})

    (``from probattn.models import ProbAttention``). On unpadded input our layer computes
    the seed's softmax pooling, so predictions are unchanged. probattn itself never makes
    that substitution (see tests/test_loading.py).
    """
    d, classes = reloaded
    assert "probattn.models.layers.ProbAttention" in classes[name], classes[name]
    np.testing.assert_allclose(np.load(d / f"got_{name}.npy"), np.load(d / f"expected_{name}.npy"),
                               rtol=0, atol=1e-5,
                               err_msg=f"{name} loaded with our class predicts differently")


# ---------------------------------------------------------- seed usage and constructor

def test_seed_page_usage_example():
    """The seed page's example with our import. No ``Masking()`` after the Embedding:
    it would recompute the mask from the embedding values and switch masking off
    (see test_seed_masking_layer_is_not_padding_invariant)."""
    keras.utils.set_random_seed(0)
    maxlen, vocab_size, embedding_dim, n_classes = 40, 500, 16, 3
    inputs = keras.Input(shape=(maxlen,))
    x = keras.layers.Embedding(vocab_size, embedding_dim, mask_zero=True)(inputs)
    x = ProbAttention()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])

    rng = np.random.default_rng(0)
    x_train = np.zeros((16, maxlen), np.float32)
    for i in range(16):
        n = rng.integers(1, maxlen + 1)
        x_train[i, :n] = rng.integers(1, vocab_size, n)
    y_train = keras.utils.to_categorical(rng.integers(0, n_classes, 16), n_classes)
    before = [w.copy() for w in model.get_weights()]
    loss, _ = model.train_on_batch(x_train, y_train)
    assert np.isfinite(loss), f"training loss is {loss}"
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights())), \
        "one training step changed no weight"
    probs = model.predict(x_train, verbose=0)
    assert probs.shape == (16, n_classes)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=1e-5,
                               err_msg="softmax outputs do not sum to 1")


def test_build_classifier_names_and_any_length():
    model = build_classifier(30, 4, embedding_dim=8, hidden_units=8)
    assert [t.name.split(":")[0] for t in model.inputs] == ["token_ids"]
    assert model.output_names == ["probabilities"]
    assert tf.as_dtype(model.inputs[0].dtype) == tf.int32
    assert list(model.inputs[0].shape) == [None, None], "time axis must be dynamic"
    assert isinstance(find_attention_layer(model), ProbAttention)
    for width in (1, 7, 300):
        assert model.predict(np.ones((2, width), np.int32), verbose=0).shape == (2, 4)


@pytest.mark.parametrize("kwargs,received", [
    ({"vocab_size": 2}, "2"),
    ({"vocab_size": 3.5}, "3.5"),
    ({"num_classes": 1}, "1"),
    ({"embedding_dim": 0}, "0"),
    ({"hidden_units": -4}, "-4"),
    ({"dropout": 1.0}, "1.0"),
    ({"dropout": -0.1}, "-0.1"),
], ids=["vocab_size=2", "vocab_size=3.5", "num_classes=1", "embedding_dim=0",
        "hidden_units=-4", "dropout=1.0", "dropout=-0.1"])
def test_build_classifier_rejects_bad_arguments(kwargs, received):
    args = {"vocab_size": 30, "num_classes": 2, **kwargs}
    name = next(iter(kwargs))
    with pytest.raises(ValueError) as err:
        build_classifier(**args)
    msg = str(err.value)
    assert name in msg and f"received {received}" in msg, msg


def test_layer_rejects_bad_input_rank():
    with pytest.raises(ValueError, match=r"received shape \(2, 5\)"):
        ProbAttention()(tf.zeros((2, 5)))


# ---------------------------------------------------------------------- convertibility

def _new_axis_slices(fn, *specs):
    graph = tf.function(fn).get_concrete_function(*specs).graph
    return [op.name for op in graph.get_operations()
            if op.type == "StridedSlice" and op.get_attr("new_axis_mask")]


def test_graph_has_no_new_axis_strided_slice():
    specs = (tf.TensorSpec([None, None, 8], tf.float32), tf.TensorSpec([8, 1], tf.float32),
             tf.TensorSpec([None, None], tf.bool))
    assert _new_axis_slices(prob_attention_pool, *specs) == []
    # the check can fail: x[..., None] is a StridedSlice with new_axis_mask
    assert _new_axis_slices(lambda x, k, m: x[..., None], *specs) != []


def test_converts_with_tflite_builtins_only():
    model = tiny_classifier()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    flat = converter.convert()
    assert len(flat) > 1000
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flat)
    ids = _ragged_ids(rows=3, max_len=64)
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], ids.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], ids)
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(out, model.predict(ids, verbose=0), rtol=0, atol=1e-5,
                               err_msg="TFLite float32 output differs from Keras")


# --------------------------------------------------------------------------- the float graph

@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("features", [5, 32])
def test_lean_pool_computes_what_prob_attention_pool_computes(normalize, features):
    """The float graph's math (one pooling matmul, weights e / s) against the int8-safe
    math and the NumPy reference, on rows on both sides of the gate and inside its band
    (attention mass 17 and 18: the two paths mixed), a one-token row and an all-padding row."""
    from probattn.export.signature import REWRITE_MAX_ABS
    from probattn.models.layers import NORM_GROUP, float_trace, lean_pool

    rng = np.random.default_rng(features)
    b, t = 6, 40
    x = rng.normal(0.0, 1.0, (b, t, features)).astype(np.float32)
    kernel = tf.Variable(rng.normal(0.0, 1e-3, (features, 1)).astype(np.float32))  # mass ~ length
    mask = np.arange(t)[None, :] < np.array([40, 17, 18, 3, 1, 0])[:, None]
    with float_trace() as state:
        lean = tf.function(lambda x, m: lean_pool(x, kernel, m, normalize))(tf.constant(x), tf.constant(mask))
    assert state == {"pooled": 1, "tables": 0}  # a plain tensor, not an embedding lookup: scored by matmul
    safe = prob_attention_pool(tf.constant(x), tf.convert_to_tensor(kernel), tf.constant(mask), normalize)
    for got, want in zip(lean, safe):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=REWRITE_MAX_ABS)
    ref_pooled, ref_weights = reference_pool(x, kernel.numpy(), mask)
    np.testing.assert_allclose(lean[1].numpy(), ref_weights, rtol=0, atol=1e-6)
    np.testing.assert_allclose(lean[0].numpy(), _unit_groups(ref_pooled, NORM_GROUP) if normalize else ref_pooled,
                               rtol=0, atol=1e-5)
    assert not lean[0].numpy()[5].any() and not lean[1].numpy()[5].any()
    assert not lean[1].numpy()[~mask].any()  # pads exactly 0


@pytest.mark.parametrize("flavour", ["2", "3"])
@pytest.mark.parametrize("between", [None, "dense"])
def test_float_trace_scores_from_a_token_table_after_an_embedding(flavour, between):
    """Traced for the float artifacts, a ProbAttention right after an embedding lookup
    gathers its scores from the precomputed ``E @ kernel`` table (no Log, no score matmul
    over ``(batch, time, features)``); after another layer it scores by matmul. Either way
    the outputs are the int8-safe trace's, on ragged ids with an all-padding row."""
    from probattn.export.signature import REWRITE_MAX_ABS, KerasServing, apply_rewrites, probe_ids, trace
    from probattn.models.layers import layer_classes

    k = get_keras(flavour)
    if between is None:
        model = tiny_classifier(flavour=flavour)
    else:
        k.utils.set_random_seed(0)
        inputs = k.Input(shape=(None,), dtype="int32", name="token_ids")
        h = k.layers.Embedding(50, 8, mask_zero=True)(inputs)
        h = k.layers.Dense(8, activation="tanh")(h)
        h = layer_classes(flavour).ProbAttention(normalize=True)(h)
        model = k.Model(inputs, k.layers.Dense(3, activation="softmax", name="probabilities")(h))
    serving = KerasServing(model, True, 50)
    apply_rewrites(serving)
    _, safe = trace(serving)
    module, lean = trace(serving, float_only=True)
    tables = 2 if between is None else 0  # the layer and the attention-weights view
    assert module.float_trace == {"pooled": 2, "tables": tables}
    ops = lean.graph.get_operations()
    assert "Log" not in {op.type for op in ops}
    table_gathers = [op for op in ops if op.type == "GatherV2" and op.inputs[0].op.type == "Const"
                     and op.inputs[0].shape.as_list() == [50]]
    score_matmuls = [op for op in ops if "MatMul" in op.type and op.inputs[1].shape.as_list() == [8, 1]]
    assert (len(table_gathers), len(score_matmuls)) == ((2, 0) if between is None else (0, 2))
    ids = tf.constant(probe_ids(50, 30, seed=3))
    want, got = safe(ids), lean(ids)
    for name in want:
        np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), rtol=0, atol=REWRITE_MAX_ABS)


def test_a_score_table_only_for_a_plain_lookup_of_a_variable():
    """``_gathered_rows`` finds ``gather(E, ids)`` of a variable (also in a nested
    tf.function) and reads E's values; a gather of anything computed from it, of a constant,
    or along another axis is scored by matmul."""
    from probattn.models.layers import _gathered_rows

    table = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    v = tf.Variable(table)
    found = {}

    @tf.function(autograph=False)
    def inner(ids):
        x = tf.gather(v, ids)
        found["nested"] = _gathered_rows(x)
        return x

    @tf.function(autograph=False)
    def outer(ids):
        found["resource"] = _gathered_rows(tf.identity(tf.gather(v, ids)))
        found["value"] = _gathered_rows(tf.gather(tf.convert_to_tensor(v), ids))
        found["computed"] = _gathered_rows(tf.gather(v * 2.0, ids))
        found["constant"] = _gathered_rows(tf.gather(tf.constant(table), ids))
        found["axis"] = _gathered_rows(tf.gather(tf.reshape(v, [8, 50]), ids[:, :1], axis=1))
        return inner(ids)

    outer.get_concrete_function(tf.TensorSpec([None, None], tf.int32))
    for kind in ("resource", "value", "nested"):
        assert found[kind] is not None and np.array_equal(found[kind][1], v.numpy()), kind
        assert found[kind][0].dtype == tf.int32 and found[kind][0].shape.rank == 2, kind
    assert found["computed"] is None and found["constant"] is None and found["axis"] is None

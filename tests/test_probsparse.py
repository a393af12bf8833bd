"""ProbSparseAttention (Informer's ProbSparse self-attention): the graph against a NumPy
reference of the same algorithm (tests/probsparse_ref.py) and against Informer's own
semantics, padding invariance, L = 1 and all-padding rows, both Kerases, and conversion
to LiteRT builtins and ONNX."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import probsparse_ref as ref
from probattn.models import ProbSparseAttention, build_probsparse_classifier, prob_sparse_attention
from probattn.models.probsparse import ceil_ln, full_attention, sample_size

H, E, D = 3, 5, 12  # heads, key dim, features
F32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7
#: float32 graph vs float64 reference: the graph sums up to a few hundred products of
#: O(1) terms in float32 (relative error ~ sqrt(T) * eps, about 2e-6 at T = 300) before
#: an O(1) output: 1e-5 absolute leaves room for the worst term, not for a wrong formula
#: (a swapped query, a pad averaged in or a missed key moves outputs by 1e-2 or more).
MAX_ABS = 1e-5


def weights(rng, d=D, h=H, e=E, scale=0.5):
    shapes = [(d, h * e), (h * e,), (d, h * e), (h * e,), (d, h * e), (h * e,), (h * e, d), (d,)]
    return [(rng.normal(size=s) * scale).astype(np.float32) for s in shapes]


def tf_psa(x, mask, W, factor, causal=False, details=False, dtype=tf.float32):
    out = prob_sparse_attention(tf.constant(x, dtype), None if mask is None else tf.constant(mask),
                                *[tf.constant(w, dtype) for w in W], H, E, factor, causal=causal,
                                return_details=details)
    if details:
        return out[0].numpy(), {k: np.asarray(v) for k, v in out[1].items()}
    return out.numpy()


def lengths_mask(lengths, T, left=False):
    m = np.zeros((len(lengths), T), bool)
    for i, n in enumerate(lengths):
        if left:
            m[i, T - n:] = True
        else:
            m[i, :n] = True
    return m


# ------------------------------------------------------------------------------- sizes

def test_ceil_ln_is_exact_integer_arithmetic():
    n = np.concatenate([np.arange(0, 6000), [1096, 1097, 2980, 2981, 22026, 22027, 59874, 59875,
                                             2**31 - 1]]).astype(np.int32)
    assert ceil_ln(tf.constant(n)).numpy().tolist() == [ref.ceil_ln(int(v)) for v in n]
    sizes = sample_size(tf.constant(n[:300]), 5).numpy().tolist()
    assert sizes == [ref.sample_size(v, 5) for v in range(300)]
    assert sizes[:4] == [0, 1, 2, 3]  # all padding, L = 1 (ln 1 = 0 still keeps one), ...


# ------------------------------------------------- equal to full attention when all kept

@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_every_query_kept_equals_full_masked_attention(causal):
    rng = np.random.default_rng(0)
    T = 37
    x = rng.normal(size=(5, T, D)).astype(np.float32)
    mask = lengths_mask([37, 20, 2, 1, 0], T)
    mask[1, 5] = False  # a hole
    mask[0, :3] = False  # left padding
    W = weights(rng)
    full = ref.full_attention_ref(x, mask, *W, H, E, causal=causal)
    y, det = tf_psa(x, mask, W, factor=1000, causal=causal, details=True)
    assert (det["u"] == mask.sum(1)).all(), "factor 1000 must keep every valid query"
    np.testing.assert_allclose(y, full, rtol=0, atol=MAX_ABS, err_msg="ProbSparse (all kept) vs full attention")
    y_ref, _ = ref.prob_sparse_attention_ref(x, mask, *W, H, E, factor=1000, causal=causal)
    # both float64, the same sums in another order
    np.testing.assert_allclose(y_ref, full, rtol=0, atol=1e-12, err_msg="reference (all kept) vs full")
    y_full = full_attention(tf.constant(x), tf.constant(mask), *[tf.constant(w) for w in W], H, E,
                            causal=causal).numpy()
    np.testing.assert_allclose(y_full, full, rtol=0, atol=MAX_ABS, err_msg="full_attention graph vs reference")
    # and the check can fail: with few queries kept the outputs differ
    y_sparse = tf_psa(x, mask, W, factor=1, causal=causal)
    assert np.abs(y_sparse - full).max() > 1e-2


# ------------------------------------------------------- equal to Informer's semantics

@pytest.mark.parametrize("L", [2, 3, 7, 50, 200])
@pytest.mark.parametrize("factor", [1, 5])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_reference_equals_informer_on_fixed_random_samples(L, factor, causal):
    """Informer samples keys with torch.randint (with replacement, per query): the same
    explicit indices go to both. Causal: Informer's non-kept queries get the cumulative
    *sum* of V, ours the cumulative mean (sum / (i + 1)); everything else is equal."""
    rng = np.random.default_rng(L * 10 + factor)
    B, Hh, Dd = 2, 2, 4
    Q, K, V = (rng.normal(size=(B, L, Hh, Dd)) for _ in range(3))
    u = ref.sample_size(L, factor)
    idx = rng.integers(0, L, size=(L, u))
    ctx, M, top = ref.informer_prob_attention(Q, K, V, factor, idx, mask_flag=causal)
    for b in range(B):
        for h in range(Hh):
            out, mine_top, mine_M = ref.probsparse_core(Q[b, :, h] / math.sqrt(Dd), K[b, :, h], V[b, :, h],
                                                        u, idx, causal=causal)
            assert set(mine_top.tolist()) == set(top[b, h].tolist())
            np.testing.assert_allclose(mine_M * math.sqrt(Dd), M[b, h], rtol=0, atol=1e-12)
            want = ctx[b, :, h].copy()
            if causal:
                rest = np.setdiff1d(np.arange(L), mine_top)
                want[rest] /= (rest + 1)[:, None]
            np.testing.assert_allclose(out, want, rtol=0, atol=1e-12)


def test_informer_crashes_at_length_one_and_the_layer_does_not():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(1, 1, 1, 4))
    with pytest.raises(ValueError):  # ln 1 = 0: zero keys sampled, max over an empty axis
        ref.informer_prob_attention(q, q, q, 5, np.zeros((1, 0), np.int64))
    W = weights(rng)
    x = rng.normal(size=(1, 1, D)).astype(np.float32)
    want = ref.full_attention_ref(x, None, *W, H, E)  # one step attends to itself: v @ wo + bo
    for causal in (False, True):
        np.testing.assert_allclose(tf_psa(x, None, W, 5, causal), want, rtol=0, atol=MAX_ABS)


@pytest.mark.parametrize("L", [2, 9, 64])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_graph_equals_informer_on_the_grid_samples(L, causal):
    """The TF graph (no mask) equals Informer's forward pass when Informer's random indices
    are the layer's deterministic grid (causal: non-kept rows rescaled as above)."""
    rng = np.random.default_rng(L)
    factor = 2
    x = rng.normal(size=(2, L, D)).astype(np.float32)
    W = weights(rng)
    wq, bq, wk, bk, wv, bv, wo, bo = [w.astype(np.float64) for w in W]

    def proj(w, b):
        return (x.astype(np.float64) @ w + b).reshape(2, L, H, E)

    u = ref.sample_size(L, factor)
    idx = np.tile(ref.grid_samples(L, u), (L, 1))
    ctx, _, top = ref.informer_prob_attention(proj(wq, bq), proj(wk, bk), proj(wv, bv), factor, idx,
                                              mask_flag=causal)
    if causal:
        for b in range(2):
            for h in range(H):
                rest = np.setdiff1d(np.arange(L), top[b, h])
                ctx[b, rest, h] /= (rest + 1)[:, None]
    want = ctx.reshape(2, L, H * E) @ wo + bo
    np.testing.assert_allclose(tf_psa(x, None, W, factor, causal), want, rtol=0, atol=MAX_ABS)


# ---------------------------------------------------------------------------- padding

#: Appending padding, moving the valid steps or batching rows only changes the shapes the
#: float32 kernels sum over (blocking, order): outputs may move by float32 rounding, a few
#: ulps of the largest output. 8 ulps: 8 * 1.19e-7 * scale.
PAD_ULPS = 8


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_padding_invariance_right_left_holes_and_alone(causal):
    rng = np.random.default_rng(3)
    lengths = [1, 2, 5, 19, 30, 64, 150]
    W = weights(rng)
    factor = 2
    base_T = max(lengths)
    x = rng.normal(size=(len(lengths), base_T, D)).astype(np.float32)
    mask = lengths_mask(lengths, base_T)
    y0 = tf_psa(x, mask, W, factor, causal)
    assert np.all(y0[~mask] == 0.0), "padded steps must output exactly 0"
    diffs = {}
    for extra in (1, 7, 64, 3 * base_T):
        T = base_T + extra
        noise = rng.normal(size=(len(lengths), extra, D)).astype(np.float32)  # pads carry values
        mp = lengths_mask(lengths, T)
        yp = tf_psa(np.concatenate([x, noise], 1), mp, W, factor, causal)
        assert np.all(yp[~mp] == 0.0)
        diffs[f"right+{extra}"] = np.abs(yp[:, :base_T][mask] - y0[mask]).max()
        xl = rng.normal(size=(len(lengths), T, D)).astype(np.float32)
        for i, n in enumerate(lengths):
            xl[i, T - n:] = x[i, :n]
        yl = tf_psa(xl, lengths_mask(lengths, T, left=True), W, factor, causal)
        diffs[f"left+{extra}"] = max(np.abs(yl[i, T - n:] - y0[i, :n]).max() for i, n in enumerate(lengths))
    T = base_T * 2  # holes: pads scattered between the valid steps
    xh = rng.normal(size=(len(lengths), T, D)).astype(np.float32)
    mh = np.zeros((len(lengths), T), bool)
    for i, n in enumerate(lengths):
        pos = np.sort(rng.choice(T, n, replace=False))
        mh[i, pos] = True
        xh[i, pos] = x[i, :n]
    yh = tf_psa(xh, mh, W, factor, causal)
    diffs["holes"] = max(np.abs(yh[i][mh[i]] - y0[i, :n]).max() for i, n in enumerate(lengths))
    diffs["alone"] = max(np.abs(tf_psa(x[i:i + 1, :n], None, W, factor, causal)[0] - y0[i, :n]).max()
                         for i, n in enumerate(lengths))
    bound = PAD_ULPS * F32_EPS * max(1.0, float(np.abs(y0).max()))
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= bound, f"{worst}: {diffs[worst]:.3g} > {bound:.3g} ({diffs})"
    # the check can fail: a layer that sized itself from T instead of n would differ here
    y_t = tf_psa(np.concatenate([x, rng.normal(size=(len(lengths), 64, D)).astype(np.float32)], 1),
                 None, W, factor, causal)
    assert np.abs(y_t[:, :base_T][mask] - y0[mask]).max() > 1e-2


def test_all_padding_rows_are_zero_and_finite_in_float32_and_float16():
    rng = np.random.default_rng(4)
    W = weights(rng)
    x = rng.normal(size=(3, 6, D)).astype(np.float32)
    mask = lengths_mask([0, 1, 6], 6)
    # large scores (hundreds; thousands in float32), which a mask constant of -1e4 or a
    # 0 * inf would turn into NaN; float16 scores stay below its 65504 maximum
    for dtype, scale in ((tf.float32, 100.0), (tf.float16, 10.0)):
        for causal in (False, True):
            y = tf_psa(x * scale, mask, W, 5, causal, dtype=dtype)
            assert np.isfinite(y).all(), f"{dtype.name} causal={causal}: NaN/inf"
            assert np.all(y[0] == 0) and np.all(y[1, 1:] == 0), f"{dtype.name}: pads not exactly 0"
    # T = 1: one padding row and one real row (k_max = 1)
    y1 = tf_psa(x[:2, :1], np.array([[False], [True]]), W, 5)
    assert np.isfinite(y1).all() and np.all(y1[0] == 0)


def test_ties_keep_the_lower_position_like_the_reference():
    """20 steps made of 10 distinct ones, each twice (positions i and i + 10): M ties in
    pairs, and u = ceil(ln 20) = 3 queries are kept, so the cut splits a tied pair. TopK
    keeps the earlier step of it, as the reference's stable argsort does (and padding on
    the left, which shifts every position, keeps the same one)."""
    rng = np.random.default_rng(5)
    W = weights(rng)
    n = 20
    x = rng.normal(size=(1, n, D)).astype(np.float32)
    x[0, 10:] = x[0, :10]
    y, det = tf_psa(x, None, W, 1, details=True)
    yr, info = ref.prob_sparse_attention_ref(x, None, *W, H, E, factor=1)
    assert info[0]["u"] == 3
    np.testing.assert_allclose(y, yr, rtol=0, atol=MAX_ABS)
    for h in range(H):
        kept = det["top_index"][0, h][:3].tolist()
        assert sorted(kept) == sorted(info[0]["top"][h].tolist()), f"head {h}"
        single = [i for i in kept if (i + 10) % 20 not in kept]
        assert len(single) == 1 and single[0] < 10, f"head {h}: kept {kept}, the later twin won a tie"
    T = 45
    xl = np.concatenate([rng.normal(size=(1, T - n, D)).astype(np.float32), x], 1)
    yl = tf_psa(xl, lengths_mask([n], T, left=True), W, 1)
    np.testing.assert_allclose(yl[0, T - n:], y[0], rtol=0, atol=PAD_ULPS * F32_EPS * max(1.0, np.abs(y).max()))


# --------------------------------------------------------------- TF == NumPy reference

@pytest.mark.parametrize("seed", range(6))
def test_graph_equals_numpy_reference_on_random_masks(seed):
    rng = np.random.default_rng(100 + seed)
    B, T = 6, int(rng.integers(1, 120))
    factor = int(rng.integers(1, 6))
    causal = bool(seed % 2)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    mask = rng.random((B, T)) < rng.uniform(0.2, 1.0, size=(B, 1))
    mask[0] = True
    mask[1] = False
    W = weights(rng)
    y, det = tf_psa(x, mask, W, factor, causal, details=True)
    yr, info = ref.prob_sparse_attention_ref(x, mask, *W, H, E, factor=factor, causal=causal)
    np.testing.assert_allclose(y, yr, rtol=0, atol=MAX_ABS, err_msg=f"T={T} factor={factor} causal={causal}")
    for b in range(B):
        assert det["u"][b] == info[b]["u"]
        for h in range(H if info[b]["n"] else 0):
            kept = det["top_index"][b, h][: info[b]["u"]].tolist()
            assert sorted(kept) == sorted(info[b]["top"][h].tolist()), f"row {b} head {h}"


# --------------------------------------------------------------------- graph contents

def test_graph_avoids_the_ops_int8_kernels_get_wrong():
    """No float SOFTMAX (LiteRT's reference int8 kernel aborts past an exponent sum of
    512), DIV (int8 saturates on small numerators) or SUM (the reference int8 SUM over time
    is wrong); integer sums (sizes) are exact and allowed. No ``x[..., None]`` StridedSlice
    (a Select op in LiteRT)."""
    for causal in (False, True):
        specs = [tf.TensorSpec([None, None, D], tf.float32), tf.TensorSpec([None, None], tf.bool)]
        specs += [tf.TensorSpec(w.shape, tf.float32) for w in weights(np.random.default_rng(0))]
        fn = tf.function(lambda x, m, *w: prob_sparse_attention(x, m, *w, H, E, 5, causal=causal))
        graph = fn.get_concrete_function(*specs).graph
        float_ops = {op.type for op in graph.get_operations()
                     if op.outputs and op.outputs[0].dtype.is_floating}
        assert not float_ops & {"Softmax", "RealDiv", "Div", "Sum", "Mean"}, sorted(float_ops)
        assert {"BatchMatMulV2", "Exp", "Log", "TopKV2"} <= {op.type for op in graph.get_operations()}
        new_axis = [op.name for op in graph.get_operations()
                    if op.type == "StridedSlice" and op.get_attr("new_axis_mask")]
        assert new_axis == []


# ------------------------------------------------------------------ Keras layer, both

@pytest.mark.parametrize("flavour", ["2", "3"], ids=["tf_keras", "keras3"])
def test_layer_in_both_kerases(flavour, tmp_path):
    from probattn.models.keras_compat import get_keras
    from probattn.models.layers import layer_classes

    keras = get_keras(flavour)
    psa = layer_classes(flavour).ProbSparseAttention
    assert keras.saving.get_registered_name(psa) == "probattn>ProbSparseAttention"
    inp = keras.Input(shape=(None,), dtype="int32")
    emb = keras.layers.Embedding(50, D, mask_zero=True)(inp)
    layer = psa(H, E, factor=2, name="psa")
    model = keras.Model(inp, layer(emb))
    rng = np.random.default_rng(6)
    ids = rng.integers(1, 50, size=(4, 33)).astype(np.int32)
    ids[1, 9:] = 0
    ids[2, :] = 0
    ids[3, :30] = 0  # left padding
    y = np.asarray(model(ids))
    assert np.array_equal(np.asarray(layer.compute_mask(None, tf.constant(ids != 0))), ids != 0)
    table = np.asarray(model.layers[1].get_weights()[0])
    W = [np.asarray(w) for w in layer.get_weights()]
    assert len(W) == 8 and not np.array_equal(W[0], W[2]), "Q and K kernels must differ"
    yr, _ = ref.prob_sparse_attention_ref(table[ids], ids != 0, *W, H, E, factor=2)
    np.testing.assert_allclose(y, yr, rtol=0, atol=MAX_ABS, err_msg=f"flavour {flavour}")
    cfg = layer.get_config()
    assert (cfg["num_heads"], cfg["key_dim"], cfg["factor"], cfg["causal"]) == (H, E, 2, False)
    assert psa.from_config(cfg).get_config() == cfg
    path = tmp_path / "m.keras"
    model.save(path)
    again = keras.models.load_model(path)
    np.testing.assert_array_equal(np.asarray(again(ids)), y)


@pytest.mark.parametrize("flavour", ["2", "3"], ids=["tf_keras", "keras3"])
def test_classifier_keeps_the_mask_and_is_padding_invariant(flavour):
    """The mask reaches the pooling through the encoder (residuals, LayerNorm, FFN) in
    both Kerases: padding appended on the right or put on the left moves nothing."""
    from probattn.export.parity.tolerances import FP32_PAD_INVARIANCE

    model = _tiny(flavour)
    rng = np.random.default_rng(9)
    ids = rng.integers(1, 60, (4, 20)).astype(np.int32)
    ids[1, 7:] = 0
    ids[2, 15:] = 0
    right = np.pad(ids, ((0, 0), (0, 30)))
    left = np.zeros((4, 50), np.int32)
    for i in range(4):
        real = ids[i][ids[i] != 0]
        left[i, 50 - len(real):] = real
    base = np.asarray(model(ids))
    for name, padded in (("right", right), ("left", left)):
        np.testing.assert_allclose(np.asarray(model(padded)), base, rtol=0, atol=FP32_PAD_INVARIANCE,
                                   err_msg=f"{name} padding, flavour {flavour}")
    # the check can fail: the same ids without their zeros as padding (id 1 instead) differ
    assert np.abs(np.asarray(model(np.where(right == 0, 1, right))) - base).max() > 1e-3


@pytest.mark.parametrize("kwargs", [dict(num_heads=0, key_dim=4), dict(num_heads=2, key_dim=4, factor=0),
                                    dict(num_heads=2, key_dim=2.5), dict(num_heads=2, key_dim=4, output_dim=-1)])
def test_layer_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="ProbSparseAttention"):
        ProbSparseAttention(**kwargs)


def test_layer_rejects_bad_input_rank():
    with pytest.raises(ValueError, match=r"\(batch, time, features\)"):
        ProbSparseAttention(2, 4).build((None, 8))


# ------------------------------------------------------------------------ conversion

def _serving(model):
    class Serving(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            # a tf.Module does not track a Keras 3 model's variables: without this they are
            # not saved and the converter keeps uninitialised READ_VARIABLE ops
            self.tracked = [v if isinstance(v, tf.Variable) else v.value for v in model.variables]

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="token_ids")])
        def serve(self, token_ids):
            return {"probabilities": self.model(token_ids, training=False)}

    return Serving()


def _tiny(flavour="2", causal=False, seed=0):
    from probattn.models.keras_compat import get_keras

    get_keras(flavour).utils.set_random_seed(seed)
    model = build_probsparse_classifier(60, 3, embedding_dim=16, hidden_units=16, flavour=flavour,
                                        num_heads=2, factor=2)
    if causal:  # the same classifier with a causal attention layer
        from probattn.models.layers import layer_classes

        keras = get_keras(flavour)
        inp = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        x = keras.layers.Embedding(60, 16, mask_zero=True)(inp)
        x = layer_classes(flavour).ProbSparseAttention(2, 8, factor=2, causal=True)(x)
        x = layer_classes(flavour).ProbAttention()(x)
        model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(x))
    return model


def _convert(model, tmp_path, int8_calibration=None):
    mod = _serving(model)
    sm = str(tmp_path / "sm")
    tf.saved_model.save(mod, sm, signatures={"serving_default": mod.serve.get_concrete_function()})
    conv = tf.lite.TFLiteConverter.from_saved_model(sm)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if int8_calibration is not None:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.representative_dataset = lambda: ({"token_ids": c} for c in int8_calibration)
    return mod, conv.convert()


@pytest.mark.parametrize("flavour,causal", [("2", False), ("3", False), ("2", True)],
                         ids=["tf_keras", "keras3", "tf_keras-causal"])
def test_converts_with_litert_builtins_only_and_to_onnx(flavour, causal, tmp_path):
    import onnxruntime as ort
    import tf2onnx
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    model = _tiny(flavour, causal)
    mod, blob = _convert(model, tmp_path)  # TFLITE_BUILTINS only: raises on a Select TF op
    onnx_model, _ = tf2onnx.convert.from_function(
        mod.serve, input_signature=(tf.TensorSpec([None, None], tf.int32, name="token_ids"),), opset=17)
    sessions = {level: ort.InferenceSession(onnx_model.SerializeToString(), sess_options=_ort_options(level),
                                            providers=["CPUExecutionProvider"])
                for level in ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL")}
    rng = np.random.default_rng(7)
    for shape in [(1, 1), (3, 17), (2, 300)]:
        ids = rng.integers(1, 60, size=shape).astype(np.int32)
        ids[-1, shape[1] // 2:] = 0
        want = np.asarray(model(ids))
        for resolver in (OpResolverType.AUTO, OpResolverType.BUILTIN_REF):
            it = Interpreter(model_content=blob, experimental_op_resolver_type=resolver)
            assert not {d["op_name"] for d in it._get_ops_details()} & {"READ_VARIABLE", "VAR_HANDLE"}
            got = it.get_signature_runner()(token_ids=ids)["probabilities"]
            np.testing.assert_allclose(got, want, rtol=0, atol=MAX_ABS, err_msg=f"LiteRT {resolver} {shape}")
        for level, sess in sessions.items():
            got = sess.run(None, {"token_ids": ids})[0]
            np.testing.assert_allclose(got, want, rtol=0, atol=MAX_ABS, err_msg=f"onnxruntime {level} {shape}")


def _ort_options(level):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return so


def _softmax_attention(scores, valid, key_mask, v):
    """The textbook recipe (pads at -20 below the best score, SOFTMAX, times the mask),
    for the negative control below."""
    m = tf.cast(valid, scores.dtype)
    best = tf.reduce_max(tf.where(valid, scores, tf.reduce_min(scores, -1, keepdims=True)), -1, keepdims=True)
    w = tf.nn.softmax((scores - best) * m + (m - 1.0) * 20.0, axis=-1) * m
    return tf.matmul(w, v), w


_RUN_1024 = textwrap.dedent("""
    import sys
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    ids = np.full((1, 1024), 7, np.int32)  # one token 1,024 times: uniform attention over 1,024 keys
    resolver = getattr(OpResolverType, sys.argv[2])
    out = Interpreter(model_path=sys.argv[1], experimental_op_resolver_type=resolver
                      ).get_signature_runner()(token_ids=ids)["probabilities"]
    assert np.isfinite(out).all(), out
    print("ok")
""")


@pytest.mark.parametrize("recipe", ["exp-log", "softmax"], ids=["layer", "softmax-control"])
def test_full_int8_runs_long_rows_on_both_kernel_families(recipe, tmp_path, monkeypatch):
    """Full int8 with the layer's exp/log/matmul normalisation: no SOFTMAX over time, no
    DIV and no int8 SUM in the file, and a 1,024-token row (an exponent sum of 1,024,
    above the 512 at which LiteRT's reference int8 SOFTMAX kernel aborts the process) runs
    on both kernel families, each in a child process so an abort fails this test instead of
    killing the session. The control (the same model with a SOFTMAX over time) shows the
    check can fail: it aborts on the reference kernels."""
    import probattn.models.probsparse as module

    if recipe == "softmax":
        monkeypatch.setattr(module, "masked_attention", _softmax_attention)
    model = _tiny("2")
    rng = np.random.default_rng(8)
    calibration = [rng.integers(1, 60, size=(2, n)).astype(np.int32) for n in (1, 2, 5, 16, 64, 256)]
    _, blob = _convert(model, tmp_path, calibration)
    path = tmp_path / "int8.tflite"
    path.write_bytes(blob)
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    tensors = {d["index"]: d for d in it.get_tensor_details()}
    softmax_widths = []
    for op in it._get_ops_details():
        inputs = [tensors[i] for i in op["inputs"] if i >= 0]
        where = f"{op['op_name']} on {[(t['name'], t['dtype'].__name__) for t in inputs]}"
        assert op["op_name"] != "DIV", where
        if op["op_name"] == "SUM":  # sizes: exact int32 sums
            assert all(t["dtype"] == np.int32 for t in inputs), where
        if op["op_name"] == "SOFTMAX":
            softmax_widths.append(int(inputs[0]["shape_signature"][-1]))
    if recipe == "softmax":
        assert -1 in softmax_widths  # a SOFTMAX over the (dynamic) time axis
    else:
        assert softmax_widths == [3], softmax_widths  # only the classifier's, over its 3 classes
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    for resolver in ("BUILTIN_REF",) if recipe == "softmax" else ("AUTO", "BUILTIN_REF"):
        proc = subprocess.run([sys.executable, "-c", _RUN_1024, str(path), resolver], capture_output=True,
                              text=True, timeout=300, env=env)
        if recipe == "softmax":
            assert proc.returncode != 0, "the reference int8 SOFTMAX ran an exponent sum of 1,024"
        else:
            assert proc.returncode == 0 and proc.stdout.strip() == "ok", (resolver, proc.returncode,
                                                                          proc.stderr[-2000:])


# ------------------------------------------------------------ the model, end to end

@pytest.fixture(scope="module")
def probsparse_bundle(tmp_path_factory):
    """A small real run of ``--model probsparse`` (800 Rotten Tomatoes texts, 1 epoch, 32
    tokens), exported in fp32 (values are judged to 1e-5; a one-epoch model's quantized
    decisions are near-ties, and the full matrix on the real run is in the README) and
    verified on every installed runtime."""
    from probattn.export.exporter import ExportOptions, export
    from probattn.export.parity import verify
    from probattn.models.train import TrainConfig, train

    base = tmp_path_factory.mktemp("probsparse")
    metrics = train(TrainConfig(model="probsparse", limit=800, epochs=1, embedding_dim=16, hidden_units=16,
                                max_length=32), base / "run", verbose=0)
    export(base / "run", base / "bundle", ExportOptions(precisions=("fp32",)))
    report = verify(base / "bundle", report_dir=base / "report", quiet=True)
    return metrics, report


def test_probsparse_model_passes_verify_on_every_runtime(probsparse_bundle):
    metrics, report = probsparse_bundle
    assert metrics["model"] == "probsparse"
    assert report.passed, "\n".join(c.message() for c in report.failures[:20])
    runners = {(r["artifact"], r["runtime"]) for r in report.rows}
    want = {"litert-xnnpack", "litert-reference", "onnxruntime-all", "onnxruntime-none"}
    assert want <= {rt for _, rt in runners}, sorted(runners)
    for artifact, runtime in runners:
        mine = [c for c in report.checks if (c.artifact, c.runtime) == (artifact, runtime)]
        metrics_seen = {c.metric for c in mine}
        assert "pad_invariance" in metrics_seen, f"{artifact} on {runtime}: padding invariance not checked"
        if runtime != "keras":  # the reference is what the all-padding row is compared with
            assert any(c.metric == "all_pad_abs" and c.case == "all_padding_row" for c in mine), (artifact, runtime)
        assert all(c.passed for c in mine)
    # TFLite Micro has no TOPK_V2 kernel: the fixed-shape files convert (LiteRT runs them,
    # judged above) and are measured unrunnable on TFLite Micro, with the reason, at export
    fixed = {r["artifact"] for r in report.rows if r["artifact"].startswith("model_fixed_")}
    assert fixed, sorted(runners)
    refused = {n["artifact"]: n["reason"] for n in report.meta["not_applicable"] if n["runtime"] == "tflm"}
    for artifact in fixed:
        assert "TOPK_V2" in refused.get(artifact, ""), (artifact, refused)


def test_train_refuses_an_unknown_model(tmp_path):
    from helpers import assert_one_error_line, run_cli

    proc = run_cli("train", "--model", "informer", "--out", tmp_path / "run")
    line = assert_one_error_line(proc, "train")
    from probattn.models.zoo import ARCHITECTURES

    assert "'informer'" in line and ", ".join(ARCHITECTURES) in line and "probsparse" in ARCHITECTURES
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------- bench --attention-scaling

@pytest.mark.parametrize("argv,needle", [
    (["--attention-scaling"], "needs --out"),
    (["BUNDLE", "--attention-scaling", "--out", "OUT"], "takes no BUNDLE"),
    (["--attention-scaling", "--out", "OUT", "--lengths", "64,0"], "--lengths"),
    (["--attention-scaling", "--out", "OUT", "--runtimes", "openvino"], "runs litert, onnxruntime"),
    (["--attention-scaling", "--out", "OUT", "--threads", "0"], "--threads"),
    (["--out", "OUT"], "needs a BUNDLE"),
], ids=["no-out", "with-bundle", "bad-length", "other-runtime", "zero-threads", "no-bundle"])
def test_attention_scaling_bad_input(argv, needle, tmp_path):
    from helpers import assert_one_error_line, run_cli

    argv = [str(tmp_path / "OUT") if a == "OUT" else str(tmp_path / "bundle") if a == "BUNDLE" else a for a in argv]
    line = assert_one_error_line(run_cli("bench", *argv), "bench", stdout_empty=True)
    assert needle in line
    assert list(tmp_path.iterdir()) == [], "a refused command wrote files"


def test_attention_scaling_writes_table_json_and_plot(tmp_path):
    """The benchmark runs end to end (a measurement: nothing is asserted about time)."""
    import json

    from helpers import run_cli

    out = tmp_path / "scaling"
    proc = run_cli("bench", "--attention-scaling", "--out", out, "--quick", "--lengths", "8,32", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "attention_scaling.json").read_text())
    rows = doc["runs"][0]["rows"]
    got = {(r["runtime"], r["graph"], r["length"]) for r in rows}
    assert got == {(rt, g, n) for rt in ("litert-xnnpack", "onnxruntime-all")
                   for g in ("probsparse", "dense", "dense_softmax") for n in (8, 32)}
    assert all(r["median_us"] > 0 and r["reps"] >= 3 for r in rows)
    table = (out / "attention_scaling.md").read_text()
    assert "| 32 | onnxruntime-all |" in table and table in proc.stdout
    assert (out / "attention_scaling.png").stat().st_size > 10_000
    assert {p.name for p in (out / "models").iterdir()} == {f"{g}.{f}" for g in ("probsparse", "dense", "dense_softmax")
                                                           for f in ("tflite", "onnx")}

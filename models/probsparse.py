"""Informer's ProbSparse self-attention, deterministic, padding-aware and exportable.

Algorithm (Zhou et al., AAAI 2021; ``ProbAttention`` in Informer2020 ``models/attn.py``),
for each row ``b`` with ``n_b`` valid (non-padded) steps and each head:

1. ``u_b = min(n_b, max(1, factor * ceil(ln n_b)))`` (0 for an all-padding row): the number
   of sampled keys and of kept queries (self-attention: L_Q = L_K = n_b). ``max(1, ...)``
   defines L = 1, where ``ln 1 = 0`` would give Informer a zero sample and a crash.
2. Sampled keys: ``u_b`` keys at the *valid ranks* ``floor((2k + 1) n_b / (2 u_b))``,
   ``k = 0..u_b-1``: evenly spread over the valid steps, the same for every query, and
   the same whatever padding surrounds them (Informer draws them with ``torch.randint`` on
   every call). With ``u_b = n_b`` every key is sampled.
3. Sparsity measure ``M_i = max_k(q_i . k_s) - sum_k(q_i . k_s) / n_b`` over the sampled
   keys (q scaled by ``1/sqrt(key_dim)``: the same ranking as Informer's unscaled M).
4. The ``u_b`` valid queries with the largest M (ties: the lower position first) attend to
   every valid key (masked softmax; with ``causal`` only to valid keys at or before their
   own position). Every other valid query gets the masked mean of V (``causal``: the mean
   of the valid V at or before its position). Padded steps output exactly 0.

Graph choices, each for a measured runtime reason:

* Sizes come from the dynamic length inside the graph, in int32 (exact in every runtime
  and precision): ``ceil(ln n)`` counts the integer thresholds ``n > floor(e^k)``
  (``CEIL_LN_THRESHOLDS``); a float ``ceil(log(n))`` is off by one in float16 (n = 1097).
* TopK runs with one batch-wide ``k_max = min(T, max(1, factor * ceil(ln T)))`` (a scalar,
  never above T: TopK with K > T is invalid in ONNX) and the slots at or beyond each row's
  own ``u_b`` are switched off. TopK sorts and breaks ties by the lower index, so slot j
  holds the query of rank j whatever the padding: appending padding selects the same
  queries. Padded queries rank below every valid one.
* No gather or scatter: selections are one-hot matrices used in batched matmuls
  (``Sel @ Q`` picks the kept queries, ``Sel^T @ ctx`` puts their results back), so the
  graph is BATCH_MATMUL / FULLY_CONNECTED, O(T log T) in memory.
* Softmax and means without SOFTMAX, DIV or SUM over time, the recipe of
  ``probattn.models.layers.prob_attention_pool`` and for the same int8 reasons: LiteRT's
  reference int8 SOFTMAX aborts the process once its exponent sum reaches 512 (a 512-key
  row with near-uniform scores), int8 DIV saturates on small numerators, the reference
  int8 SUM over time is wrong. Scores are centred on the best valid score (picked with a
  select, so it is exactly 0) and multiplied by the mask, ``e = exp(c) * mask`` (pads exactly
  0, no mask constant to stretch an int8 range or overflow float16), the mass
  ``s = e @ mask`` is a batched matmul, and the weights are ``exp(c - log s) * mask``.
  The mean of V is attention with equal scores, with the pooling layer's two gated
  normalisations (its weights are all 1/n: a single [0, 1] int8 grid is too coarse for
  long rows; see ``masked_mean``).
* An all-padding row has ``s = n = 0``, clamped to 1 before the log: its weights are 0 and
  its output is 0, finite in every precision.
* Causal (``causal=True``): the causal test compares int32 positions (exact in every
  precision); the cumulative mean is CUMSUM (a LiteRT builtin and an ONNX op). LiteRT has
  no int8 CUMSUM (nor int8 TOPK_V2): in a full-int8 file the converter runs both in
  float32 between a DEQUANTIZE and a QUANTIZE.
"""
from __future__ import annotations

import math

from .keras_compat import check_flavour, get_keras
from .layers import GATE, GATE_MARGIN, centre_scores
from .quiet import import_tensorflow

tf = import_tensorflow()  # quietly: TensorFlow's native start-up lines stay off stderr

#: Informer's default sampling factor (``c`` in ``c * ln L``).
DEFAULT_FACTOR = 5
#: ``ceil(ln n) = #{k >= 0 : n > floor(e^k)}`` for integers ``n >= 1`` (``e^k`` is
#: irrational for k >= 1, so ``e^k < n`` iff ``floor(e^k) < n``; ``e^0 = 1``). 22
#: thresholds cover every int32 ``n`` (``e^21 > 2^31``).
CEIL_LN_THRESHOLDS = (1,) + tuple(int(math.floor(math.exp(k))) for k in range(1, 22))


def ceil_ln(n):
    """Exact ``ceil(ln n)`` of an int32 tensor (0 for ``n <= 1``), in integer ops."""
    t = tf.constant(CEIL_LN_THRESHOLDS, tf.int32)
    return tf.reduce_sum(tf.cast(tf.greater(tf.expand_dims(n, -1), t), tf.int32), axis=-1)


def sample_size(n, factor: int):
    """``min(n, max(1, factor * ceil(ln n)))`` of an int32 tensor (``n = 0`` gives 0)."""
    return tf.minimum(n, tf.maximum(1, factor * ceil_ln(n)))


def _project(x, w, b, heads, dim):
    """``(B, T, D) @ (D, H*E) + b`` -> ``(B, H, T, E)`` (a FULLY_CONNECTED)."""
    bsz, t = tf.shape(x)[0], tf.shape(x)[1]
    y = tf.matmul(tf.reshape(x, [-1, w.shape[0]]), w) + b
    return tf.transpose(tf.reshape(y, [bsz, t, heads, dim]), [0, 2, 1, 3])


def _merge(out, wo, bo, heads, dim):
    """``(B, H, T, E)`` -> ``(B, T, H*E) @ wo + bo`` -> ``(B, T, D_out)``."""
    bsz, t = tf.shape(out)[0], tf.shape(out)[2]
    y = tf.matmul(tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [-1, heads * dim]), wo) + bo
    return tf.reshape(y, [bsz, t, wo.shape[1]])


def _reciprocal(count):
    """``1 / max(count, 1)`` as ``exp(-log(.))``: no DIV (int8 DIV saturates on small
    numerators); 1 where the count is 0 (the weights it scales are 0 there)."""
    return tf.exp(-tf.math.log(tf.maximum(count, tf.constant(1.0, count.dtype))))


def _row_mass(e, key_mask):
    """``sum_t e[..., t]`` of ``e (B, H, Q, T)`` whose non-zero entries lie on ``key_mask
    (B, 1, 1, T)``, as ``(B, H, Q, 1)``: a batched matmul, not SUM."""
    return tf.matmul(e, tf.transpose(key_mask, [0, 1, 3, 2]))


def masked_attention(scores, valid, key_mask, v):
    """``softmax(scores) @ v`` over the keys where ``valid`` (bool, broadcastable to
    ``scores (B, H, Q, T)``) holds: other keys get exactly 0 weight; a row with no valid key
    gives 0. ``key_mask``: ``(B, 1, 1, T)`` float, 1 on every key ``valid`` may hold on (the
    padding mask), to sum with a matmul. Returns ``(context (B, H, Q, E), weights)``.

    ``exp(c - log s) * mask`` with ``c`` the scores centred on the best valid one and ``s``
    the row's mass ``exp(c) @ key_mask`` (no SOFTMAX, DIV or SUM: see the module
    docstring). The kept queries are the ones whose attention is most peaked (largest
    max - mean), so their weights use one [0, 1] grid (two gated grids as in
    ``masked_mean`` measured no better in full int8 and double the attention matmuls)."""
    m, c, e = centre_scores(scores, valid)  # c: valid <= 0, the best exactly 0; e: others exactly 0
    return _normalised_context(c, e, m, key_mask, v, gated=False)


def masked_mean(key_mask, v):
    """The mean of ``v (B, H, T, E)`` over the keys of ``key_mask (B, 1, 1, T)`` (float
    0/1), as ``(B, H, 1, E)``: attention with equal scores (0 on a row with no key).

    Its weights are all ``1/n``, so one [0, 1] int8 grid would give a 100-key row 2.55
    steps (a 20% error on every mean); two normalisations gated by the mass as in
    ProbAttention pooling (``probattn.models.layers``): rows of fewer than ``GATE`` keys
    use weights in [0, 1], longer rows weights in [0, 1/GATE], a GATE-times finer grid. In
    float both are exactly ``1/n``."""
    return _normalised_context(None, key_mask, key_mask, key_mask, v, gated=True)


def _normalised_context(c, e, m, key_mask, v, gated):
    """``(e / sum(e)) @ v`` with ``e = exp(c) * m`` (``c`` None: 0), as ``exp(c - log s)``."""
    dtype = e.dtype
    one = tf.constant(1.0, dtype)

    def weights(mass, mask):  # exp(c - log mass) * mask
        shift = -tf.math.log(mass)
        return tf.exp(shift if c is None else c + shift) * mask

    s = _row_mass(e, key_mask)  # >= 1 on rows with a valid key, 0 on the others
    if not gated:
        w = weights(tf.maximum(s, one), m)
        return tf.matmul(w, v), w
    gate = tf.constant(GATE, dtype)
    g = tf.clip_by_value(s - gate, 0.0, 1.0)  # 0: coarse path, 1: fine path
    keep = one - tf.clip_by_value(s - (gate + tf.constant(GATE_MARGIN, dtype)), 0.0, 1.0)
    s_coarse = tf.maximum(_row_mass(e * keep, key_mask), one)  # s where used, 1 past the cut
    w_coarse = weights(s_coarse, m * keep)  # in [0, 1]
    w_fine = weights(tf.maximum(s, gate), m)  # in [0, 1/GATE]
    ctx = g * tf.matmul(w_fine, v) + (one - g) * tf.matmul(w_coarse, v)
    return ctx, g * w_fine + (one - g) * w_coarse


def _masks(x, mask):
    bsz, t = tf.shape(x)[0], tf.shape(x)[1]
    if mask is None:
        mask = tf.ones([bsz, t], tf.bool)
    mask = tf.cast(mask, tf.bool)
    return mask, tf.cast(mask, tf.int32), tf.cast(mask, x.dtype)


def _causal_mean(v, m_f):
    """Mean of the valid ``v`` at or before each position: ``(B, H, T, E)``."""
    mt = tf.reshape(m_f, [tf.shape(m_f)[0], 1, -1, 1])  # (B, 1, T, 1)
    total = tf.cumsum(v * mt, axis=2)
    count = tf.cumsum(mt, axis=2)
    return total * _reciprocal(count)


def prob_sparse_attention(x, mask, wq, bq, wk, bk, wv, bv, wo, bo, num_heads: int, key_dim: int,
                          factor: int = DEFAULT_FACTOR, causal: bool = False,
                          return_details: bool = False):
    """ProbSparse multi-head self-attention (see the module docstring).

    Args:
      x: ``(B, T, D)`` float; mask: ``(B, T)`` bool/0-1 (true on real steps) or None.
      wq, wk, wv: ``(D, H*E)``; bq, bk, bv: ``(H*E,)``; wo: ``(H*E, D_out)``; bo: ``(D_out,)``.
    Returns:
      ``(B, T, D_out)``, exactly 0 on padded steps; with ``return_details`` also a dict:
      ``n`` valid steps and ``u`` kept queries per row, ``k_max``, ``top_index`` (B, H, K)
      the TopK slots, ``slot_ok`` (B, K) which slots count, ``M`` (B, H, T) the ranking key.
    """
    dtype = x.dtype
    h, e = num_heads, key_dim
    bsz, t = tf.shape(x)[0], tf.shape(x)[1]
    m_b, m_i, m_f = _masks(x, mask)
    n = tf.reduce_sum(m_i, axis=1)  # (B,) int32
    u = sample_size(n, factor)  # (B,) sampled keys == kept queries
    k_max = sample_size(t, factor)  # scalar, 1 <= k_max <= T for T >= 1
    inv_n = _reciprocal(tf.cast(n, dtype))  # (B,)

    q = _project(x, wq, bq, h, e) * tf.constant(1.0 / math.sqrt(e), dtype)
    k = _project(x, wk, bk, h, e)
    v = _project(x, wv, bv, h, e)

    # deterministic key sample, in valid-rank coordinates (padding-independent)
    slots = tf.range(k_max)  # (K,)
    rank = tf.cumsum(m_i, axis=1) - 1  # (B, T)
    num = tf.expand_dims(2 * slots + 1, 0) * tf.expand_dims(n, 1)  # (B, K)
    s = tf.math.floordiv(num, tf.expand_dims(2 * tf.maximum(u, 1), 1))  # (B, K) sampled ranks
    slot_ok = tf.less(tf.expand_dims(slots, 0), tf.expand_dims(u, 1))  # (B, K)
    pick = tf.logical_and(tf.equal(tf.expand_dims(rank, 1), tf.expand_dims(s, 2)),
                          tf.expand_dims(m_b, 1))
    samp = tf.cast(tf.logical_and(pick, tf.expand_dims(slot_ok, 2)), dtype)  # (B, K, T) one-hot rows
    k_flat = tf.reshape(tf.transpose(k, [0, 2, 1, 3]), [bsz, t, h * e])
    k_samp = tf.transpose(tf.reshape(tf.matmul(samp, k_flat), [bsz, k_max, h, e]), [0, 2, 1, 3])
    qk = tf.matmul(q, k_samp, transpose_b=True)  # (B, H, T, K); switched-off slots are 0
    sv_b = tf.reshape(slot_ok, [bsz, 1, 1, k_max])
    q_max = tf.reduce_max(tf.where(sv_b, qk, qk[:, :, :, 0:1]), axis=-1)  # slot 0 always counts
    q_sum = tf.squeeze(tf.matmul(qk, tf.reshape(tf.cast(slot_ok, dtype), [bsz, 1, k_max, 1])), -1)
    big_m = q_max - q_sum * tf.reshape(inv_n, [bsz, 1, 1])  # (B, H, T)

    # kept queries: padded ones rank below every valid one
    mq_b = tf.expand_dims(m_b, 1)  # (B, 1, T)
    hi = tf.reduce_max(big_m, axis=-1, keepdims=True)
    lo_valid = tf.reduce_min(tf.where(mq_b, big_m, hi), axis=-1, keepdims=True)
    m_key = tf.where(mq_b, big_m, lo_valid - tf.constant(1.0, dtype))
    _, idx = tf.math.top_k(m_key, k=k_max, sorted=True)  # (B, H, K): rank j in slot j
    top_ok = tf.reshape(slot_ok, [bsz, 1, k_max, 1])
    positions = tf.reshape(tf.range(t), [1, 1, 1, t])
    sel = tf.cast(tf.logical_and(tf.equal(tf.expand_dims(idx, -1), positions), top_ok), dtype)  # (B, H, K, T)

    # kept queries attend (masked softmax over the valid keys, causal: at or before them)
    keys_ok = tf.reshape(m_b, [bsz, 1, 1, t])
    if causal:
        keys_ok = tf.logical_and(keys_ok, tf.less_equal(positions, tf.expand_dims(idx, -1)))
    q_top = tf.matmul(sel, q)  # (B, H, K, E)
    key_mask = tf.reshape(m_f, [bsz, 1, 1, t])
    ctx_top, _ = masked_attention(tf.matmul(q_top, k, transpose_b=True), keys_ok, key_mask, v)  # (B, H, K, E)
    out_sel = tf.matmul(sel, ctx_top, transpose_a=True)  # (B, H, T, E), 0 where not kept
    kept = tf.expand_dims(tf.reduce_max(sel, axis=2), -1)  # (B, H, T, 1)

    # every other valid query: the masked mean of V (causal: cumulative)
    if causal:
        rest = _causal_mean(v, m_f)
    else:
        rest, _ = masked_mean(key_mask, v)  # (B, H, 1, E)
    out = (out_sel + (tf.constant(1.0, dtype) - kept) * rest) * tf.reshape(m_f, [bsz, 1, t, 1])
    y = _merge(out, wo, bo, h, e) * tf.expand_dims(m_f, -1)
    if return_details:
        return y, {"n": n, "u": u, "k_max": k_max, "top_index": idx, "slot_ok": slot_ok, "M": m_key}
    return y


def full_attention(x, mask, wq, bq, wk, bk, wv, bv, wo, bo, num_heads: int, key_dim: int,
                   causal: bool = False):
    """Dense masked multi-head self-attention with the same weights, masking and numerics
    (every query attends): what ``prob_sparse_attention`` equals when every query is kept."""
    h, e = num_heads, key_dim
    bsz, t = tf.shape(x)[0], tf.shape(x)[1]
    m_b, _, m_f = _masks(x, mask)
    q = _project(x, wq, bq, h, e) * tf.constant(1.0 / math.sqrt(e), x.dtype)
    k = _project(x, wk, bk, h, e)
    v = _project(x, wv, bv, h, e)
    keys_ok = tf.reshape(m_b, [bsz, 1, 1, t])
    if causal:
        pos = tf.range(t)
        before = tf.less_equal(tf.reshape(pos, [1, 1, 1, t]), tf.reshape(pos, [1, 1, t, 1]))
        keys_ok = tf.logical_and(keys_ok, before)
    key_mask = tf.reshape(m_f, [bsz, 1, 1, t])
    out, _ = masked_attention(tf.matmul(q, k, transpose_b=True), keys_ok, key_mask, v)
    out = out * tf.reshape(m_f, [bsz, 1, t, 1])
    return _merge(out, wo, bo, h, e) * tf.expand_dims(m_f, -1)


# ----------------------------------------------------------------------------- Keras layer

def make_prob_sparse_attention(keras, flavour):
    """``ProbSparseAttention`` for one Keras module, registered as
    ``probattn>ProbSparseAttention`` (see ``probattn.models.layers.layer_classes``)."""

    @keras.saving.register_keras_serializable(package="probattn")
    class ProbSparseAttention(keras.layers.Layer):
        """ProbSparse multi-head self-attention (Informer), deterministic and padding-aware.

        ``(batch, time, features)`` -> ``(batch, time, output_dim or features)``. Learned
        query/key/value projections of ``num_heads`` x ``key_dim`` and an output projection.
        The incoming Keras mask (``Embedding(mask_zero=True)``) is used and passed on:
        padded steps are never sampled, selected, attended or averaged, and output 0.
        ``factor``: Informer's c (``c * ceil(ln L)`` keys sampled and queries kept).
        ``causal``: kept queries attend to earlier steps only, the others get the
        cumulative mean. ``full_attention``: every query attends (dense attention with the
        same weights and masking; the baseline of benchmarks).
        """

        def __init__(self, num_heads, key_dim, factor=DEFAULT_FACTOR, causal=False, output_dim=None,
                     full_attention=False, kernel_initializer="glorot_uniform",
                     bias_initializer="zeros", **kwargs):
            super().__init__(**kwargs)
            for arg, value in (("num_heads", num_heads), ("key_dim", key_dim), ("factor", factor)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"ProbSparseAttention: {arg} must be an integer >= 1; received {value!r}")
            if output_dim is not None and (isinstance(output_dim, bool) or not isinstance(output_dim, int)
                                           or output_dim < 1):
                raise ValueError(f"ProbSparseAttention: output_dim must be None or an integer >= 1; "
                                 f"received {output_dim!r}")
            self.supports_masking = True
            self.num_heads = num_heads
            self.key_dim = key_dim
            self.factor = factor
            self.causal = bool(causal)
            self.output_dim = output_dim
            self.full_attention = bool(full_attention)
            self.kernel_initializer = keras.initializers.get(kernel_initializer)
            self.bias_initializer = keras.initializers.get(bias_initializer)

        def build(self, input_shape):
            shape = tf.TensorShape(input_shape)
            if shape.rank != 3 or shape[-1] is None:
                raise ValueError("ProbSparseAttention expects inputs of shape (batch, time, features) "
                                 f"with a known feature size; received shape {shape}.")
            d = int(shape[-1])
            hd = self.num_heads * self.key_dim
            out = self.output_dim or d

            def fresh(init):  # one initializer instance per weight: tf_keras repeats the
                # values of an unseeded instance called twice (Q, K and V kernels would be equal)
                return keras.initializers.get(keras.initializers.serialize(init))

            for name, kshape in (("query", (d, hd)), ("key", (d, hd)), ("value", (d, hd)),
                                 ("output", (hd, out))):
                setattr(self, f"{name}_kernel", self.add_weight(
                    name=f"{name}_kernel", shape=kshape, initializer=fresh(self.kernel_initializer)))
                setattr(self, f"{name}_bias", self.add_weight(
                    name=f"{name}_bias", shape=(kshape[1],), initializer=fresh(self.bias_initializer)))
            super().build(input_shape)

        def _weights(self, dtype):
            out = []
            for name in ("query", "key", "value", "output"):
                out += [tf.cast(getattr(self, f"{name}_kernel"), dtype),
                        tf.cast(getattr(self, f"{name}_bias"), dtype)]
            return out

        def call(self, inputs, mask=None):
            w = self._weights(inputs.dtype)
            if self.full_attention:
                return full_attention(inputs, mask, *w, self.num_heads, self.key_dim, causal=self.causal)
            return prob_sparse_attention(inputs, mask, *w, self.num_heads, self.key_dim, self.factor,
                                         causal=self.causal)

        def compute_mask(self, inputs, mask=None):
            return mask  # self-attention: the same steps are real on the way out

        def compute_output_shape(self, input_shape):
            shape = tuple(tf.TensorShape(input_shape).as_list())
            out = shape[:-1] + (self.output_dim or shape[-1],)
            return out if flavour == "3" else tf.TensorShape(out)

        def get_config(self):
            config = super().get_config()
            config.update(num_heads=self.num_heads, key_dim=self.key_dim, factor=self.factor,
                          causal=self.causal, output_dim=self.output_dim,
                          full_attention=self.full_attention,
                          kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
                          bias_initializer=keras.initializers.serialize(self.bias_initializer))
            return config

    ProbSparseAttention.__qualname__ = "ProbSparseAttention"
    ProbSparseAttention.__module__ = __name__
    return ProbSparseAttention


# ------------------------------------------------------------------------------ the model

def _layer_class(flavour):
    from .layers import layer_classes

    return layer_classes(flavour).ProbSparseAttention


def probsparse_encoder(x, embedding_dim: int, flavour=None, num_blocks: int = 1, num_heads: int = 4,
                       key_dim: int | None = None, ffn_units: int | None = None, factor: int = DEFAULT_FACTOR,
                       dropout: float = 0.0, full_attention: bool = False, prefix: str = "probsparse"):
    """Transformer encoder blocks on a masked ``(batch, time, embedding_dim)`` tensor:
    ``x + ProbSparseAttention(x)`` -> LayerNorm -> ``x + FFN(x)`` -> LayerNorm, ``num_blocks``
    times. The Keras mask rides along (every layer here passes it on). No position
    embedding: positions would shift with left padding (the model is padding-invariant)."""
    keras = get_keras(flavour)
    psa = _layer_class(check_flavour(flavour))
    key_dim = key_dim or max(1, embedding_dim // num_heads)
    ffn_units = ffn_units or 2 * embedding_dim
    for i in range(num_blocks):
        a = psa(num_heads, key_dim, factor=factor, full_attention=full_attention, name=f"{prefix}_attention_{i}")(x)
        if dropout:
            a = keras.layers.Dropout(dropout, name=f"{prefix}_attention_dropout_{i}")(a)
        x = keras.layers.LayerNormalization(epsilon=1e-5, name=f"{prefix}_attention_norm_{i}")(
            keras.layers.Add(name=f"{prefix}_attention_residual_{i}")([x, a]))
        f = keras.layers.Dense(ffn_units, activation="relu", name=f"{prefix}_ffn_in_{i}")(x)
        f = keras.layers.Dense(embedding_dim, name=f"{prefix}_ffn_out_{i}")(f)
        if dropout:
            f = keras.layers.Dropout(dropout, name=f"{prefix}_ffn_dropout_{i}")(f)
        x = keras.layers.LayerNormalization(epsilon=1e-5, name=f"{prefix}_ffn_norm_{i}")(
            keras.layers.Add(name=f"{prefix}_ffn_residual_{i}")([x, f]))
    return x


def build_probsparse_classifier(vocab_size: int, num_classes: int, embedding_dim: int = 64,
                                hidden_units: int = 128, dropout: float = 0.0, flavour=None,
                                num_blocks: int = 1, num_heads: int = 4, factor: int = DEFAULT_FACTOR,
                                full_attention: bool = False, name: str = "probsparse_classifier"):
    """``token_ids`` -> Embedding(mask_zero=True) -> ProbSparse encoder block(s) ->
    ProbAttention pooling -> Dense(relu) -> Dense(softmax) named ``probabilities``: the
    seed page's classifier with a ProbSparse encoder in front of its pooling."""
    for arg, value, low in (("vocab_size", vocab_size, 3), ("num_classes", num_classes, 2),
                            ("embedding_dim", embedding_dim, 1), ("hidden_units", hidden_units, 1),
                            ("num_blocks", num_blocks, 1), ("num_heads", num_heads, 1),
                            ("factor", factor, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{arg} must be an integer >= {low}; received {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); received {dropout!r}")
    from .layers import layer_classes

    flavour = check_flavour(flavour)
    keras = get_keras(flavour)
    inputs = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    x = keras.layers.Embedding(vocab_size, embedding_dim, mask_zero=True, name="embedding")(inputs)
    if dropout:
        x = keras.layers.Dropout(dropout, name="embedding_dropout")(x)
    x = probsparse_encoder(x, embedding_dim, flavour, num_blocks=num_blocks, num_heads=num_heads,
                           factor=factor, dropout=dropout, full_attention=full_attention)
    x = layer_classes(flavour).ProbAttention(name="prob_attention")(x)
    x = keras.layers.Dense(hidden_units, activation="relu", name="hidden")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="hidden_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def __getattr__(name):  # ``from probattn.models.probsparse import ProbSparseAttention``: default flavour
    if name == "ProbSparseAttention":
        return _layer_class(None)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""NumPy references for ``probattn.models.probsparse`` (float64, no TensorFlow).

* ``prob_sparse_attention_ref``: the layer's algorithm written the plain way: one row and
  one head at a time, on the valid steps only (padding is dropped before anything is
  computed, so nothing here can leak a pad), with loops and ``argsort`` where the graph
  uses one-hot matmuls and TopK. Agreement with the graph is therefore a real cross-check.
* ``informer_prob_attention``: Informer2020's ``models/attn.py`` ``ProbAttention.forward``
  transliterated from torch to NumPy, for ``mask_flag`` False and True, with the random key
  sample (``torch.randint``) replaced by explicit indices.
"""
from __future__ import annotations

import math

import numpy as np


def ceil_ln(n: int) -> int:
    return 0 if n <= 1 else int(math.ceil(math.log(n)))


def sample_size(n: int, factor: int) -> int:
    """Keys sampled and queries kept for n valid steps (0 for an all-padding row)."""
    return min(n, max(1, factor * ceil_ln(n))) if n else 0


def grid_samples(n: int, u: int) -> np.ndarray:
    """Valid ranks of the deterministic key sample (the same for every query)."""
    return np.array([((2 * k + 1) * n) // (2 * u) for k in range(u)], dtype=np.int64)


def _softmax_rows(s):
    a = np.exp(s - s.max(-1, keepdims=True))
    return a / a.sum(-1, keepdims=True)


def probsparse_core(q, k, v, n_top, index_sample, causal=False):
    """The ProbSparse step on the valid steps of one head.

    q, k, v: ``(L, E)`` (q already scaled); ``n_top``: queries kept; ``index_sample``:
    ``(L, U)`` sampled key indices per query. Returns ``(out (L, E), kept indices in rank
    order, M)``. Kept queries attend to every key (causal: keys at or before them); the
    others get the mean of V (causal: of V up to their position)."""
    L = q.shape[0]
    qk = np.einsum("le,lue->lu", q, k[index_sample])  # per-query sampled scores
    M = qk.max(-1) - qk.sum(-1) / L
    top = np.argsort(-M, kind="stable")[:n_top]  # ties: the lower index first
    if causal:
        out = np.cumsum(v, axis=0) / np.arange(1, L + 1)[:, None]
    else:
        out = np.repeat(v.mean(0, keepdims=True), L, axis=0)
    for i in top:
        keys = slice(0, i + 1) if causal else slice(0, L)
        out[i] = _softmax_rows(q[i] @ k[keys].T) @ v[keys]
    return out, top, M


def _split(w):
    return [np.asarray(a, np.float64) for a in w]


def prob_sparse_attention_ref(x, mask, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, key_dim,
                              factor=5, causal=False, index_sample_fn=None):
    """x ``(B, T, D)``, mask ``(B, T)`` bool or None. Padded steps output 0.
    ``index_sample_fn(n, u)`` -> ``(n, u)`` valid-rank indices; default: the grid for every
    query. Returns ``(y, info)``, info per row: n, u, the kept positions per head, M."""
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    mask = np.ones((B, T), bool) if mask is None else np.asarray(mask, bool)
    wq, bq, wk, bk, wv, bv, wo, bo = _split((wq, bq, wk, bk, wv, bv, wo, bo))
    H, E = num_heads, key_dim
    y = np.zeros((B, T, wo.shape[1]))
    info = []
    for b in range(B):
        pos = np.flatnonzero(mask[b])
        n = len(pos)
        if n == 0:
            info.append({"n": 0, "u": 0, "top": [], "M": []})
            continue
        u = sample_size(n, factor)
        idx = np.tile(grid_samples(n, u), (n, 1)) if index_sample_fn is None else np.asarray(index_sample_fn(n, u))
        xv = x[b, pos]
        heads, tops, Ms = [], [], []
        for h in range(H):
            sl = slice(h * E, (h + 1) * E)
            q = (xv @ wq[:, sl] + bq[sl]) / math.sqrt(E)
            o, top, M = probsparse_core(q, xv @ wk[:, sl] + bk[sl], xv @ wv[:, sl] + bv[sl], u, idx, causal)
            heads.append(o)
            tops.append(pos[top])
            Ms.append(M)
        y[b, pos] = np.concatenate(heads, -1) @ wo + bo
        info.append({"n": n, "u": u, "top": tops, "M": Ms})
    return y, info


def full_attention_ref(x, mask, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, key_dim, causal=False):
    """Dense masked multi-head self-attention (causal: keys at or before the query);
    padded steps output 0."""
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    mask = np.ones((B, T), bool) if mask is None else np.asarray(mask, bool)
    wq, bq, wk, bk, wv, bv, wo, bo = _split((wq, bq, wk, bk, wv, bv, wo, bo))
    H, E = num_heads, key_dim
    y = np.zeros((B, T, wo.shape[1]))
    for b in range(B):
        pos = np.flatnonzero(mask[b])
        if len(pos) == 0:
            continue
        xv = x[b, pos]
        heads = []
        for h in range(H):
            sl = slice(h * E, (h + 1) * E)
            q = (xv @ wq[:, sl] + bq[sl]) / math.sqrt(E)
            s = q @ (xv @ wk[:, sl] + bk[sl]).T
            if causal:
                s = np.where(np.tri(len(pos), dtype=bool), s, -np.inf)
            heads.append(_softmax_rows(s) @ (xv @ wv[:, sl] + bv[sl]))
        y[b, pos] = np.concatenate(heads, -1) @ wo + bo
    return y


def informer_prob_attention(queries, keys, values, factor, index_sample, mask_flag=False, scale=None):
    """Informer2020 ``ProbAttention.forward`` in NumPy; ``torch.randint(L_K, (L_Q,
    sample_k))`` replaced by ``index_sample``. queries/keys/values: ``(B, L, H, D)`` as in
    Informer (before its ``transpose(2, 1)``). ``mask_flag``: Informer's causal mode
    (``ProbMask`` on the kept queries' scores, ``V.cumsum`` as the others' context).
    Returns ``(context (B, L, H, D), M, M_top)``."""
    B, L_Q, H, D = queries.shape
    _, L_K, _, _ = keys.shape
    queries = queries.transpose(0, 2, 1, 3)
    keys = keys.transpose(0, 2, 1, 3)
    values = values.transpose(0, 2, 1, 3)
    U_part = factor * int(np.ceil(np.log(L_K)))
    u = factor * int(np.ceil(np.log(L_Q)))
    U_part = U_part if U_part < L_K else L_K
    u = u if u < L_Q else L_Q
    # _prob_QK
    K_expand = np.broadcast_to(keys[:, :, None], (B, H, L_Q, L_K, D))
    K_sample = K_expand[:, :, np.arange(L_Q)[:, None], index_sample, :]
    Q_K_sample = np.matmul(queries[:, :, :, None, :], np.swapaxes(K_sample, -2, -1)).squeeze(-2)
    M = Q_K_sample.max(-1) - Q_K_sample.sum(-1) / L_K
    M_top = np.argsort(-M, axis=-1, kind="stable")[..., :u]  # torch.topk(sorted=False): a set
    Q_reduce = queries[np.arange(B)[:, None, None], np.arange(H)[None, :, None], M_top, :]
    scores_top = np.matmul(Q_reduce, np.swapaxes(keys, -2, -1))
    scores_top = scores_top * (scale or 1.0 / math.sqrt(D))
    # _get_initial_context
    if mask_flag:
        context = np.cumsum(values, axis=-2)
        # ProbMask: triu(1) rows of the kept queries
        upper = np.triu(np.ones((L_Q, L_K), bool), 1)
        scores_top = np.where(upper[M_top], -np.inf, scores_top)
    else:
        context = np.broadcast_to(values.mean(-2, keepdims=True), (B, H, L_Q, values.shape[-1])).copy()
    # _update_context
    attn = _softmax_rows(scores_top)
    context[np.arange(B)[:, None, None], np.arange(H)[None, :, None], M_top, :] = np.matmul(attn, values)
    return context.transpose(0, 2, 1, 3), M, M_top

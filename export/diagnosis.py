"""What the Keras model itself does with padding, found by tracing it (no layer types are
matched): the diagnosis ``verify`` prints beside export parity, and ``probattn doctor``.

Every layer output of a functional model is probed on the same rows three ways:

* **masks**: the mask each layer's output carries (Keras' ``_keras_mask``), against the
  truth (``ids != pad``). A sequence output without a mask whose input had one: the mask
  is *dropped* there. A mask that differs from the truth: it is *recomputed* there (e.g.
  ``Masking()`` after ``Embedding(mask_zero=True)`` marks padded steps as real, since the
  pad id's embedding row is not zero).
* **padding**: the rows again with extra padding appended. The first layer whose outputs
  at real steps (or pooled outputs) change is where padding starts to leak in.
* **an all-padding row**: the first layer whose output turns NaN or inf for it (e.g. a
  masked mean that divides by a zero mask sum).

And once more for precision: every floating constant of the traced graph that float16
cannot hold (|x| > 65504) is listed with the layer it belongs to. In a float16 artifact it
becomes inf, and ``(1 - mask) * inf`` is NaN on every real token (the seed page's ``1e12``).

A SavedModel without a Keras model has no layers to trace: only the whole model's
behaviour (padding invariance, all-padding row) is reported.
"""
from __future__ import annotations

import re

import numpy as np

from probattn.models.text.tokenizer import PAD_ID, encode

#: Valid-step outputs of a layer may move by float32 op-order noise when padding is appended
#: (a different reduction length): a few ulps times the number of summed terms. Relative to
#: the layer's output scale, 1e-5 is ~100 float32 epsilons (1.2e-7 each); the probabilities
#: themselves are held to 1e-6 absolute by verify (tolerances.REFERENCE).
CHANGE_RELATIVE = 1e-5
#: pads appended in the padding probe (the same as verify's pad+7 family)
EXTRA_PADS = 7
FLOAT16_MAX = 65504.0

#: finding kinds; the first four break the model itself, the last only float16 artifacts
BREAKS_MODEL = ("mask_dropped", "mask_recomputed", "padding_changes_output", "nan_on_all_padding_row")
FLOAT16_OVERFLOW = "float16_overflow"


def probe_batches(vocab_size: int, fixed_length: int | None, tokenizer=None, texts=None) -> np.ndarray:
    """Right-padded rows of real ids (from ``texts`` when given, else random ids), ragged
    lengths, and room for ``EXTRA_PADS`` more pads within a fixed length."""
    width = fixed_length or 24
    room = width - EXTRA_PADS if fixed_length else width
    if texts and tokenizer is not None:
        ids = encode(tokenizer, [t for t in texts if t.strip()][:32], max(1, room))
        ids = ids[ids.max(axis=1) > 0] if (ids.max(axis=1) > 0).any() else ids
    else:
        rng = np.random.default_rng(0)
        ids = np.zeros((12, max(1, room)), np.int32)
        for i in range(12):
            n = int(rng.integers(1, ids.shape[1] + 1))
            ids[i, :n] = rng.integers(1, max(2, vocab_size), n)
    if fixed_length:
        ids = np.pad(ids, ((0, 0), (0, fixed_length - ids.shape[1])))
    return ids.astype(np.int32)


def diagnose_serving(serving, batches=None, tokenizer=None, texts=None) -> dict:
    """The diagnosis of a ``signature.KerasServing`` or ``SignatureServing``."""
    from .signature import KerasServing

    if batches is not None:
        ids = np.asarray(batches, np.int32)
        if serving.fixed_length:  # room for the padding probe inside the fixed length
            keep = ids[:, :max(1, serving.fixed_length - EXTRA_PADS)]
            ids = np.pad(keep, ((0, 0), (0, serving.fixed_length - keep.shape[1])))
    else:
        ids = probe_batches(_vocab(serving), serving.fixed_length, tokenizer, texts)
    result = {"traced": False, "findings": [], "starts_at": None}
    result.update(_behaviour(serving, ids))
    if isinstance(serving, KerasServing):
        try:
            result["findings"] = _trace_layers(serving, ids) + _float16_constants(serving)
            result["traced"] = True
        except Exception as e:  # a model whose layers cannot be probed one by one
            result["untraced_reason"] = f"{type(e).__name__}: {str(e)[:200]}"
    else:
        result["untraced_reason"] = "a SavedModel without a Keras model has no layers to trace"
    breaking = [f for f in result["findings"] if f["kind"] in BREAKS_MODEL]
    result["starts_at"] = breaking[0]["layer"] if breaking else None
    result["breaks_masking"] = bool(breaking) or result.get("pad_invariance", 0) > 1e-6 \
        or not result.get("all_padding_row_finite", True)
    result["findings_text"] = [f["text"] for f in result["findings"]]
    result["model_text"] = [f["text"] for f in breaking]  # what breaks the model itself
    if result["breaks_masking"] and not breaking:
        result["model_text"].append(_behaviour_text(result))
        result["findings_text"].append(_behaviour_text(result))
    return result


def _vocab(serving) -> int:
    model = getattr(serving, "model", None)
    if model is not None:
        from .loading import vocab_size_of

        return vocab_size_of(model) or 100
    return int(serving.probe.max()) + 1


def _behaviour(serving, ids) -> dict:
    """Padding invariance and the all-padding row of the whole model (its outputs)."""
    out = {}
    base = {k: v.numpy() for k, v in serving(ids).items()}
    if serving.fixed_length is None:
        padded = {k: v.numpy() for k, v in serving(np.pad(ids, ((0, 0), (0, EXTRA_PADS)))).items()}
        heads = [h.output for h in serving.heads]
        diffs = [np.abs(base[h].astype(np.float64) - padded[h]) for h in heads]
        out["pad_invariance"] = float(max(np.nanmax(d) if np.isfinite(d).any() else np.inf for d in diffs))
    allpad = np.concatenate([ids[:3], np.zeros((1, ids.shape[1]), np.int32)])
    res = serving(allpad)
    out["all_padding_row_finite"] = bool(all(np.isfinite(v.numpy()[-1]).all() for v in res.values()))
    return out


def _behaviour_text(result) -> str:
    parts = []
    if result.get("pad_invariance", 0) > 1e-6:
        parts.append(f"appending {EXTRA_PADS} pads moves the outputs by {result['pad_invariance']:.3g}")
    if not result.get("all_padding_row_finite", True):
        parts.append("an all-padding row gives NaN/inf")
    where = result.get("untraced_reason") or "no single layer found"
    return f"the model itself: {'; '.join(parts)} ({where})"


# ---------------------------------------------------------------------------- layer tracing

def _flat(x) -> list:
    import tensorflow as tf

    return [t for t in tf.nest.flatten(x) if t is not None and hasattr(t, "shape")]


def _mask_of(t):
    return getattr(t, "_keras_mask", None)


def _node_inputs(layer) -> list:
    nodes = getattr(layer, "_inbound_nodes", None) or []
    if not nodes:
        return []
    return _flat(getattr(nodes[0], "input_tensors", None))


def _probe_points(model):
    """``[(layer, output tensors, input tensors)]`` in topological order (skipping inputs and
    layers called more than once, whose outputs have no single tensor)."""
    points = []
    for layer in model.layers:
        if type(layer).__name__ == "InputLayer":
            continue
        try:
            outs = _flat(layer.output)
        except Exception:
            continue
        if outs:
            points.append((layer, outs, _node_inputs(layer)))
    return points


def _trace_layers(serving, ids) -> list:
    import tensorflow as tf

    from probattn.models.keras_compat import get_keras

    model = serving.model
    keras = get_keras(serving.flavour)
    from .signature import model_input

    x_in = model_input(model)
    points = _probe_points(model)
    tensors, index = [], {}
    for li, (layer, outs, _) in enumerate(points):
        for t in outs:
            index[id(t)] = (li, len(tensors), None)
            tensors.append(t)
            m = _mask_of(t)
            if m is not None:
                index[id(t)] = (li, index[id(t)][1], len(tensors))
                tensors.append(m)
    if not tensors:
        return []
    probe = keras.Model(x_in, tensors)
    dtype = serving.input_dtype

    def run(batch):
        got = probe(tf.cast(batch, dtype), training=False)
        return [np.asarray(g) for g in (got if isinstance(got, (list, tuple)) else [got])]

    real = ids != PAD_ID
    base = run(ids)
    padded = None if serving.fixed_length else run(np.pad(ids, ((0, 0), (0, EXTRA_PADS))))
    allpad_ids = np.concatenate([ids[:3], np.zeros((1, ids.shape[1]), np.int32)])
    allpad = run(allpad_ids)
    width = ids.shape[1]
    has_mask = {id(x_in): False}
    findings = []
    seen = set()

    def add(layer, kind, text):
        if (layer.name, kind) not in seen:
            seen.add((layer.name, kind))
            findings.append({"layer": layer.name, "class": type(layer).__name__, "kind": kind,
                             "text": f"layer '{layer.name}' ({type(layer).__name__}): {text}"})

    for li, (layer, outs, inputs) in enumerate(points):
        input_masked = any(has_mask.get(id(t), False) for t in inputs)
        for t in outs:
            _, vi, mi = index[id(t)]
            value = base[vi]
            sequence = value.ndim >= 2 and value.shape[0] == ids.shape[0] and value.shape[1] == width
            has_mask[id(t)] = mi is not None
            if sequence and value.ndim >= 3 and mi is None and input_masked:
                add(layer, "mask_dropped", "drops the padding mask: its sequence output carries no mask, so "
                    "later layers treat padded steps as real")
            if mi is not None and sequence:
                got = base[mi].astype(bool)
                wrong = int(np.sum(got != real))
                if wrong:
                    as_real = int(np.sum(got & ~real))
                    add(layer, "mask_recomputed", f"recomputes the mask and gets {wrong} of {real.size} steps "
                        f"wrong ({as_real} padded steps marked real): a mask computed from values, not from "
                        "the pad id")
            if padded is not None:
                change = _valid_change(value, padded[vi], real, sequence, ids.shape[0])
                if change is not None and change > CHANGE_RELATIVE:
                    add(layer, "padding_changes_output", f"its outputs at real steps change by {change:.3g} "
                        f"(relative) when {EXTRA_PADS} pads are appended")
            a = allpad[vi]
            if a.ndim >= 1 and a.shape[0] == allpad_ids.shape[0] and not np.isfinite(a[-1]).all():
                add(layer, "nan_on_all_padding_row", "turns NaN/inf on an all-padding row (e.g. a division by "
                    "the number of real steps, which is 0 there)")
    order = {name: i for i, name in enumerate(l.name for l, _, _ in points)}
    findings.sort(key=lambda f: (order.get(f["layer"], 0), BREAKS_MODEL.index(f["kind"])))
    return findings


def _valid_change(a, b, real, sequence, batch) -> float | None:
    """Largest change of real-step (or pooled) outputs, relative to the output's scale."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim == 0 or a.shape[0] != batch:
        return None
    if sequence:
        t = a.shape[1]
        b = b[:, :t]
        m = real.reshape(real.shape + (1,) * (a.ndim - 2))
        a = np.where(m, a, 0.0)
        b = np.where(m, b, 0.0)
    elif a.shape != b.shape:
        return None
    finite = np.isfinite(a) & np.isfinite(b)
    if not finite.any():
        return None
    scale = max(1.0, float(np.max(np.abs(a[finite]))))
    return float(np.max(np.abs(a[finite] - b[finite]))) / scale


# ---------------------------------------------------------------------------- float16 range

def _float16_constants(serving) -> list:
    """Floating constants of the traced model that float16 cannot hold, by layer."""
    import tensorflow as tf

    model = serving.model
    layers = [l for l in model.layers if type(l).__name__ != "InputLayer"]
    tags = {f"probattnlayer{i}x": l for i, l in enumerate(layers)}
    saved = [_rename(l, tag) for tag, l in tags.items()]
    try:
        spec = tf.TensorSpec([None, serving.fixed_length], serving.input_dtype)
        graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph
        found = []
        defs = graph.as_graph_def()
        nodes = list(defs.node) + [n for f in defs.library.function for n in f.node_def]
        for node in nodes:
            if node.op != "Const" or "value" not in node.attr:
                continue
            t = node.attr["value"].tensor
            if t.dtype not in (1, 2, 19):  # DT_FLOAT, DT_DOUBLE, DT_HALF
                continue
            v = tf.make_ndarray(t)
            big = v[np.isfinite(v) & (np.abs(v) > FLOAT16_MAX)] if v.size else v
            if big.size:
                tag = next((m for m in re.findall(r"probattnlayer\d+x", node.name)), None)
                found.append((tags.get(tag), node.name, float(big.flat[np.argmax(np.abs(big))])))
    finally:
        for layer, old in zip(layers, saved):
            _rename(layer, old)
    out = []
    for layer, op, value in found:
        name = layer.name if layer is not None else "(outside any layer)"
        cls = type(layer).__name__ if layer is not None else ""
        op = re.sub(r"probattnlayer\d+x(_\d+)?", name, op)
        out.append({"layer": name, "class": cls, "kind": FLOAT16_OVERFLOW, "value": value, "op": op,
                    "text": f"layer '{name}'{f' ({cls})' if cls else ''}: constant {value:.3g} (op {op}) is beyond "
                            f"float16's largest value {FLOAT16_MAX:g}: in a float16 artifact it becomes inf, and "
                            "multiplying it by a 0 (e.g. (1 - mask) on a real token) gives NaN"})
    return out


def _rename(layer, name):
    """Set a layer's name (returns the old one): the graph's name scopes then say which ops
    are whose. Keras 3 keeps it in ``name``, tf_keras behind the ``name`` property."""
    old = layer.name
    if isinstance(type(layer).__dict__.get("name"), property) or any(
            isinstance(c.__dict__.get("name"), property) for c in type(layer).__mro__):
        layer._name = name
    else:
        layer.name = name
    return old


def explain_nan(diagnosis: dict | None, precision: str) -> str | None:
    """Why a float16 artifact gives NaN/inf, when the diagnosis found the cause."""
    if not diagnosis or precision != "fp16":
        return None
    hits = [f for f in diagnosis.get("findings", []) if f["kind"] == FLOAT16_OVERFLOW]
    if not hits:
        return None
    f = hits[0]
    return (f"float16 cannot hold the constant {f['value']:.3g} in layer '{f['layer']}' (op {f['op']}): it becomes "
            "inf, and 0 * inf is NaN. The model, not the export, does this: use a mask constant float16 can hold "
            "(e.g. -1e4, or the layer's dtype max) or mask with tf.where")

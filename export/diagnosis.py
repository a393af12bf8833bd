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
#: the whole model's probabilities may move this much with padding: verify's bound for the
#: Keras reference (tolerances.FP32_PAD_INVARIANCE; masked steps carry <= exp(-20) in ours)
MODEL_PAD_INVARIANCE = 1e-6
FLOAT16_MAX = 65504.0

#: finding kinds, in the order they are reported for one layer. The model breaks masking
#: when it *behaves* so (``BEHAVIOUR``: outputs at real steps move with padding, or an
#: all-padding row turns NaN); a dropped or recomputed mask says where it starts. A dropped
#: mask alone is no failure: a later layer may mask from the ids again.
MASK_KINDS = ("mask_dropped", "mask_recomputed")
BEHAVIOUR = ("padding_changes_output", "nan_on_all_padding_row")
BREAKS_MODEL = MASK_KINDS + BEHAVIOUR
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
            result["untraced_reason"] = str(e)[:300] if isinstance(e, ValueError) else \
                f"{type(e).__name__}: {str(e)[:200]}"
    else:
        result["untraced_reason"] = "a SavedModel without a Keras model has no layers to trace"
    behaves = [f for f in result["findings"] if f["kind"] in BEHAVIOUR]
    result["breaks_masking"] = bool(behaves) or result.get("pad_invariance", 0) > MODEL_PAD_INVARIANCE \
        or not result.get("all_padding_row_finite", True)
    breaking = [f for f in result["findings"] if f["kind"] in BREAKS_MODEL] if result["breaks_masking"] else []
    result["starts_at"] = breaking[0]["layer"] if breaking else None
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


def _relaxed(fn, fixed_length, dtype):
    """``fn`` callable at any length: a model with a fixed input length is traced with a
    dynamic one (the padding probe appends pads past it). None when the model cannot."""
    if not fixed_length:
        return fn
    import tensorflow as tf

    traced = tf.function(fn, input_signature=[tf.TensorSpec([None, None], dtype)])
    try:
        traced.get_concrete_function()
    except Exception:
        return None
    return traced


def _behaviour(serving, ids) -> dict:
    """Padding invariance and the all-padding row of the whole model (its outputs)."""
    out = {}
    base = {k: v.numpy() for k, v in serving(ids).items()}
    call = _relaxed(lambda x: serving(x), serving.fixed_length, "int32")
    if call is not None:
        padded = {k: v.numpy() for k, v in call(np.pad(ids, ((0, 0), (0, EXTRA_PADS)))).items()}
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
    if x_in is None:
        raise ValueError("a subclassed model has no functional graph between its layers: only its outputs "
                         "are probed")
    points = _probe_points(model)
    outputs = [t for _, outs, _ in points for t in outs]
    if not outputs:
        return []
    masks = [_mask_of(t) for t in outputs]
    with_masks = [m for m in masks if m is not None]
    try:  # Keras 3: the masks Keras attached to each output are probed with the outputs
        probe = _probe_model(keras, model, x_in, outputs + with_masks)
        symbolic_masks = True
    except Exception:  # tf_keras: mask tensors made by ops are not layer outputs; recomputed below
        probe = _probe_model(keras, model, x_in, outputs)
        symbolic_masks = False
    dtype = serving.input_dtype
    relaxed = _relaxed(lambda x: probe(x, training=False), serving.fixed_length, dtype)

    def run(batch, call=None):
        got = (call or probe)(tf.cast(batch, dtype), **({} if call else {"training": False}))
        got = [np.asarray(g) for g in (got if isinstance(got, (list, tuple)) else [got])]
        return {id(t): v for t, v in zip(outputs, got)}, got[len(outputs):]

    real = ids != PAD_ID
    base, base_masks = run(ids)
    if symbolic_masks:
        it = iter(base_masks)
        mask_value = {id(t): (next(it) if m is not None else None) for t, m in zip(outputs, masks)}
    else:
        mask_value = _eager_masks(points, x_in, tf.cast(ids, dtype), base)
    padded = None if relaxed is None else run(np.pad(ids, ((0, 0), (0, EXTRA_PADS))), relaxed)[0]
    allpad_ids = np.concatenate([ids[:3], np.zeros((1, ids.shape[1]), np.int32)])
    allpad = run(allpad_ids)[0]
    width = ids.shape[1]
    has_mask = {id(x_in): False}
    findings = []
    seen = set()

    def add(layer, kind, text):
        if (layer.name, kind) not in seen:
            seen.add((layer.name, kind))
            findings.append({"layer": layer.name, "class": type(layer).__name__, "kind": kind,
                             "text": f"layer '{layer.name}' ({type(layer).__name__}): {text}"})

    for layer, outs, inputs in points:
        input_masked = any(has_mask.get(id(t), False) for t in inputs)
        for t in outs:
            value = base[id(t)]
            mask = mask_value.get(id(t))
            sequence = value.ndim >= 2 and value.shape[0] == ids.shape[0] and value.shape[1] == width
            has_mask[id(t)] = mask is not None
            if sequence and value.ndim >= 3 and mask is None and input_masked:
                add(layer, "mask_dropped", "drops the padding mask: its sequence output carries no mask, so "
                    "later layers treat padded steps as real")
            if mask is not None and sequence:
                got = np.asarray(mask).astype(bool).reshape(real.shape)
                wrong = int(np.sum(got != real))
                if wrong:
                    as_real = int(np.sum(got & ~real))
                    add(layer, "mask_recomputed", f"recomputes the mask and gets {wrong} of {real.size} steps "
                        f"wrong ({as_real} padded steps marked real): a mask computed from values, not from "
                        "the pad id")
            if padded is not None:
                change = _valid_change(value, padded[id(t)], real, sequence, ids.shape[0])
                if change is not None and change > CHANGE_RELATIVE:
                    add(layer, "padding_changes_output", f"its outputs at real steps change by {change:.3g} "
                        f"(relative) when {EXTRA_PADS} pads are appended")
            a = allpad[id(t)]
            if a.ndim >= 1 and a.shape[0] == allpad_ids.shape[0] and not np.isfinite(a[-1]).all():
                add(layer, "nan_on_all_padding_row", "turns NaN/inf on an all-padding row (e.g. a division by "
                    "the number of real steps, which is 0 there)")
    order = {name: i for i, name in enumerate(l.name for l, _, _ in points)}
    findings.sort(key=lambda f: (order.get(f["layer"], 0), BREAKS_MODEL.index(f["kind"])))
    return findings


def _eager_masks(points, x_in, x_value, values) -> dict:
    """The mask of every probed output, as Keras propagates it (``layer.compute_mask(inputs,
    input masks)``, layer after layer), evaluated on the probed values."""
    import tensorflow as tf

    vals = {id(x_in): x_value, **values}
    masks = {id(x_in): None}
    for layer, outs, _ in points:
        node = layer._inbound_nodes[0]
        args = getattr(node, "call_args", None)
        first = args[0] if args else getattr(node, "input_tensors", None)
        try:
            v_in = tf.nest.map_structure(lambda t: vals[id(t)], first)
            m_in = tf.nest.map_structure(lambda t: masks.get(id(t)), first)
            if isinstance(m_in, (list, tuple)) and all(m is None for m in m_in) or m_in is None:
                m_in = None
            m_out = layer.compute_mask(v_in, m_in)
        except Exception:
            m_out = None
        flat = tf.nest.flatten(m_out) if m_out is not None else []
        for i, t in enumerate(outs):
            m = flat[i] if i < len(flat) else None
            masks[id(t)] = None if m is None else np.asarray(m)
    return masks


def _probe_model(keras, model, x_in, tensors):
    """A model from the input to every probed tensor. A reloaded Keras 3 model can hold op
    nodes with the same name (two ``not_equal`` masks), which a new functional model refuses:
    duplicates are renamed while it is built, then restored."""
    ops = _ancestor_ops(tensors)
    seen, renamed = {}, []
    for op in ops:
        name = getattr(op, "name", None)
        if name in seen and not isinstance(type(op).__dict__.get("name"), property):
            renamed.append((op, name))
            op.name = f"{name}_probattn_probe_{len(renamed)}"
        seen[name] = True
    try:
        return keras.Model(x_in, tensors)
    finally:
        for op, name in renamed:
            op.name = name


def _ancestor_ops(tensors) -> list:
    """Every operation that produces ``tensors`` or their inputs (through ``_keras_history``)."""
    ops, seen, stack = [], set(), list(tensors)
    while stack:
        t = stack.pop()
        hist = getattr(t, "_keras_history", None)
        op = getattr(hist, "operation", None) or getattr(hist, "layer", None)
        if op is None or id(op) in seen:
            continue
        seen.add(id(op))
        ops.append(op)
        for node in getattr(op, "_inbound_nodes", None) or []:
            stack.extend(_flat(getattr(node, "input_tensors", None)))
    return ops[::-1]


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


def explain_float16(diagnosis: dict | None, fp16_rows) -> list:
    """What the float16 constants found in the model mean for the bundle's fp16 artifacts.
    ``fp16_rows``: ``[(artifact, gave NaN/inf), ...]``."""
    hits = [f for f in (diagnosis or {}).get("findings", []) if f["kind"] == FLOAT16_OVERFLOW]
    if not hits or not fp16_rows:
        return []
    f = hits[0]
    what = (f"the constant {f['value']:.3g} in layer '{f['layer']}' (op {f['op']}) is beyond float16's range "
            f"(±{FLOAT16_MAX:g}): in float16 arithmetic it is inf, and 0 * inf is NaN (the model's own "
            "(1 - mask) * constant on a real token)")
    bad = sorted({a for a, nan in fp16_rows if nan})
    if bad:
        return [f"{', '.join(bad)} give NaN/inf: {what}. The model does this, not the export: use a mask "
                "constant float16 can hold (e.g. 1e4) or mask with tf.where"]
    files = ", ".join(sorted({a for a, _ in fp16_rows}))
    return [f"note for {files}: {what}. probattn's float16 converters store it clamped to ±{FLOAT16_MAX:g}, so "
            "these files run without NaN, but with a different constant than the model (their error against Keras "
            "is in the table)"]

"""Export-time rewrites: the same weights and the same math, traced to builtin ops only.

A rewrite patches *instances* of the model the exporter loaded (the user's file and the
bundle's reference are never touched), and the exporter checks on probe ids that the
patched model still computes what it computed before (``apply``), else it is undone.

* ``mha_expand_dims`` (tf_keras): ``MultiHeadAttention._compute_attention_mask`` builds its
  padding mask with ``mask[:, :, tf.newaxis]``, a StridedSlice with ``new_axis_mask``, which
  is a Select op in LiteRT. The patched method uses ``tf.expand_dims``. Keras 3's MHA
  already does.
* ``lstm_loop``: a masked ``LSTM`` (or ``Bidirectional(LSTM)``) traced with a dynamic batch
  becomes TensorList ops, which LiteRT cannot lower without Select ops. The patched call
  runs the same cell math in a ``tf.while_loop`` that carries ``(h, c)`` through masked
  steps and writes each step's output into a fixed ``(T, B, U)`` buffer with
  ``tensor_scatter_nd_update``: LiteRT ``WHILE`` + ``SCATTER_ND``, ONNX ``Loop`` +
  ``ScatterND``, any batch and length. (Not the fused-LSTM + ``reverse_sequence`` route:
  tf2onnx drops ``sequence_lens`` there and the ONNX file is silently wrong.)
* ``embedding_gather`` (Keras 3): ``Embedding.call`` is ``ops.take``, which wraps negative
  ids (``where(ids < 0, ids + n, ids)``): LiteRT ``LESS``/``ADD``/``SELECT``, and TFLite
  Micro has no ``SELECT`` kernel, so the fixed-shape device files would not run there. The
  patched call is the plain ``tf.gather`` of the same table. Identical for every id an
  artifact takes: token ids are in ``[0, vocab)`` (runners refuse others).
"""
from __future__ import annotations

import types

from probattn.models.quiet import import_tensorflow

tf = import_tensorflow()

REWRITES: dict = {}


def _rewrite(name):
    def deco(fn):
        REWRITES[name] = fn
        return fn

    return deco


def walk(layer):
    yield layer
    for sub in getattr(layer, "layers", []) or []:
        yield from walk(sub)
    for attr in ("forward_layer", "backward_layer", "layer"):  # wrappers (Bidirectional)
        sub = getattr(layer, attr, None)
        if sub is not None and sub is not layer and hasattr(sub, "weights"):
            yield sub


def apply_all(model, keras, flavour: str) -> list:
    """Apply every rewrite that finds something to patch; returns ``[(name, undo), ...]``."""
    done = []
    for name, fn in REWRITES.items():
        undo = fn(model, keras, flavour)
        if undo:
            done.append((name, undo))
    return done


def _patch(obj, attr, value) -> callable:
    """Set an instance attribute; the returned function restores the class's own."""
    had = attr in vars(obj)
    old = vars(obj).get(attr)
    setattr(obj, attr, value)

    def undo():
        if had:
            setattr(obj, attr, old)
        else:
            delattr(obj, attr)

    return undo


def _undo_all(undos):
    def undo():
        for u in reversed(undos):
            u()

    return undo if undos else None


# ---------------------------------------------------------------- MultiHeadAttention

def _compute_attention_mask_expand_dims(self, query, value, key=None, attention_mask=None,
                                        use_causal_mask=False):
    """tf_keras ``MultiHeadAttention._compute_attention_mask`` with ``tf.expand_dims``."""
    query_mask = getattr(query, "_keras_mask", None)
    value_mask = getattr(value, "_keras_mask", None)
    key_mask = getattr(key, "_keras_mask", None)
    auto_mask = None
    if query_mask is not None:
        auto_mask = tf.expand_dims(tf.cast(query_mask, tf.bool), 2)  # [B, T, 1]
    if value_mask is not None:
        mask = tf.expand_dims(tf.cast(value_mask, tf.bool), 1)  # [B, 1, S]
        auto_mask = mask if auto_mask is None else auto_mask & mask
    if key_mask is not None:
        mask = tf.expand_dims(tf.cast(key_mask, tf.bool), 1)
        auto_mask = mask if auto_mask is None else auto_mask & mask
    if use_causal_mask:
        mask = self._compute_causal_mask(query, value)
        auto_mask = mask if auto_mask is None else auto_mask & mask
    if auto_mask is not None:
        attention_mask = auto_mask if attention_mask is None else tf.cast(attention_mask, bool) & auto_mask
    return attention_mask


@_rewrite("mha_expand_dims")
def mha_expand_dims(model, keras, flavour):
    if flavour != "2":
        return None
    undos = [_patch(layer, "_compute_attention_mask",
                    types.MethodType(_compute_attention_mask_expand_dims, layer))
             for layer in walk(model) if isinstance(layer, keras.layers.MultiHeadAttention)]
    return _undo_all(undos)


# ---------------------------------------------------------------- LSTM

def lstm_sequence(x, mask, kernel, recurrent_kernel, bias, activation, recurrent_activation,
                  reverse=False):
    """Keras LSTM (gates i, f, c, o) over ``(B, T, D)`` with ``return_sequences=True``.

    Masked steps carry ``(h, c)`` unchanged and output 0 (what Keras returns for masked
    steps of a sequence output). ``reverse``: ``go_backwards`` with the outputs put back in
    input order (what ``Bidirectional`` returns)."""
    dtype = x.dtype
    units = recurrent_kernel.shape[0]
    b = tf.shape(x)[0]
    t_len = tf.shape(x)[1]
    xw = tf.matmul(x, kernel)  # (B, T, 4U)
    if bias is not None:
        xw = xw + bias
    xw_t = tf.transpose(xw, [1, 0, 2])  # (T, B, 4U)
    m_t = tf.transpose(tf.cast(mask, dtype), [1, 0]) if mask is not None else tf.ones(tf.stack([t_len, b]), dtype)
    h0 = tf.zeros(tf.stack([b, units]), dtype)
    # a fixed-shape buffer updated per step: a loop variable that grows by concatenation
    # converts but fails at run time in LiteRT
    out0 = tf.zeros(tf.stack([t_len, b, units]), dtype)

    def step(i, h, c, out):
        t = t_len - 1 - i if reverse else i
        z = tf.gather(xw_t, t) + tf.matmul(h, recurrent_kernel)
        zi, zf, zc, zo = tf.split(z, 4, axis=-1)
        ig, fg, og = recurrent_activation(zi), recurrent_activation(zf), recurrent_activation(zo)
        c_new = fg * c + ig * activation(zc)
        h_new = og * activation(c_new)
        m = tf.expand_dims(tf.gather(m_t, t), -1)  # (B, 1)
        h = m * h_new + (1.0 - m) * h
        c = m * c_new + (1.0 - m) * c
        out = tf.tensor_scatter_nd_update(out, tf.reshape(t, [1, 1]), tf.expand_dims(m * h_new, 0))
        return i + 1, h, c, out

    _, _, _, out = tf.while_loop(lambda i, *_: i < t_len, step, [tf.constant(0), h0, h0, out0])
    return tf.transpose(out, [1, 0, 2])


def _value(v, dtype):
    """A Keras variable of either flavour as a tensor of ``dtype``."""
    return None if v is None else tf.cast(tf.convert_to_tensor(v), dtype)


def _supported_lstm(lstm) -> bool:
    cell = lstm.cell
    return (lstm.return_sequences and not getattr(lstm, "return_state", False) and not lstm.stateful
            and not getattr(cell, "dropout", 0) and not getattr(cell, "recurrent_dropout", 0)
            and getattr(cell, "implementation", 2) in (1, 2))


def _run_lstm(lstm, x, mask):
    cell = lstm.cell
    return lstm_sequence(x, mask, _value(cell.kernel, x.dtype), _value(cell.recurrent_kernel, x.dtype),
                         _value(cell.bias if cell.use_bias else None, x.dtype), cell.activation,
                         cell.recurrent_activation, reverse=bool(lstm.go_backwards))


def _bidirectional_call(self, inputs, mask=None, training=None, initial_state=None, constants=None, **kw):
    f = _run_lstm(self.forward_layer, inputs, mask)
    b = _run_lstm(self.backward_layer, inputs, mask)
    if self.merge_mode == "concat":
        return tf.concat([f, b], -1)
    if self.merge_mode == "sum":
        return f + b
    if self.merge_mode == "ave":
        return (f + b) / 2
    if self.merge_mode == "mul":
        return f * b
    raise NotImplementedError(f"merge_mode {self.merge_mode}")


def _lstm_call(self, inputs, mask=None, training=None, initial_state=None, **kw):
    return _run_lstm(self, inputs, mask)


@_rewrite("lstm_loop")
def lstm_loop(model, keras, flavour):
    undos = []
    wrapped = set()
    for layer in walk(model):
        if (isinstance(layer, keras.layers.Bidirectional) and isinstance(layer.forward_layer, keras.layers.LSTM)
                and layer.merge_mode in ("concat", "sum", "ave", "mul")
                and _supported_lstm(layer.forward_layer) and _supported_lstm(layer.backward_layer)):
            undos.append(_patch(layer, "call", types.MethodType(_bidirectional_call, layer)))
            wrapped.update({id(layer.forward_layer), id(layer.backward_layer)})
    for layer in walk(model):
        if isinstance(layer, keras.layers.LSTM) and id(layer) not in wrapped and _supported_lstm(layer):
            undos.append(_patch(layer, "call", types.MethodType(_lstm_call, layer)))
    return _undo_all(undos)


# ---------------------------------------------------------------- Embedding (Keras 3)

def _embedding_gather_call(self, inputs):
    """Keras 3 ``Embedding.call`` without the negative-index wrap of ``ops.take``."""
    ids = inputs if inputs.dtype in (tf.int32, tf.int64) else tf.cast(inputs, tf.int32)
    return tf.cast(tf.gather(tf.convert_to_tensor(self.embeddings), ids), self.compute_dtype)


@_rewrite("embedding_gather")
def embedding_gather(model, keras, flavour):
    if flavour != "3":
        return None
    undos = [_patch(layer, "call", types.MethodType(_embedding_gather_call, layer))
             for layer in walk(model)
             if type(layer) is keras.layers.Embedding and getattr(layer, "quantization_mode", None) is None
             and not getattr(layer, "lora_enabled", False)]
    return _undo_all(undos)

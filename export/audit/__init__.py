"""Checks of untrusted model files before anything loads or runs them.

* ``onnx``: an ONNX graph from its bytes, with a small protobuf reader (no ``import onnx``,
  which costs 0.7 s): op allow-list, control flow with bounded trip counts, initializer
  sizes, external data, the I/O signature, the embedding's rows and the precision; plus,
  where ``onnx`` is loaded anyway (export, verify), shape inference with the inputs at their
  caps to refuse shapes that expand past a limit.
* ``savedmodel``: a SavedModel directory without loading it: every file regular (no link,
  FIFO or device), only the files TensorFlow writes, and every op of every function in an
  allow-list of what probattn's own exports hold (no file I/O, no Python, no dataset ops).
* ``archive``: a ``.keras`` zip (entry sizes and ratios before extraction, names, links)
  and a Keras ``.h5`` file (attribute and dataset sizes before reading them).

Every refusal is a ``UsageError``: one line naming what was found and what is allowed.
"""

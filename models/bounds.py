"""Upper bounds of the training settings and of one text, with their reasons (constants
only: the CLI and ``predict`` read them without importing the training or data code)."""

#: Embedding dims: 4,096 is 64 times the default and keeps a 2 M-word embedding table within
#: 32 GB. Epochs: early stopping ends real runs within tens. Training batch: 65,536 texts x
#: the longest max length stays within 2**31 ids (what int32 indexing allows).
MAX_EMBEDDING_DIM = 4096
MAX_HIDDEN_UNITS = 65_536
MAX_EPOCHS = 10_000
MAX_TRAIN_BATCH = 65_536
#: Training texts kept in a run as ``calibration.jsonl`` (full-int8 calibration at export).
CALIBRATION_MAX_TEXTS = 400
#: Longest text accepted from a user file, in characters. Longer ones are almost always a
#: broken file (a missing newline or quote); they are refused rather than truncated.
MAX_TEXT_CHARS = 100_000

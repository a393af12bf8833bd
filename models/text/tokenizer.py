"""Word-level tokenizer saved as a Hugging Face ``tokenizer.json``.

Any ``tokenizers`` binding (Python, Rust, Node) loads the file. Pad id 0, unknown id 1.
Padding is done here, to the longest text of each batch, so every runtime sees the same ids.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UsageError, one_line

PAD_TOKEN, UNK_TOKEN = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1


def train_tokenizer(texts, vocab_size: int = 20000, max_length: int = 64):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer

    tok = Tokenizer(WordLevel(unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = WordLevelTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN, UNK_TOKEN],
                               show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(PAD_TOKEN) == PAD_ID and tok.token_to_id(UNK_TOKEN) == UNK_ID
    tok.enable_truncation(max_length=max_length)
    tok.no_padding()
    return tok


def load_tokenizer(path):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side reports parse errors as plain Exception
        raise UsageError(f"{path} is not a valid tokenizer.json ({one_line(e, 160)})") from None
    if tok.token_to_id(PAD_TOKEN) != PAD_ID or tok.token_to_id(UNK_TOKEN) != UNK_ID:
        raise UsageError(
            f"{path}: expected {PAD_TOKEN}=0 and {UNK_TOKEN}=1, found "
            f"{tok.token_to_id(PAD_TOKEN)} and {tok.token_to_id(UNK_TOKEN)}"
        )
    return tok


def encode(tokenizer, texts, max_length=None) -> np.ndarray:
    """Token ids ``int32 [batch, longest]``, right-padded with 0. Empty texts give one pad."""
    enc = tokenizer.encode_batch(list(texts))
    rows = [e.ids if max_length is None else e.ids[:max_length] for e in enc]
    width = max(1, max((len(r) for r in rows), default=1))
    out = np.zeros((len(rows), width), dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def encode_fixed(tokenizer, texts, length: int) -> np.ndarray:
    """Token ids padded or truncated to exactly ``length`` steps (for training batches)."""
    ids = encode(tokenizer, texts, max_length=length)
    if ids.shape[1] < length:
        ids = np.pad(ids, ((0, 0), (0, length - ids.shape[1])))
    return ids

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
#: (pad, unknown) token pairs a bundle's vocabulary may hold at ids 0 and 1
SPECIAL_TOKENS = ((PAD_TOKEN, UNK_TOKEN),)
#: regexes of the project's own tokenizers (``Split`` / ``Replace`` patterns): the only ones
#: a tokenizer.json may use, besides a single character class (see ``tokenizer_guard``)
SPLIT_PATTERNS = frozenset()
#: the longest ``max_length`` anywhere (training, a manifest, a tokenizer's truncation):
#: 32,768 tokens is 128 times the longest default and keeps one training batch of 32 texts
#: at 8.4 M ids
MAX_LENGTH_LIMIT = 32_768


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


def load_tokenizer(path, max_length: int | None = None, vocab_size: int | None = None, notes: list | None = None):
    """A tokenizer from a ``tokenizer.json`` path (or its bytes), made safe first
    (``tokenizer_guard.sanitize``): padding off, truncation at ``max_length`` (default: the
    file's own), a WordLevel vocabulary of at most ``vocab_size`` ids, no regex but the
    project's. ``notes`` collects what was changed."""
    from .tokenizer_guard import MAX_TOKENIZER_BYTES, from_sanitized, sanitize

    if isinstance(path, (bytes, bytearray)):
        data, what = bytes(path), "tokenizer.json"
    else:
        from ..fsutil import read_regular

        path = Path(path)
        if not path.exists() and not path.is_symlink():
            raise UsageError(f"tokenizer file not found: {path}")
        data, what = read_regular(path, MAX_TOKENIZER_BYTES, what="tokenizer file"), str(path)
    text, changed = sanitize(data, max_length=max_length, vocab_size=vocab_size, what=what)
    if notes is not None:
        notes.extend(changed)
    return from_sanitized(text, what)


def encode(tokenizer, texts, max_length=None) -> np.ndarray:
    """Token ids ``int32 [batch, longest]``, right-padded with 0. Empty texts give one pad.
    Texts longer than ``MAX_TEXT_CHARS`` are refused; a tokenizer panic is a one-line error."""
    from .data import MAX_TEXT_CHARS
    from .tokenizer_guard import is_panic

    texts = list(texts)
    for i, t in enumerate(texts):
        if type(t) is not str:
            raise UsageError(f"text {i} is {type(t).__name__}; texts must be str")
        if len(t) > MAX_TEXT_CHARS:
            raise UsageError(f"text {i} has {len(t):,} characters; at most {MAX_TEXT_CHARS:,} allowed")
    try:
        enc = tokenizer.encode_batch(texts)
    except Exception as e:
        raise UsageError(f"the tokenizer failed: {one_line(e, 200)}") from None
    except BaseException as e:  # pyo3's PanicException is a BaseException
        if is_panic(e):
            raise UsageError(f"the tokenizer panicked: {one_line(e, 200)}") from None
        raise
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

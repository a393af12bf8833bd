"""Full-int8 calibration: the id batches the converter measures activation ranges on.

The ranges must cover every length the model will see, or int8 clips what it never saw:
calibrating on texts at their natural lengths only left the attention tensor a range too
narrow for one- and two-token texts (a 1-token text pooled only a third of its embedding),
and without rows longer than the training length the attention mass saturates on long
inputs. So the batches hold, each padded to its longest row as at run time:

1. up to ``CALIBRATION_MAX_TEXTS`` real training texts at their own length (<= max_length);
2. the same texts cut to a length drawn log-uniformly from 1 to max_length;
3. one-token and two-token rows (``SHORT_ROWS`` texts each);
4. up to ``LONG_ROWS`` rows longer than the training length: consecutive training texts
   joined to a length drawn uniformly from max_length+1 to 4 x max_length.
"""
from __future__ import annotations

import numpy as np

from probattn.models.text.tokenizer import PAD_ID
from probattn.models.bounds import CALIBRATION_MAX_TEXTS

#: rows per calibration batch (each batch padded to its longest row)
CALIBRATION_BATCH = 4
SHORT_ROWS = 100
LONG_ROWS = 40


def _token_rows(tokenizer, texts, cap) -> list:
    """Token ids without the tokenizer's own truncation, cut at ``cap``."""
    trunc = tokenizer.truncation
    tokenizer.no_truncation()
    try:
        return [list(e.ids[:cap]) for e in tokenizer.encode_batch(list(texts))]
    finally:
        if trunc:
            tokenizer.enable_truncation(max_length=trunc["max_length"])


def _batches(rows, size=CALIBRATION_BATCH) -> list:
    out = []
    for i in range(0, len(rows), size):
        chunk = rows[i:i + size]
        a = np.full((len(chunk), max(1, max(len(r) for r in chunk))), PAD_ID, np.int32)
        for j, r in enumerate(chunk):
            a[j, :len(r)] = r
        out.append(a)
    return out


def calibration_rows(texts, tokenizer, max_length: int, seed: int = 0) -> list:
    """The calibration rows of the module docstring, as groups of id lists: real texts,
    cut texts, one-token rows, two-token rows, rows longer than the training length."""
    rng = np.random.default_rng(seed)
    texts = [t for t in texts if t.strip()][:CALIBRATION_MAX_TEXTS]
    full = [r for r in _token_rows(tokenizer, texts, 4 * max_length) if r]
    rows = [r[:max_length] for r in full]
    cut = []
    for r in rows:
        length = int(np.clip(np.round(np.exp(rng.uniform(0, np.log(max_length)))), 1, max_length))
        cut.append(r[:length])
    groups = [rows, cut]
    for length in (1, 2):
        groups.append([r[:length] for r in rows[:SHORT_ROWS] if len(r) >= length])
    joined, acc = [], []
    for r in full:
        acc = acc + r
        if len(acc) > max_length:
            joined.append(acc[:int(rng.integers(max_length + 1, 4 * max_length + 1))])
            acc = []
    groups.append(joined[:LONG_ROWS])
    return groups


def calibration_batches(texts, tokenizer, max_length: int, seed: int = 0, fixed_length: int | None = None) -> list:
    """int32 id batches for full-int8 calibration (see the module docstring).
    ``fixed_length``: the model's own input length (``Input(shape=(n,))``, then also
    ``max_length``): every batch is padded to it and rows longer than it, which such a
    model never sees, are left out (as in ``calibration_fixed``)."""
    groups = calibration_rows(texts, tokenizer, max_length, seed)
    if not fixed_length:
        return [b for group in groups for b in _batches(group)]
    out = []
    for group in groups:
        for b in _batches([r for r in group if len(r) <= fixed_length]):
            a = np.full((b.shape[0], fixed_length), PAD_ID, np.int32)
            a[:, :b.shape[1]] = b
            out.append(a)
    return out


def calibration_fixed(texts, tokenizer, length: int, max_length: int | None = None, seed: int = 0) -> list:
    """The same rows for a fixed-shape ``[1, length]`` input: each row alone, right-padded
    to ``length``; rows longer than ``length`` cannot be fed and are left out (the file
    never sees them either). ``max_length``: the training length the rows are drawn for."""
    out = []
    for group in calibration_rows(texts, tokenizer, max_length or length, seed):
        for r in group:
            if len(r) <= length:
                a = np.full((1, length), PAD_ID, np.int32)
                a[0, :len(r)] = r
                out.append(a)
    return out

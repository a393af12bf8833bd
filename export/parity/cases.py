"""Case families: the inputs every artifact runs, built from real held-out texts (or, with
no texts at all, from generated ids) and named so a failure says which family broke.

Families (``Case.family``):

* ``heldout``: every held-out text, in batches of 64 padded to the longest (accuracy).
* ``bucket``: the held-out texts cut to each length bucket (1, 2, 3-4, 5-8, 9-16,
  17-max_length, and longer than the training length), so short texts are judged on their
  own and not averaged away by long ones; each distinct row once (cut texts repeat).
* ``padding``: the first 64 texts with padding appended on the right (``pad+k``), padded on
  the left (``left_padding``, what Keras's ``pad_sequences`` does by default), and a batch
  mixing both (``mixed_padding``); each compared with the same rows padded only to their
  longest (``Case.invariance == "pad"``).
* ``batching``: rows inside batches of 1, 7, 64 and 256 texts of mixed lengths, compared
  with each row run alone (``Case.invariance == "batch"``).
* ``edge``: a batch with an all-padding row.
* ``synthetic``: generated ids (one token, the training length, 4x it, the largest id,
  mostly unknown tokens): values are judged, decisions are not (random ids give near-ties).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from probattn.models.errors import UsageError
from probattn.models.text.tokenizer import PAD_ID, UNK_ID

#: pads appended to the first 64 texts in the right-padding families
PAD_COUNTS = (1, 7, 64)
#: held-out texts per batch (each batch padded to its longest text)
BATCH = 64
#: batch sizes of the batching family (each row is compared with itself run alone)
BATCH_SIZES = (1, 7, 64, 256)
#: texts per length bucket at most (the agreement of 1,000 texts moves in steps of 0.1%)
BUCKET_MAX_TEXTS = 1000


def length_buckets(max_length: int) -> list:
    """``(name, lowest, highest)`` token counts; ``highest`` None: longer than training."""
    edges = [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, max_length)]
    out = [(f"{lo}" if lo == hi else f"{lo}-{hi}", lo, hi) for lo, hi in edges if lo <= max_length]
    if out and out[-1][2] > max_length:
        out[-1] = (f"{out[-1][1]}-{max_length}", out[-1][1], max_length)
    out.append((f">{max_length}", max_length + 1, None))
    return out


@dataclass
class Case:
    name: str
    batches: list  # list of int32 arrays
    family: str = "heldout"
    labels: np.ndarray | None = None  # for accuracy
    base: list | None = None  # the same rows computed another way (see ``invariance``)
    invariance: str | None = None  # "pad": vs padded to their longest; "batch": vs run alone
    real: bool = False  # built from real texts (decision checks apply)
    bucket: str | None = None

    @property
    def rows(self) -> int:
        return sum(b.shape[0] for b in self.batches)


def load_texts(bundle: Path, manifest: dict, data: str | None, text_column: str = "text",
               label_column: str = "label", encoding: str = "utf-8", test_bytes: bytes | None = None):
    """Held-out texts and labels: ``--data`` (a file or dataset name), else the bundle's
    test split (``test_bytes``: its hash-checked bytes; read through ``bundle.Bundle`` when
    not given), else none: ``([], None, None)`` (verify then runs generated ids only)."""
    from probattn.models.text.data import load_dataset, load_text_file, parse_text_file, stratified_split

    if data:
        p = Path(data)
        if p.suffix.lower() in (".csv", ".jsonl") or p.exists():
            ds = load_text_file(p, text_column, label_column, encoding)
            return ds.texts, ds.labels, str(p)
        seed = int((manifest.get("source") or {}).get("seed") or 0)  # the split the run trained on
        test = stratified_split(load_dataset(data), seed=seed).test
        return test.texts, test.labels, f"{data} (test split)"
    name = manifest.get("test_data")
    if name:
        if test_bytes is None:
            from .. import bundle as B

            with B.Bundle(bundle) as b:
                test_bytes = b.test_data_bytes()
        ds = parse_text_file(test_bytes, Path(name))
        return ds.texts, ds.labels, f"bundle {name}"
    return [], None, None


def pad_right(rows, width=None) -> np.ndarray:
    width = max(1, width or max((len(r) for r in rows), default=1))
    out = np.full((len(rows), width), PAD_ID, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def pad_left(rows, width=None) -> np.ndarray:
    width = max(1, width or max((len(r) for r in rows), default=1))
    out = np.full((len(rows), width), PAD_ID, np.int32)
    for i, r in enumerate(rows):
        if len(r):
            out[i, width - len(r):] = r
    return out


def _batched(rows, size=BATCH) -> list:
    return [pad_right(rows[i:i + size]) for i in range(0, len(rows), size)]


def _alone(rows) -> list:
    return [pad_right([r]) for r in rows]


def _token_rows(tokenizer, texts) -> list:
    """Token ids of each text, untruncated, as lists."""
    return [list(e.ids) for e in tokenizer.encode_batch(list(texts))] if texts else []


def _synthetic_rows(rng, vocab, max_len, n) -> list:
    """Random ids with lengths spread from 1 to the training length."""
    lengths = np.clip(np.round(np.exp(rng.uniform(0, np.log(max_len), n))), 1, max_len).astype(int)
    return [list(rng.integers(2, vocab, k)) for k in lengths]


def build_cases(tokenizer, manifest: dict, texts, labels, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    max_len = int(manifest.get("max_length") or 64)
    vocab = int(manifest["vocab_size"])
    names = manifest["labels"]
    index = {n: i for i, n in enumerate(names)}
    texts = list(texts or [])
    real = bool(texts)
    y = None
    if labels is not None and texts:
        unknown = sorted({l for l in labels if l not in index})
        if unknown:
            print(f"note: labels {unknown[:5]} are not the bundle's {names}; accuracy is not computed",
                  file=sys.stderr)
        else:
            y = np.array([index[l] for l in labels], np.int32)
    if real:
        full = _token_rows(tokenizer, texts)
        rows = [r[:max_len] for r in full]
        keep = [i for i, r in enumerate(rows) if r]  # an empty text is the all-padding family's
        if not keep:
            raise UsageError("none of the held-out texts has a single token; pass --data with real texts")
    else:
        full = rows = _synthetic_rows(rng, vocab, max_len, 512)
        keep = list(range(len(rows)))
    cases = []
    if real:
        cases.append(Case("heldout", _batched(rows), "heldout", y, real=True))

    # length buckets: every text long enough, cut to the bucket (natural lengths where they fall in it)
    for bname, lo, hi in length_buckets(max_len):
        if hi is None:
            picked = [r[:4 * max_len] for r in full if len(r) >= lo]
            if not picked and real:  # no text is that long: join consecutive texts
                joined, cur = [], []
                for r in full:
                    cur = cur + r
                    if len(cur) >= lo:
                        joined.append(cur[:max(lo, min(len(cur), 2 * max_len))])
                        cur = []
                picked = joined
        else:
            picked = [r[:hi] for r in full if len(r) >= lo]
        # distinct rows only: texts cut to a few tokens repeat (most open with the same word),
        # and one input counted 70 times would weigh one decision 70 times
        picked = [list(r) for r in dict.fromkeys(tuple(r) for r in picked)][:BUCKET_MAX_TEXTS]
        if picked:
            cases.append(Case(f"bucket:{bname}", _batched(picked), "bucket", real=real, bucket=bname))

    base_rows = [rows[i] for i in keep[:BATCH]]
    base = [pad_right(base_rows)]
    width = base[0].shape[1]
    for k in PAD_COUNTS + (4 * max_len - width,):
        if k <= 0:
            continue
        name = f"pad+{k}" if k in PAD_COUNTS else f"pad_to_4x_max_length({4 * max_len})"
        cases.append(Case(name, [pad_right(base_rows, width + k)], "padding", base=base, invariance="pad", real=real))
    cases.append(Case("left_padding", [pad_left(base_rows, max(width, max_len))], "padding", base=base,
                      invariance="pad", real=real))
    mixed = pad_right(base_rows, width + 7)
    for i in range(0, len(base_rows), 2):
        mixed[i] = pad_left([base_rows[i]], width + 7)[0]
    cases.append(Case("mixed_padding", [mixed], "padding", base=base, invariance="pad", real=real))
    for size in BATCH_SIZES:
        picked = [rows[i] for i in keep[:size]]
        if size > 1 and len(picked) < 2:
            continue
        if size == 1:
            cases.append(Case("batch_1", [pad_right(picked)], "batching", real=real))
        else:
            cases.append(Case(f"batch_{size}", [pad_right(picked)], "batching", base=_alone(picked),
                              invariance="batch", real=real))
    allpad = np.concatenate([base[0][:7], np.full((1, width), PAD_ID, np.int32)])
    cases.append(Case("all_padding_row", [allpad], "edge", real=real))

    cases.append(Case("length_1", [rng.integers(2, vocab, (32, 1), dtype=np.int32)], "synthetic"))
    cases.append(Case("max_length", [rng.integers(2, vocab, (16, max_len), dtype=np.int32)], "synthetic"))
    cases.append(Case("4x_max_length", [rng.integers(2, vocab, (8, 4 * max_len), dtype=np.int32)], "synthetic"))
    big = rng.integers(2, vocab, (8, 16), dtype=np.int32)
    big[:, ::3] = vocab - 1
    cases.append(Case("largest_id", [big], "synthetic"))
    unk = rng.integers(2, vocab, (16, 24), dtype=np.int32)
    unk[rng.random(unk.shape) < 0.8] = UNK_ID
    cases.append(Case("unknown_heavy", [unk], "synthetic"))
    return cases

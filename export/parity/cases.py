"""Case families: the inputs every artifact runs, built from real held-out texts and
from generated ids."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from probattn.models.errors import UsageError
from probattn.models.text.tokenizer import PAD_ID, UNK_ID, encode

#: pads appended to the first 64 real texts in the padding-invariance families
PAD_COUNTS = (1, 7, 64)
#: held-out texts per batch (each batch padded to its longest text)
BATCH = 64


@dataclass
class Case:
    name: str
    batches: list  # list of int32 arrays
    labels: np.ndarray | None = None  # for accuracy
    base: list | None = None  # unpadded batches for padding-invariance families
    real: bool = False  # built from real texts (decision checks apply)


def load_texts(bundle: Path, manifest: dict, data: str | None, text_column: str = "text",
               label_column: str = "label", encoding: str = "utf-8"):
    """Held-out texts and labels: ``--data`` (a file or dataset name) or the bundle's test split."""
    from probattn.models.text.data import load_dataset, load_text_file, stratified_split

    if data:
        p = Path(data)
        if p.suffix.lower() in (".csv", ".jsonl") or p.exists():
            ds = load_text_file(p, text_column, label_column, encoding)
            return ds.texts, ds.labels, str(p)
        seed = int((manifest.get("source") or {}).get("seed") or 0)  # the split the run trained on
        test = stratified_split(load_dataset(data), seed=seed).test
        return test.texts, test.labels, f"{data} (test split)"
    name = manifest.get("test_data")
    if name and (bundle / name).is_file():
        ds = load_text_file(bundle / name)
        return ds.texts, ds.labels, f"bundle {name}"
    raise UsageError(f"{bundle} has no test split; pass --data FILE or a dataset name")


def build_cases(tokenizer, manifest: dict, texts, labels, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    max_len = int(manifest.get("max_length") or 64)
    vocab = int(manifest["vocab_size"])
    names = manifest["labels"]
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({l for l in labels if l not in index})
    y = None
    if labels is not None and not unknown:
        y = np.array([index[l] for l in labels], np.int32)
    elif unknown:
        print(f"note: labels {unknown[:5]} are not the bundle's {names}; accuracy is not computed",
              file=sys.stderr)
    texts = list(texts)
    heldout = [encode(tokenizer, texts[i:i + BATCH], max_len) for i in range(0, len(texts), BATCH)]
    cases = [Case("heldout", heldout, y, real=True)]
    base = heldout[:1]  # first 64 real texts, padded to their longest
    for k in PAD_COUNTS + (4 * max_len - base[0].shape[1],):
        if k <= 0:
            continue
        padded = [np.pad(b, ((0, 0), (0, k))) for b in base]
        name = f"pad+{k}" if k in PAD_COUNTS else f"pad_to_4x_max_length({4 * max_len})"
        cases.append(Case(name, padded, base=base, real=True))
    allpad = np.concatenate([base[0][:7], np.full((1, base[0].shape[1]), PAD_ID, np.int32)])
    cases.append(Case("all_padding_row", [allpad], real=True))
    cases.append(Case("length_1", [rng.integers(2, vocab, (32, 1), dtype=np.int32)]))
    cases.append(Case("max_length", [rng.integers(2, vocab, (16, max_len), dtype=np.int32)]))
    cases.append(Case("4x_max_length", [rng.integers(2, vocab, (8, 4 * max_len), dtype=np.int32)]))
    cases.append(Case("batch_1", [heldout[0][:1]], real=True))
    cases.append(Case("batch_64", [heldout[0][:64]], real=True))
    big = rng.integers(2, vocab, (8, 16), dtype=np.int32)
    big[:, ::3] = vocab - 1
    cases.append(Case("largest_id", [big]))
    unk = rng.integers(2, vocab, (16, 24), dtype=np.int32)
    unk[rng.random(unk.shape) < 0.8] = UNK_ID
    cases.append(Case("unknown_heavy", [unk]))
    return cases

"""Speed of the text path: Hugging Face tokenizers vs probattn's pure-Python fast path on a
bundle's portable tokenizer, alone and inside ``Predictor.predict`` (onnxruntime fp32).
The fast path is timed text by text (``encode_batch``), padded batch by batch (64 texts,
each batch scanned as one string) and window by window (1,024 texts scanned together, then
cut into the batches of ``predict.batch_plan``: what bulk ``predict`` does).

usage: python scripts/bench_tokenizers.py BUNDLE [--texts FILE|DATASET] [--repeats 5]

Texts: the bundle's test split, or a .txt file (one per line), or a bundled dataset name.
Each figure is the median of --repeats runs over all texts (after one warm-up run).
tokenizers uses its default thread pool (RAYON_NUM_THREADS=1 for one thread).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def _median_s(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    from probattn.export.predict import Predictor

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--texts", help="a .txt file (one text per line) or a dataset name (default: the test split)")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    if a.texts is None:
        texts = [json.loads(l)["text"] for l in (a.bundle / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    elif Path(a.texts).is_file():
        texts = Path(a.texts).read_text(encoding="utf-8").splitlines()
    else:
        from probattn.models.text.data import load_dataset

        texts = load_dataset(a.texts, quiet=True).texts
    p = Predictor(a.bundle)
    if p.fast is None:
        sys.exit(f"{a.bundle}: the tokenizer is not a kind the fast path reproduces; there is no fast path to compare")
    hf = p.tokenizer
    n = len(texts)
    rows = {
        "tokenizers encode_batch": _median_s(lambda: hf.encode_batch(texts), a.repeats),
        "fast path encode_batch": _median_s(lambda: p.fast.encode_batch(texts), a.repeats),
    }
    from probattn.export.predict import batch_plan

    batches = [texts[i:i + 64] for i in range(0, n, 64)]
    windows = [texts[i:i + 1024] for i in range(0, n, 1024)]
    plans = [batch_plan(w, 64) for w in windows]
    rows["fast path, batches of 64"] = _median_s(lambda: [p.fast.encode_padded(b, p.max_length) for b in batches],
                                                 a.repeats)
    rows["fast path, windows of 1,024"] = _median_s(
        lambda: [p.fast.encode_plan(w, plan, p.max_length) for w, plan in zip(windows, plans)], a.repeats)
    fast = p.fast
    rows["Predictor.predict, fast path"] = _median_s(lambda: p.predict(texts), a.repeats)
    p.fast = None  # the same Predictor on tokenizers
    rows["Predictor.predict, tokenizers"] = _median_s(lambda: p.predict(texts), a.repeats)
    p.fast = fast
    print(f"{n:,} texts, {sum(map(len, texts)) / n:.0f} characters on average, "
          f"RAYON_NUM_THREADS={os.environ.get('RAYON_NUM_THREADS', 'default')}, load average {os.getloadavg()[0]:.2f}")
    for name, s in rows.items():
        print(f"  {name:<32} {1e6 * s / n:8.1f} us/text  {n / s:10,.0f} texts/s")
    tok = rows["tokenizers encode_batch"] / rows["fast path encode_batch"]
    end = rows["Predictor.predict, tokenizers"] / rows["Predictor.predict, fast path"]
    win = rows["tokenizers encode_batch"] / rows["fast path, windows of 1,024"]
    print(f"  fast path: tokenizing {tok:.1f}x faster text by text, {win:.1f}x in windows; "
          f"predict end to end {end:.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run a probattn bundle's ONNX model with nothing but onnxruntime, numpy and tokenizers.

    python scripts/onnx_standalone.py BUNDLE "a text" "another text"

The bundle's contract: tokenizer.json (pad id 0), input ``token_ids`` int32
[batch, sequence] right-padded with 0, output ``probabilities`` [batch, classes] in the
order of manifest.json's ``labels``. Nothing of probattn is imported here.
"""
import json
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def main(bundle, texts):
    manifest = json.load(open(f"{bundle}/manifest.json"))
    tokenizer = Tokenizer.from_file(f"{bundle}/tokenizer.json")  # truncates at max_length
    session = ort.InferenceSession(f"{bundle}/model_fp32.onnx", providers=["CPUExecutionProvider"])
    rows = [e.ids for e in tokenizer.encode_batch(texts)]
    ids = np.zeros((len(rows), max(1, max(map(len, rows)))), dtype=np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    (probs,) = session.run(["probabilities"], {"token_ids": ids})
    for text, p in zip(texts, probs):
        print(f"{manifest['labels'][int(p.argmax())]}\t{p.max():.3f}\t{text}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python scripts/onnx_standalone.py BUNDLE TEXT [TEXT ...]")
    main(sys.argv[1], sys.argv[2:])

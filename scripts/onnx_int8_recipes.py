"""ONNX int8 recipes measured against the fp32 file they are made from: size, accuracy and
speed on the bare onnxruntime session, interleaved in one process.

    source scripts/env.sh; python scripts/onnx_int8_recipes.py BUNDLE [--rounds N] [--recipes a,b,...]

Each recipe is ``onnxruntime.quantization.quantize_dynamic`` on the bundle's
``model_fp32.onnx`` with other options; ``shipped`` is the exporter's own ``convert_int8``
(whatever this checkout ships). Accuracy: the bundle's test texts (cut to the training
length, batches of 64 padded to their longest, as ``verify``'s ``heldout`` family) on
each file against the Keras model (``model.keras`` called directly): top-1 agreement,
accuracy, max abs error of the probabilities and of the attention weights.
Speed: real token ids (``graph_compare.py``'s rows: the test texts tokenized into one
stream, cut into rows of seeded random lengths from T/4 to T, right-padded) at each shape
``BATCHxT``, onnxruntime with 1 intra-op thread and with its defaults; each round runs
every (shape, threads) pair on fp32 and every recipe in a shuffled order, enough calls
for about 5 ms each. The table gives fp32's median ms per call and, for each recipe,
fp32 / recipe of the medians and the median of each round's ratio (paired: a slow stretch
of the shared machine hits both sides alike); above 1 is faster than fp32.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from probattn.models.errors import UsageError, one_line

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_compare import interleaved_rounds, token_rows, token_stream  # noqa: E402

FP32 = "fp32"
SHAPES = "1x24,1x64,32x64,256x64,64x512"
#: about this many seconds of calls per (shape, threads, file) in a round
BLOCK_SECONDS = 0.005


def _quantize(fp32_path: Path, out: Path, **kw) -> None:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    kw.setdefault("weight_type", QuantType.QInt8)
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(str(fp32_path), str(out), **kw)
    finally:
        logging.disable(logging.NOTSET)


def _recipes() -> dict:
    """name -> (what it is, function(fp32_path, out_path))."""
    import onnx
    from onnxruntime.quantization import QuantType

    from probattn.export.formats import onnx as O

    def tables(path):  # Gathers of a float table with one value per id: the float graph's score table
        m = onnx.load(str(path))
        rank1 = {i.name for i in m.graph.initializer if len(i.dims) == 1 and i.data_type == onnx.TensorProto.FLOAT}
        return [n.name for n in m.graph.node if n.op_type == "Gather" and n.input[0] in rank1]

    return {
        "shipped": ("the exporter's convert_int8 (this checkout)", O.convert_int8),
        "matmul+gathers": ("MatMul and every Gather; QInt8 weights, reduce_range (the exporter's previous recipe)",
                           lambda i, o: _quantize(i, o, reduce_range=True, op_types_to_quantize=["MatMul", "Gather"])),
        "matmul": ("MatMul only, every Gather float; QInt8, reduce_range",
                   lambda i, o: _quantize(i, o, reduce_range=True, op_types_to_quantize=["MatMul"])),
        "matmul+embedding": ("MatMul and the embedding Gather, the score table float; QInt8, reduce_range",
                             lambda i, o: _quantize(i, o, reduce_range=True, op_types_to_quantize=["MatMul", "Gather"],
                                                    nodes_to_exclude=tables(i))),
        "matmul-pc+embedding": ("as matmul+embedding with per-channel MatMul weights",
                                lambda i, o: _quantize(i, o, reduce_range=True, per_channel=True,
                                                       op_types_to_quantize=["MatMul", "Gather"],
                                                       nodes_to_exclude=tables(i))),
        "matmul-u8+embedding": ("as matmul+embedding with QUInt8 MatMul weights, full 8 bit",
                                lambda i, o: _quantize(i, o, weight_type=QuantType.QUInt8,
                                                       op_types_to_quantize=["MatMul", "Gather"],
                                                       nodes_to_exclude=tables(i))),
        "gathers": ("every Gather, every MatMul float",
                    lambda i, o: _quantize(i, o, op_types_to_quantize=["Gather"])),
        "embedding": ("the embedding Gather only: the score table and every MatMul float",
                      lambda i, o: _quantize(i, o, op_types_to_quantize=["Gather"], nodes_to_exclude=tables(i))),
    }


def quantized_ops(path: Path) -> str:
    """What the file holds: its quantized op types and Gathers of 8-bit tables, counted."""
    import collections

    import onnx
    from onnx import TensorProto

    m = onnx.load(str(path))
    ints = {i.name for i in m.graph.initializer if i.data_type in (TensorProto.INT8, TensorProto.UINT8)}
    c = collections.Counter()
    for n in m.graph.node:
        if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear", "DequantizeLinear"):
            c[n.op_type] += 1
        elif n.op_type == "Gather" and n.input[0] in ints:
            c["Gather (8-bit table)"] += 1
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(c.items())) or "none"


def heldout_batches(bundle: Path):
    """The test texts cut to the training length, in batches of 64 padded to their longest,
    with their label indices (``verify``'s heldout family)."""
    from probattn.export import bundle as B
    from probattn.models.text.data import parse_text_file

    with B.Bundle(bundle) as b:
        manifest = b.manifest
        tok = b.tokenizer()
        data = b.test_data_bytes()
        if data is None:
            raise UsageError(f"{bundle} has no test split: the accuracy columns need the bundle's test texts")
        ds = parse_text_file(data, Path(manifest["test_data"]))
    tok.no_truncation()
    max_len = int(manifest["max_length"])
    index = {n: i for i, n in enumerate(manifest["labels"])}
    rows, labels = [], []
    for enc, label in zip(tok.encode_batch(list(ds.texts)), ds.labels):
        ids = list(enc.ids)[:max_len]
        if ids:
            rows.append(ids)
            labels.append(index[label])
    batches = []
    for i in range(0, len(rows), 64):
        chunk = rows[i:i + 64]
        arr = np.zeros((len(chunk), max(map(len, chunk))), np.int32)
        for r, ids in enumerate(chunk):
            arr[r, :len(ids)] = ids
        batches.append(arr)
    return batches, np.array(labels), int(manifest["vocab_size"])


def keras_outputs(bundle: Path, batches, vocab: int) -> list:
    from probattn.export.runtimes.keras import KerasRunner

    with KerasRunner(str(bundle / "model.keras"), vocab_size=vocab, threads=1) as r:
        return [r.infer(ids) for ids in batches]


def accuracy(session, batches, labels, ref) -> dict:
    names = [o.name for o in session.get_outputs()]
    agree, right, n, perr, aerr = 0, 0, 0, 0.0, 0.0
    for ids, want in zip(batches, ref):
        got = dict(zip(names, session.run(None, {"token_ids": ids})))
        p, q = got["probabilities"], want["probabilities"]
        agree += int(np.sum(p.argmax(-1) == q.argmax(-1)))
        right += int(np.sum(p.argmax(-1) == labels[n:n + len(ids)]))
        n += len(ids)
        perr = max(perr, float(np.max(np.abs(p - q))))
        if "attention_weights" in got:
            aerr = max(aerr, float(np.max(np.abs(got["attention_weights"] - want["attention_weights"]))))
    return {"agreement": agree / n, "accuracy": right / n, "prob_err": perr, "attention_err": aerr, "texts": n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--recipes", help="comma list (default: all): " + ", ".join(
        ["shipped", "matmul+gathers", "matmul", "matmul+embedding", "matmul-pc+embedding", "matmul-u8+embedding",
         "gathers", "embedding"]))
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--keep", type=Path, help="write the recipe files here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"onnx_int8_recipes.py: error: {one_line(e)}", file=sys.stderr)
        return 2


def run(args) -> int:
    import onnxruntime as ort

    for name in ("model_fp32.onnx", "model.keras", "manifest.json"):
        if not (args.bundle / name).is_file():
            raise UsageError(f"{args.bundle / name} not found: BUNDLE must be a bundle with {name}")
    fp32_path = args.bundle / "model_fp32.onnx"
    known = _recipes()
    chosen = list(known) if not args.recipes else [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not chosen:
        raise UsageError(f"--recipes names no recipe; known: {', '.join(known)}")
    bad = [r for r in chosen if r not in known]
    if bad:
        raise UsageError(f"unknown recipe {bad[0]!r}; known: {', '.join(known)}")
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        if any(len(s) != 2 or min(s) < 1 for s in shapes):
            raise ValueError
    except ValueError:
        raise UsageError(f"--shapes takes BATCHxLENGTH,... (positive integers); received {args.shapes!r}") from None
    if args.rounds < 1:
        raise UsageError(f"--rounds must be at least 1; received {args.rounds}")
    with tempfile.TemporaryDirectory(prefix="probattn-int8-recipes-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        files = {FP32: fp32_path}
        for name in chosen:
            print(f"quantizing ({name}) ...", file=sys.stderr, flush=True)
            files[name] = folder / f"model_int8_{name.replace('+', '_')}.onnx"
            known[name][1](fp32_path, files[name])
        batches, labels, vocab = heldout_batches(args.bundle)
        print("Keras reference ...", file=sys.stderr, flush=True)
        ref = keras_outputs(args.bundle, batches, vocab)
        one = ort.SessionOptions()
        one.intra_op_num_threads = 1
        one.inter_op_num_threads = 1
        sessions = {}
        for name, path in files.items():
            sessions[(name, "1 thread")] = ort.InferenceSession(str(path), one, providers=["CPUExecutionProvider"])
            sessions[(name, "default")] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        rows = {name: {"file": path.name, "bytes": path.stat().st_size, "ops": quantized_ops(path),
                       **accuracy(sessions[(name, "1 thread")], batches, labels, ref)}
                for name, path in files.items()}
        stream = token_stream(args.bundle)
        inputs = {shape: token_rows(stream, *shape) for shape in shapes}
        keys = [(shape, threads) for shape in shapes for threads in ("1 thread", "default")]
        calls = {}
        for key in keys:  # warm-up, and calls per block from fp32's time
            ids = inputs[key[0]]
            for name in files:
                for _ in range(3):
                    sessions[(name, key[1])].run(None, {"token_ids": ids})
            t = time.perf_counter()
            sessions[(FP32, key[1])].run(None, {"token_ids": ids})
            calls[key] = max(3, math.ceil(BLOCK_SECONDS / max(time.perf_counter() - t, 1e-6)))
        times = interleaved_rounds(keys, list(files),
                                   lambda key, name: sessions[(name, key[1])].run(None, {"token_ids": inputs[key[0]]}),
                                   calls.get, args.rounds)
    speed = []
    for key in keys:
        base = times[(key, FP32)]
        row = {"shape": f"{key[0][0]}x{key[0][1]}", "threads": key[1], "fp32_ms": statistics.median(base),
               "calls": calls[key], "recipes": {}}
        for name in chosen:
            t = times[(key, name)]
            row["recipes"][name] = {"ms": statistics.median(t),
                                    "medians": statistics.median(base) / statistics.median(t),
                                    "paired": statistics.median(b / x for b, x in zip(base, t))}
        speed.append(row)

    print(f"Size and accuracy ({rows[FP32]['texts']} test texts, against model.keras):\n")
    print("| recipe | what is quantized | file ops | size | vs fp32 | top-1 agreement | accuracy "
          "| max abs error (probabilities) | max abs error (attention weights) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in files:
        x = rows[name]
        what = "nothing" if name == FP32 else known[name][0]
        print(f"| {name} | {what} | {x['ops']} | {x['bytes'] / 1e6:.3f} MB | "
              f"{x['bytes'] / rows[FP32]['bytes']:.0%} | {x['agreement']:.2%} | {x['accuracy']:.4f} | "
              f"{x['prob_err']:.2e} | {x['attention_err']:.2e} |")
    print(f"\nSpeed over fp32 (fp32 ms / recipe ms; above 1 is faster), {args.rounds} rounds, "
          "paired (median of each round's ratio) / of the medians:\n")
    print("| shape | threads | fp32 ms | " + " | ".join(chosen) + " |")
    print("|---|---|---|" + "---|" * len(chosen))
    for row in speed:
        cells = [f"{row['recipes'][n]['paired']:.2f}x / {row['recipes'][n]['medians']:.2f}x" for n in chosen]
        print(f"| {row['shape']} | {row['threads']} | {row['fp32_ms']:.3f} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "recipes": {n: known[n][0] for n in chosen},
                                         "files": rows, "speed": speed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

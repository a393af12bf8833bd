"""Speed of the exported graph: the float graph (the default) against the int8-safe graph
(``--one-graph``), the same model, on the bare runtimes, interleaved in one process.

    source scripts/env.sh; python scripts/graph_compare.py RUN_DIR [--rounds N] [--calls N]
    python scripts/graph_compare.py --bundles ONE_GRAPH_BUNDLE FLOAT_GRAPH_BUNDLE

RUN_DIR is exported twice into a temporary folder (ONNX and TFLite, fp32), once with
``--one-graph``. Inputs are real token ids: the bundle's test texts tokenized (no
truncation) into one stream, cut into rows of seeded random lengths between T/4 and T and
right-padded to T, at each shape ``BATCHxT`` (default 256x64 and 64x512). Runtimes:
onnxruntime on 1 thread, onnxruntime with its defaults, LiteRT with its defaults
(XNNPACK). Each round runs every (shape, runtime) pair on both graphs in a shuffled order,
``--calls`` calls each; the table gives the median ms per call over rounds, the ratio of
the medians (one-graph / float graph: above 1 is faster) and the median of the per-round
ratios. Both graphs' outputs on the same ids are compared too (max abs difference).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIDES = ("one-graph", "float graph")


def export_pair(run_dir: Path, tmp: Path) -> dict:
    out = {}
    for side, extra in zip(SIDES, (["--one-graph"], [])):
        dest = tmp / side.replace(" ", "_")
        cmd = [sys.executable, "-m", "probattn.export.cli", "export", str(run_dir), "--out", str(dest),
               "--formats", "onnx,tflite", "--precisions", "fp32", "--no-onnx-int64", *extra]
        print(f"exporting ({side}) ...", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        out[side] = dest
    return out


def token_stream(bundle: Path) -> list:
    """The bundle's test texts tokenized without truncation, as one list of ids."""
    from probattn.export import bundle as B
    from probattn.models.text.data import parse_text_file

    with B.Bundle(bundle) as b:
        manifest = b.manifest
        tok = b.tokenizer()
        ds = parse_text_file(b.test_data_bytes(), Path(manifest["test_data"]))
    tok.no_truncation()
    return [i for enc in tok.encode_batch(ds.texts) for i in enc.ids]


def token_rows(stream: list, batch: int, length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), np.int32)
    pos = 0
    for r in range(batch):
        n = int(rng.integers(max(1, length // 4), length + 1))
        if pos + n > len(stream):
            pos = 0
        ids[r, :n] = stream[pos:pos + n]
        pos += n
    return ids


def sessions(bundle: Path, shapes) -> dict:
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    onnx_path = str(bundle / "model_fp32.onnx")
    one = ort.SessionOptions()
    one.intra_op_num_threads = 1
    one.inter_op_num_threads = 1
    s1 = ort.InferenceSession(onnx_path, one, providers=["CPUExecutionProvider"])
    sd = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    name = s1.get_inputs()[0].name
    calls = {}
    for shape in shapes:
        calls[(shape, "onnxruntime 1 thread")] = lambda ids, s=s1: s.run(None, {name: ids})
        calls[(shape, "onnxruntime default")] = lambda ids, s=sd: s.run(None, {name: ids})
        it = Interpreter(model_path=str(bundle / "model_fp32.tflite"))
        inp = it.get_input_details()[0]["index"]
        it.resize_tensor_input(inp, list(shape), strict=False)
        it.allocate_tensors()
        outs = [d["index"] for d in it.get_output_details()]

        def run(ids, it=it, inp=inp, outs=outs):
            it.set_tensor(inp, ids)
            it.invoke()
            return [it.get_tensor(o) for o in outs]

        calls[(shape, "LiteRT default")] = run
    return calls


def interleaved_rounds(keys, sides, call, calls_of, rounds: int, seed: int = 0) -> dict:
    """``{(key, side): [ms a call, one per round]}``: each round, for each key, every side in
    a shuffled order runs ``call(key, side)`` ``calls_of(key)`` times in a row (the load of
    the shared machine hits every side alike)."""
    times = {(key, side): [] for key in keys for side in sides}
    rng = random.Random(seed)
    for r in range(rounds):
        for key in keys:
            order = list(sides)
            rng.shuffle(order)
            n = calls_of(key)
            for side in order:
                t = time.perf_counter()
                for _ in range(n):
                    call(key, side)
                times[(key, side)].append((time.perf_counter() - t) / n * 1e3)
        print(f"round {r + 1}/{rounds}", file=sys.stderr, end="\r", flush=True)
    print(file=sys.stderr)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--bundles", nargs=2, metavar=("ONE_GRAPH", "FLOAT_GRAPH"))
    ap.add_argument("--shapes", default="256x64,64x512")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if bool(args.run_dir) == bool(args.bundles):
        ap.error("give RUN_DIR or --bundles ONE_GRAPH FLOAT_GRAPH")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    with tempfile.TemporaryDirectory(prefix="probattn-graph-compare-") as tmp:
        bundles = (dict(zip(SIDES, map(Path, args.bundles))) if args.bundles
                   else export_pair(Path(args.run_dir), Path(tmp)))
        stream = token_stream(bundles[SIDES[1]])
        inputs = {shape: token_rows(stream, *shape) for shape in shapes}
        calls = {side: sessions(path, shapes) for side, path in bundles.items()}
        keys = list(calls[SIDES[0]])
        diffs = {}
        for key in keys:
            a, b = (calls[side][key](inputs[key[0]]) for side in SIDES)
            diffs[key] = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                             for x, y in zip(a, b))
            for side in SIDES:  # warm-up
                for _ in range(3):
                    calls[side][key](inputs[key[0]])
        per_round = interleaved_rounds(keys, SIDES, lambda key, side: calls[side][key](inputs[key[0]]),
                                       lambda key: args.calls, args.rounds)
    rows = []
    print("| shape | runtime | one-graph ms | float graph ms | speed-up (medians) | speed-up (paired) | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for key in keys:
        a, b = per_round[(key, SIDES[0])], per_round[(key, SIDES[1])]
        row = {"shape": f"{key[0][0]}x{key[0][1]}", "runtime": key[1], "one_graph_ms": statistics.median(a),
               "float_graph_ms": statistics.median(b),
               "speedup": statistics.median(a) / statistics.median(b),
               "paired": statistics.median(x / y for x, y in zip(a, b)), "max_abs_diff": diffs[key]}
        rows.append(row)
        print(f"| {row['shape']} | {row['runtime']} | {row['one_graph_ms']:.3f} | {row['float_graph_ms']:.3f} | "
              f"{row['speedup']:.2f}x | {row['paired']:.2f}x | {row['max_abs_diff']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": args.rounds, "calls": args.calls, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

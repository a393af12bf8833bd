"""What isolating every runtime in a child process costs verify.

    python scripts/isolation_overhead.py BUNDLE [--data FILE] [--repeat 3]

Runs ``probattn verify BUNDLE`` in fresh processes, alternately as shipped (one persistent
child per artifact x runtime pair) and with the runners in the verify process itself (the
way verify ran before isolation), and reports the median wall time of each. Then times one
``infer`` call through the pipe against the same call in-process (median of 200 calls at
1 x 64 on the bundle's fp32 ONNX file) to show the per-call cost of the pipe.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


class InProcess:
    """The IsolatedRunner interface with the runner in this process (for the comparison)."""

    def __init__(self, cls, path, vocab_size=None, threads=None, variant=None, input_shape=None, **kwargs):
        self.r = cls(path, vocab_size, threads, variant=variant, input_shape=input_shape, **kwargs)

    def __getattr__(self, item):
        return getattr(self.r, item)

    def __enter__(self):
        self.r.activate()
        return self

    def __exit__(self, *exc):
        self.r.deactivate()

    def call(self, method, *args, **kwargs):
        return getattr(self.r, method)(*args, **kwargs)


def _child(mode, bundle, data):
    from probattn.export.parity import verification, verify

    if mode == "inprocess":
        verification.IsolatedRunner = InProcess
    t = time.perf_counter()
    report = verify(bundle, data=data, quiet=True)
    print(json.dumps({"seconds": time.perf_counter() - t, "passed": report.passed, "pairs": len(report.rows)}))


def _per_call(bundle):
    import numpy as np

    from probattn.export import bundle as B
    from probattn.export.runtimes.isolated import IsolatedRunner
    from probattn.export.runtimes.onnxruntime import OnnxRuntimeRunner

    manifest = B.load_manifest(bundle)
    entry = B.find_artifact(manifest, "onnx", "fp32")
    path = B.verified_path(bundle, entry)
    ids = np.random.default_rng(0).integers(2, manifest["vocab_size"], (1, 64)).astype(np.int32)
    out = {}
    for name, runner in (("in_process", OnnxRuntimeRunner(path, manifest["vocab_size"])),
                         ("through_pipe", IsolatedRunner(OnnxRuntimeRunner, path, manifest["vocab_size"]))):
        with runner:
            for _ in range(20):
                runner.infer(ids)
            times = []
            for _ in range(200):
                t = time.perf_counter()
                runner.infer(ids)
                times.append(time.perf_counter() - t)
        out[name] = statistics.median(times) * 1e6
    t = time.perf_counter()
    with IsolatedRunner(OnnxRuntimeRunner, path, manifest["vocab_size"]) as r:
        r.infer(ids)
    out["spawn_load_first_call_ms"] = (time.perf_counter() - t) * 1e3
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--data")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.bundle, args.data)
        return 0
    runs = {"isolated": [], "inprocess": []}
    for _ in range(args.repeat):
        for mode in ("inprocess", "isolated"):
            cmd = [sys.executable, __file__, args.bundle, "--child", mode] + (["--data", args.data] if args.data else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in proc.stdout.splitlines() if l.startswith("{")]
            if not line:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            runs[mode].append(json.loads(line[-1]))
    iso = statistics.median(r["seconds"] for r in runs["isolated"])
    inp = statistics.median(r["seconds"] for r in runs["inprocess"])
    per_call = _per_call(args.bundle)
    result = {"verify_isolated_s": round(iso, 1), "verify_in_process_s": round(inp, 1),
              "overhead_s": round(iso - inp, 1), "overhead_pct": round(100 * (iso - inp) / inp, 1),
              "pairs": runs["isolated"][0]["pairs"], "repeat": args.repeat,
              "infer_1x64_us": {k: round(v, 1) for k, v in per_call.items()}}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

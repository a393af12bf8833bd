"""``probattn bench``: latency, throughput, load time, size and accuracy per artifact x
runtime x thread setting, in one table, plus sequence-length scaling and size-vs-accuracy
plots. Each thread setting runs in its own child process (TensorFlow fixes its thread
pools at start-up). Benchmarks are measurements, never test assertions.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from probattn.models.errors import UsageError

from . import bundle as B
from . import runtimes
from .contract import PROBABILITIES
from .versions import machine, versions

SHAPES = [(1, 16), (1, 64), (1, 256), (32, 16), (32, 64), (32, 256)]
QUICK_SHAPES = [(1, 64), (32, 64)]
THROUGHPUT_SHAPE = (256, 64)
SCALING = [16, 64, 256, 1024, 4096]
QUICK_SCALING = [16, 256, 4096]


def _time_calls(fn, ids, min_seconds, min_reps, max_reps, warmup):
    for _ in range(warmup):
        fn(ids)
    times = []
    t_end = time.perf_counter() + min_seconds
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < t_end):
        t = time.perf_counter_ns()
        fn(ids)
        times.append((time.perf_counter_ns() - t) / 1e3)
    times.sort()
    return {"median_us": round(statistics.median(times), 1),
            "p90_us": round(times[min(len(times) - 1, int(0.9 * len(times)))], 1), "reps": len(times)}


def _bare_call(runner):
    """The runtime's own call, without our input validation (what a hand-written loop does)."""
    return lambda ids: runner.infer(ids, check_inputs=False)


def _accuracy(runner, b, manifest: dict):
    name = manifest.get("test_data")
    if not name:
        return None
    from probattn.models.text.data import parse_text_file
    from probattn.models.text.tokenizer import encode

    ds = parse_text_file(b.test_data_bytes(), Path(name))
    tok = b.tokenizer()
    index = {l: i for i, l in enumerate(manifest["labels"])}
    if any(l not in index for l in ds.labels):
        return None
    y = np.array([index[l] for l in ds.labels])
    preds = []
    for i in range(0, len(ds.texts), 64):
        ids = encode(tok, ds.texts[i:i + 64], manifest.get("max_length"))
        preds.append(runner.infer(ids, check_inputs=False)[PROBABILITIES].argmax(-1))
    return round(float(np.mean(np.concatenate(preds) == y)), 4)


def entry_runs_on(entry, cls) -> bool:
    return entry["format"] in cls.formats and cls.cannot_run(entry["format"], entry["precision"], entry) is None


def worker(bundle, threads: int, quick: bool, runtime_names, with_accuracy: bool, with_scaling: bool,
           unsafe: bool = False) -> dict:
    """Measure every artifact in this process with ``threads`` intra-op threads (the bundle
    read as one generation, under its shared lock)."""
    with B.Bundle(bundle) as b:
        return _worker(b, threads, quick, runtime_names, with_accuracy, with_scaling, unsafe)


def _worker(bun, threads, quick, runtime_names, with_accuracy, with_scaling, unsafe) -> dict:
    bundle = bun.path
    manifest = bun.manifest
    vocab = int(manifest["vocab_size"])
    tokenizer = bun.tokenizer()
    bun.check_plain_files(tokenizer)
    rng = np.random.default_rng(0)
    shapes = QUICK_SHAPES if quick else SHAPES
    timing = dict(min_seconds=0.1 if quick else 0.4, min_reps=10 if quick else 30,
                  max_reps=200 if quick else 2000, warmup=3 if quick else 10)
    selected = [runtimes.get(r) for r in runtime_names]
    # int64-input ONNX twins are their int32 file behind one Cast: not timed separately
    jobs = [(a, cls) for a in manifest["artifacts"] for cls in selected
            if entry_runs_on(a, cls) and a.get("input_dtype", "int32") == "int32"]
    results = []
    for n, (entry, cls) in enumerate(jobs, 1):
        path = bun.check_entry(entry)
        common = dict(n_classes=B.output_units(manifest), unsafe=unsafe, input_shape=entry.get("input_shape"))
        if entry["format"] == "keras":  # the user's model as they would call it: probabilities only
            runner = cls(path, vocab, threads, attention=False,
                         custom_objects=os.environ.get("PROBATTN_BENCH_CUSTOM_OBJECTS") or None, **common)
        elif entry["format"] == "savedmodel":
            runner = cls(path, vocab, threads, **common)
        else:  # the runtime's default variant, on the hash-checked and audited bytes
            content = bun.artifact_bytes(entry)
            bun.audit_artifact(entry, content, tokenizer)
            runner = cls(bundle / entry["path"], vocab, threads, content=content, **common)
        rt = runner.name
        reason = cls.unavailable()
        label = f"[{n}/{len(jobs)}] threads={threads} {entry['path']} on {rt}"
        if reason:
            results.append({"artifact": entry["path"], "runtime": rt, "threads": threads, "skipped": reason})
            print(f"  {label}: skipped ({reason})", file=sys.stderr, flush=True)
            continue
        print(f"  {label} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        runner.activate()
        load_ms = (time.perf_counter() - t) * 1e3
        call = _bare_call(runner)
        row = {"artifact": entry["path"], "format": entry["format"], "precision": entry["precision"],
               "runtime": rt, "threads": threads, "bytes": entry["bytes"], "load_ms": round(load_ms, 1),
               "latency": {}}
        for b, s in shapes:
            if not runner.accepts_length(s):  # a fixed-length model: longer rows do not exist for it
                row["latency"][f"{b}x{s}"] = None
                continue
            ids = rng.integers(2, vocab, (b, s), dtype=np.int32)
            row["latency"][f"{b}x{s}"] = _time_calls(call, ids, **timing)
        ids = rng.integers(2, vocab, (THROUGHPUT_SHAPE[0], min(THROUGHPUT_SHAPE[1], runner.fixed_length or 10**9)),
                           dtype=np.int32)
        tp = _time_calls(call, ids, min_seconds=0.2 if quick else 1.0, min_reps=3 if quick else 10,
                         max_reps=500, warmup=2)
        row["throughput_texts_per_s"] = round(THROUGHPUT_SHAPE[0] / (tp["median_us"] / 1e6), 1)
        if with_accuracy:
            row["accuracy"] = _accuracy(runner, bun, manifest)
        if with_scaling and entry["precision"] == "fp32":
            row["scaling"] = {}
            for s in (QUICK_SCALING if quick else SCALING):
                if not runner.accepts_length(s):
                    continue
                ids = rng.integers(2, vocab, (1, s), dtype=np.int32)
                row["scaling"][str(s)] = _time_calls(call, ids, min_seconds=0.1 if quick else 0.3,
                                                     min_reps=5 if quick else 20, max_reps=1000, warmup=3)["median_us"]
        if cls.tensorflow_free and entry["precision"] == "fp32" and runtimes.default_format(cls.runtime) == entry["format"]:
            row["predictor_overhead"] = _predictor_overhead(bundle, cls.runtime, threads, rng, vocab, timing)
        results.append(row)
        runner.deactivate()
    return {"threads": threads, "rows": results}


def _predictor_overhead(bundle, rt, threads, rng, vocab, timing):
    """``Predictor.predict_ids`` vs the bare runtime call at batch 1 x 64."""
    from .predict import Predictor

    p = Predictor(bundle, runtime=rt, precision="fp32", threads=threads)
    ids = rng.integers(2, vocab, (1, 64), dtype=np.int32)
    bare = _time_calls(_bare_call(p.runner), ids, **timing)["median_us"]
    ours = _time_calls(p.predict_ids, ids, **timing)["median_us"]
    return {"bare_us": bare, "predict_ids_us": ours, "ratio": round(ours / bare, 2)}


def child_result(cmd, required: str, what: str, env=None) -> dict:
    """Run a measuring child (``cmd``), which prints its result as one JSON line last: the
    result; its ``error`` (a ProbattnError in the child) or a missing ``required`` key is a
    one-line UsageError."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    last = (proc.stdout.strip().splitlines() or ["{}"])[-1]
    result = json.loads(last) if last.startswith("{") else {}
    if "error" in result:
        raise UsageError(result["error"])
    if proc.returncode != 0 or required not in result:
        raise UsageError(f"{what} failed with exit {proc.returncode}")
    return result


def _parity_verdicts(b) -> dict:
    """Verdicts from ``report/parity.json``, if verify wrote one (read with no link followed;
    a file that is not a readable report is ignored)."""
    try:
        doc = json.loads(b.dir.read(f"{B.REPORT_DIR}/parity.json", 64 << 20, "report"))
        return {(r["artifact"], r["runtime"]): bool(r["passed"]) for r in doc.get("rows", [])}
    except (UsageError, ValueError, TypeError, KeyError, AttributeError, OSError):
        return {}


def parse_threads(threads) -> list:
    """``--threads``: positive integers and ``all`` (the CPUs this process may use), each at
    most that many."""
    from .limits import cap_threads, usable_cpus

    settings = []
    for t in str(threads).split(","):
        t = t.strip()
        if t == "all":
            settings.append(usable_cpus())
        elif t.isdigit() and int(t) >= 1:
            settings.append(cap_threads(int(t), "--threads"))
        else:
            raise UsageError(f"--threads takes positive integers and 'all', comma separated; received '{t}'")
    return list(dict.fromkeys(settings))


def run(bundle, out_dir=None, threads="1,all", quick=False, runtime_names=None, unsafe=False,
        custom_objects=None, end_to_end=False, e2e_texts=None, texts_file=None) -> dict:
    from probattn.models.fsutil import check_output_dir_usable, open_output_dir, write_file_at

    bundle = Path(bundle)
    settings = parse_threads(threads)
    runtime_names = tuple(runtime_names or runtimes.names())
    for r in runtime_names:
        runtimes.get(r)  # one-line error naming the allowed runtimes
    with B.Bundle(bundle) as b:  # shared lock for the whole run: an export cannot replace it meanwhile
        custom = None
        if "keras" in runtime_names:  # only the Keras reference runs the user's code
            from .loading import check_custom_objects_for_bundle

            custom = check_custom_objects_for_bundle(b.manifest, custom_objects)
        b.check_all(strict_tree=True)
        where = dict(path=out_dir, what="--out") if out_dir else \
            dict(path=B.BENCH_DIR, dir_fd=b.dir.fd, what=f"bench directory {bundle}/bench")
        try:  # refused now, created at the end
            check_output_dir_usable(**where)
        except UsageError as e:
            raise UsageError(str(e) if out_dir else f"{e}; pass --out DIR to write the results elsewhere") from None
        doc = {"bundle": str(bundle), "machine": machine(), "versions": versions(), "quick": quick,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": []}
        if end_to_end:
            from . import bench_e2e

            doc["end_to_end"] = bench_e2e.run(bundle, runtime_names, quick, e2e_texts, texts_file)
            out_fd = open_output_dir(**where)
            try:
                write_file_at(out_fd, "bench_e2e.json", json.dumps(doc, indent=1))
                write_file_at(out_fd, "bench_e2e.md", bench_e2e.markdown(doc["end_to_end"]))
            finally:
                os.close(out_fd)
            return doc
        for i, t in enumerate(settings):
            cmd = [sys.executable, "-m", "probattn.export.bench", "--worker", str(bundle), str(t),
                   "1" if quick else "0", ",".join(runtime_names), "1" if i == 0 else "0", "1" if i == 0 else "0",
                   "1" if unsafe else "0"]
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS=str(t),
                       PROBATTN_BENCH_CUSTOM_OBJECTS=str(Path(custom).resolve()) if custom else "")
            doc["runs"].append(child_result(cmd, "rows", f"benchmark worker (threads={t})", env))
        from . import bench_e2e

        predict_runtime = next((r for r in bench_e2e.RUNTIMES if r in runtime_names), None)
        if predict_runtime:
            print("  cold start of 'probattn predict' ...", file=sys.stderr, flush=True)
            doc["cold_start_predict"] = bench_e2e.cold_start(bundle, predict_runtime, runs=3 if quick else 5)
        verdicts = _parity_verdicts(b)
        accuracy = {}
        for run_ in doc["runs"]:
            for r in run_["rows"]:
                r["parity"] = verdicts.get((r["artifact"], r["runtime"]))
                if r.get("accuracy") is not None:
                    accuracy[(r["artifact"], r["runtime"])] = r["accuracy"]
        for run_ in doc["runs"]:
            for r in run_["rows"]:
                r.setdefault("accuracy", accuracy.get((r["artifact"], r["runtime"])))
        pngs = (("bench_scaling.png", plot_scaling(doc)), ("bench_size_accuracy.png", plot_size_accuracy(doc)))
        out_fd = open_output_dir(**where)
        try:
            write_file_at(out_fd, "bench.json", json.dumps(doc, indent=1))
            write_file_at(out_fd, "bench.md", markdown(doc))
            for name, png in pngs:
                if png is not None:
                    write_file_at(out_fd, name, png)
        finally:
            os.close(out_fd)
    return doc


def _us(v):
    return "-" if v is None else (f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.1f} us")


def markdown(doc) -> str:
    shapes = None
    lines = []
    m = doc["machine"]
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['system']}; "
                 f"tensorflow {doc['versions'].get('tensorflow')}, onnxruntime {doc['versions'].get('onnxruntime')}, "
                 f"ai-edge-litert {doc['versions'].get('ai-edge-litert')}. Latency: median (p90 at 1x64) of the "
                 "bare runtime call on random ids; throughput at batch 256 x 64.")
    lines.append("")
    for run_ in doc["runs"]:
        rows = [r for r in run_["rows"] if "skipped" not in r]
        if not rows:
            continue
        shapes = list(dict.fromkeys(k for r in rows for k in r["latency"]))
        head = ["artifact", "runtime", "threads", "size", "load", "accuracy", "parity"] + \
               [f"{s}" for s in shapes] + ["p90 1x64", "texts/s"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in rows:
            lat = r["latency"]
            parity = {True: "PASS", False: "FAIL", None: "-"}[r.get("parity")]
            acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.4f}"
            cells = [r["artifact"], r["runtime"], str(r["threads"]), f"{r['bytes'] / 1e6:.2f} MB",
                     f"{r['load_ms']:.0f} ms", acc, parity] + [_us((lat.get(s) or {}).get("median_us")) for s in shapes] + \
                    [_us((lat.get("1x64") or {}).get("p90_us")), f"{r['throughput_texts_per_s']:,.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        for r in run_["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['artifact']} | {r['runtime']} | {r['threads']} | skipped: {r['skipped']} |")
        lines.append("")
    # headline ratios at 1x64, one thread
    one = next((run_ for run_ in doc["runs"] if run_["threads"] == 1), None)
    if one:
        lat = {(r["artifact"], r["runtime"]): (r["latency"].get("1x64") or {}).get("median_us")
               for r in one["rows"] if "skipped" not in r}
        keras = next((v for k, v in lat.items() if k[1] == "keras"), None)
        if keras:
            lines.append("Speed-up over calling the Keras model directly, batch 1 x 64 tokens, 1 thread:")
            lines.append("")
            fastest = [k for k in lat if k[1] != "keras" and lat[k]]
            for key in sorted(fastest, key=lambda k: lat[k])[:4]:
                if lat.get(key):
                    lines.append(f"- {key[0]} on {key[1]}: {_us(lat[key])} vs Keras {_us(keras)}: "
                                 f"**{keras / lat[key]:.0f}x** faster")
            lines.append("")
        for r in one["rows"]:
            po = r.get("predictor_overhead")
            if po:
                lines.append(f"- Predictor.predict_ids overhead on {r['runtime']} fp32 at 1 x 64: "
                             f"{_us(po['predict_ids_us'])} vs bare call {_us(po['bare_us'])} ({po['ratio']}x)")
    cs = doc.get("cold_start_predict")
    if cs and "ratio" in cs:
        lines.append(f"- Cold start of `probattn predict BUNDLE --runtime {cs['runtime']} \"one text\"`: "
                     f"{cs['predict_s']:.3f} s, {cs['ratio']:.2f}x `{cs['floor']}` ({cs['imports_s']:.3f} s; "
                     f"medians of {cs['runs']} fresh processes each)")
    return "\n".join(lines) + "\n"


def _png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def plot_scaling(doc) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted = False
    for run_ in doc["runs"][:1]:
        for r in run_["rows"]:
            if "scaling" in r:
                xs = [int(k) for k in r["scaling"]]
                ax.plot(xs, list(r["scaling"].values()), marker="o", label=f"{r['runtime']} ({r['artifact']})")
                plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens), batch 1")
    ax.set_ylabel("median latency (us)")
    ax.set_title(f"Latency vs sequence length, {doc['runs'][0]['threads']} thread(s): ProbAttention is O(T)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_size_accuracy(doc) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = {}
    for r in doc["runs"][0]["rows"]:
        if r.get("accuracy") is not None and r["runtime"] != "keras":
            pts[r["artifact"]] = (r["bytes"] / 1e6, r["accuracy"])
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = {"tflite": "o", "onnx": "s", "savedmodel": "^"}
    for name, (x, y) in sorted(pts.items()):
        fmt = "savedmodel" if name == "saved_model" else name.rsplit(".", 1)[-1]
        ax.scatter(x, y, marker=markers.get(fmt, "o"), s=60, alpha=0.8, label=name)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Size vs accuracy across formats and precisions")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def run_cli(args) -> int:
    if getattr(args, "attention_scaling", False):
        from .attention_scaling import run_cli as scaling

        return scaling(args)
    if not args.bundle:
        raise UsageError("bench needs a BUNDLE (or --attention-scaling --out DIR)")
    if getattr(args, "lengths", None):
        raise UsageError(f"--lengths is for --attention-scaling; received --lengths {args.lengths} with a BUNDLE")
    names = tuple(x.strip() for x in args.runtimes.split(",")) if args.runtimes else None
    if not args.end_to_end and (args.e2e_texts or args.texts):
        raise UsageError("--e2e-texts and --texts are for --end-to-end")
    doc = run(args.bundle, args.out, args.threads, args.quick, names, unsafe=args.unsafe,
              custom_objects=args.custom_objects, end_to_end=args.end_to_end, e2e_texts=args.e2e_texts,
              texts_file=args.texts)
    if args.end_to_end:
        from .bench_e2e import markdown as e2e_markdown

        print(e2e_markdown(doc["end_to_end"]))
        print(f"wrote {Path(args.out) if args.out else Path(args.bundle) / 'bench'}/bench_e2e.json, bench_e2e.md")
        return 0
    print(markdown(doc))
    print(f"wrote {Path(args.out) if args.out else Path(args.bundle) / 'bench'}/bench.json, bench.md, "
          "bench_scaling.png, bench_size_accuracy.png")
    return 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    from probattn.models.errors import ProbattnError, one_line
    from probattn.models.quiet import import_tensorflow

    if any(not runtimes.get(r).tensorflow_free for r in sys.argv[5].split(",")):
        import_tensorflow()

    _, _, b, t, q, rts, acc, sc, unsafe = sys.argv
    try:
        result = worker(b, int(t), q == "1", tuple(rts.split(",")), acc == "1", sc == "1", unsafe == "1")
    except ProbattnError as e:  # reported by the parent as one line
        result = {"error": one_line(e, 600)}
    print(json.dumps(result))

"""``probattn bench --attention-scaling --out DIR``: latency against sequence length of
ProbSparse self-attention and of dense self-attention of the same size, in LiteRT and
onnxruntime. A measurement, never a test assertion.

Three graphs, all ``token_ids (1, L)`` -> ``Embedding(VOCAB, EMBED, mask_zero=True)`` ->
self-attention with ``HEADS`` heads of ``KEY_DIM`` -> ``(1, L, EMBED)``, sharing one set
of weights, converted the way ``probattn export`` converts (TFLite builtins only, fp32;
ONNX with tf2onnx):

* ``probsparse``: ``ProbSparseAttention(HEADS, KEY_DIM, factor=FACTOR)``;
* ``dense``: the same layer with ``full_attention=True``: every query attends, with the
  same masking and int8-safe normalisation (what ProbSparse equals when every query is
  kept): the like-for-like baseline;
* ``dense_softmax``: no mask, ``tf.nn.softmax`` (no padding support, a SOFTMAX over time
  that full int8 cannot run past 512 keys): the leanest dense attention these runtimes
  run, a lower bound for any dense layer.

The conversions run here; the timing runs in a child process per thread setting that
never imports TensorFlow. Calls are interleaved (one of each graph in turn) so load from
other processes falls on all of them alike; each figure is the median of at least
``MIN_REPS`` calls after ``WARMUP`` warm-up calls, on random ids at batch 1.
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

from . import runtimes
from .contract import INPUT, SIGNATURE_KEY
from .versions import machine, versions

LENGTHS = (64, 128, 256, 512, 1024, 2048, 4096)
QUICK_LENGTHS = (64, 256, 1024)
VOCAB, EMBED, HEADS, KEY_DIM = 1000, 64, 4, 16
FACTOR = 5  # Informer's default c
GRAPHS = ("probsparse", "dense", "dense_softmax")
LABELS = {"probsparse": "ProbSparse", "dense": "dense (same masking)", "dense_softmax": "dense, no mask (softmax)"}
#: (runtime, variant): LiteRT with its default XNNPACK kernels, onnxruntime with every
#: graph optimisation (the settings ``probattn predict`` uses)
RUNTIMES = {"litert": "xnnpack", "onnxruntime": "all"}
FORMAT_OF = {"litert": "tflite", "onnxruntime": "onnx"}
WARMUP, MIN_REPS, MAX_REPS, SECONDS = 2, 5, 200, 1.0
QUICK = dict(WARMUP=1, MIN_REPS=3, MAX_REPS=50, SECONDS=0.2)
OUTPUT = "output"


def _build(seed: int = 0):
    """The three Keras/TF graphs (tf_keras), sharing weights; returns ``{name: tf.Module}``."""
    import tensorflow as tf

    from probattn.models import probsparse as P
    from probattn.models.keras_compat import get_keras
    from probattn.models.layers import layer_classes

    keras = get_keras("2")
    keras.utils.set_random_seed(seed)
    psa = layer_classes("2").ProbSparseAttention

    def model(full):
        inp = keras.Input(shape=(None,), dtype="int32", name=INPUT)
        x = keras.layers.Embedding(VOCAB, EMBED, mask_zero=True, name="embedding")(inp)
        return keras.Model(inp, psa(HEADS, KEY_DIM, factor=FACTOR, full_attention=full, name="attention")(x))

    sparse = model(False)
    dense = model(True)
    dense.set_weights(sparse.get_weights())
    table = sparse.get_layer("embedding").embeddings
    att = sparse.get_layer("attention")

    def dense_softmax(token_ids):
        x = tf.gather(table, token_ids)
        w = att._weights(x.dtype)
        q = P._project(x, w[0], w[1], HEADS, KEY_DIM) * (1.0 / KEY_DIM ** 0.5)
        k = P._project(x, w[2], w[3], HEADS, KEY_DIM)
        v = P._project(x, w[4], w[5], HEADS, KEY_DIM)
        out = tf.matmul(tf.nn.softmax(tf.matmul(q, k, transpose_b=True), axis=-1), v)
        return P._merge(out, w[6], w[7], HEADS, KEY_DIM)

    def module(fn, keep):
        class Serving(tf.Module):
            def __init__(self):
                super().__init__()
                self.keep = keep

            @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name=INPUT)])
            def serve(self, token_ids):
                return {OUTPUT: fn(token_ids)}

        return Serving()

    return {"probsparse": module(lambda ids: sparse(ids, training=False), sparse),
            "dense": module(lambda ids: dense(ids, training=False), dense),
            "dense_softmax": module(dense_softmax, sparse)}


def convert(out: Path, log=print) -> dict:
    """Write ``{graph}.tflite`` and ``{graph}.onnx`` into ``out/models``; returns their paths."""
    import shutil

    import tensorflow as tf

    from .formats.onnx import convert_fp32
    from .formats.tflite import convert as to_tflite

    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, mod in _build().items():
        concrete = mod.serve.get_concrete_function()
        sm = models / f".{name}_saved_model"
        tf.saved_model.save(mod, str(sm), signatures={SIGNATURE_KEY: concrete})
        (models / f"{name}.tflite").write_bytes(to_tflite(str(sm), "fp32"))  # builtins only
        onnx_model = convert_fp32(mod, 17, [OUTPUT])  # what ``probattn export`` runs
        (models / f"{name}.onnx").write_bytes(onnx_model.SerializeToString())
        shutil.rmtree(sm)
        paths[name] = {"tflite": str(models / f"{name}.tflite"), "onnx": str(models / f"{name}.onnx")}
        log(f"  converted {name}")
    return paths


def worker(paths: dict, threads: int, lengths, runtime_names, quick: bool) -> dict:
    """Time every graph at every length in this process (no TensorFlow)."""
    t = dict(WARMUP=WARMUP, MIN_REPS=MIN_REPS, MAX_REPS=MAX_REPS, SECONDS=SECONDS)
    if quick:
        t.update(QUICK)
    rng = np.random.default_rng(0)
    rows = []
    for rt in runtime_names:
        cls = runtimes.get(rt)
        reason = cls.unavailable()
        if reason:
            rows.append({"runtime": rt, "skipped": reason})
            continue
        runners = {g: _BareLayer(rt, paths[g][FORMAT_OF[rt]], threads) for g in GRAPHS}
        for length in lengths:
            ids = rng.integers(1, VOCAB, (1, length), dtype=np.int32)
            calls = {g: (lambda r=r: r.infer(ids, check_inputs=False)) for g, r in runners.items()}
            for fn in calls.values():
                for _ in range(t["WARMUP"]):
                    fn()
            times = {g: [] for g in GRAPHS}
            end = time.perf_counter() + t["SECONDS"]
            while True:
                for g, fn in calls.items():
                    start = time.perf_counter_ns()
                    fn()
                    times[g].append((time.perf_counter_ns() - start) / 1e3)
                n = len(times[GRAPHS[0]])
                if n >= t["MAX_REPS"] or (n >= t["MIN_REPS"] and time.perf_counter() >= end):
                    break
            for g, ts in times.items():
                ts.sort()
                rows.append({"runtime": f"{rt}-{RUNTIMES[rt]}", "graph": g,
                             "length": length, "median_us": round(statistics.median(ts), 1),
                             "p90_us": round(ts[min(len(ts) - 1, int(0.9 * len(ts)))], 1), "reps": len(ts)})
            print(f"  threads={threads} {rt} L={length}: " + ", ".join(
                f"{g} {rows[-len(GRAPHS) + i]['median_us'] / 1e3:.3f} ms" for i, g in enumerate(GRAPHS)),
                file=sys.stderr, flush=True)
    return {"threads": threads, "rows": rows}


class _BareLayer:
    """One attention graph on a runtime, called as a user of the runtime would: these files
    are a layer (``output`` of ``(1, L, features)``), not a classifier, so the registry's
    runners (which hold a file to the classifier's contract) do not take them."""

    def __init__(self, runtime: str, path, threads: int):
        if runtime == "litert":
            from ai_edge_litert.interpreter import Interpreter

            from probattn.models.quiet import quiet_stderr

            with quiet_stderr():
                interp = Interpreter(model_path=str(path), num_threads=threads)
                self._run = interp.get_signature_runner(SIGNATURE_KEY)
                self._run(**{INPUT: np.ones((1, 1), np.int32)})  # the delegate is made on first use
            self.call = lambda ids: self._run(**{INPUT: ids})
        else:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            self.call = lambda ids: sess.run(None, {INPUT: ids})

    def infer(self, ids, check_inputs: bool = False):
        return self.call(ids)


def _parse_lengths(text, quick):
    if not text:
        return QUICK_LENGTHS if quick else LENGTHS
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or not 1 <= int(part) <= 65536:
            raise UsageError(f"--lengths takes positive integers up to 65536, comma separated; received '{part}'")
        out.append(int(part))
    return tuple(sorted(set(out)))


def _parse_threads(text):
    settings = []
    for t in str(text).split(","):
        t = t.strip()
        if t == "all":
            settings.append(os.cpu_count() or 1)
        elif t.isdigit() and int(t) >= 1:
            settings.append(int(t))
        else:
            raise UsageError(f"--threads takes positive integers and 'all', comma separated; received '{t}'")
    return list(dict.fromkeys(settings))


def run(out, threads="1", lengths=None, quick=False, runtime_names=None, log=None) -> dict:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if out is None:
        raise UsageError("--attention-scaling needs --out DIR (where the models, table and plot go)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out exists and is not a directory: {out}")
    lengths = _parse_lengths(lengths, quick)
    settings = _parse_threads(threads)
    runtime_names = tuple(runtime_names or RUNTIMES)
    for rt in runtime_names:
        if rt not in RUNTIMES:
            raise UsageError(f"--attention-scaling runs {', '.join(RUNTIMES)}; received runtime '{rt}'")
    out.mkdir(parents=True, exist_ok=True)
    log("converting the attention graphs ...")
    paths = convert(out, log)
    doc = {"machine": machine(), "versions": versions(), "quick": quick,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "config": {"vocab": VOCAB, "embedding": EMBED, "heads": HEADS, "key_dim": KEY_DIM, "factor": FACTOR,
                      "batch": 1, "lengths": list(lengths), "runtimes": {r: RUNTIMES[r] for r in runtime_names}},
           "runs": []}
    for t in settings:
        cmd = [sys.executable, "-m", "probattn.export.attention_scaling", "--worker", json.dumps(paths), str(t),
               ",".join(map(str, lengths)), ",".join(runtime_names), "1" if quick else "0"]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS=str(t))
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        last = (proc.stdout.strip().splitlines() or ["{}"])[-1]
        result = json.loads(last) if last.startswith("{") else {}
        if proc.returncode != 0 or "rows" not in result:
            raise UsageError(f"attention-scaling worker (threads={t}) failed with exit {proc.returncode}")
        doc["runs"].append(result)
    (out / "attention_scaling.json").write_text(json.dumps(doc, indent=1))
    (out / "attention_scaling.md").write_text(markdown(doc))
    plot(doc, out / "attention_scaling.png")
    return doc


def _table(run_) -> dict:
    """``{(runtime, length): {graph: median_us}}``."""
    cells = {}
    for r in run_["rows"]:
        if "skipped" not in r:
            cells.setdefault((r["runtime"], r["length"]), {})[r["graph"]] = r["median_us"]
    return cells


def wins_from(run_, runtime, baseline) -> int | None:
    """The smallest measured length from which ProbSparse is faster than ``baseline`` at
    every longer measured length (None: at no length)."""
    cells = {L: v for (rt, L), v in _table(run_).items() if rt == runtime}
    lengths = sorted(cells)
    first = None
    for L in reversed(lengths):
        if cells[L]["probsparse"] < cells[L][baseline]:
            first = L
        else:
            break
    return first


def _ms(us):
    return f"{us / 1e3:.3f}"


def markdown(doc) -> str:
    m, c = doc["machine"], doc["config"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['system']}; onnxruntime "
             f"{doc['versions'].get('onnxruntime')}, ai-edge-litert {doc['versions'].get('ai-edge-litert')}. "
             f"Self-attention on Embedding({c['vocab']}, {c['embedding']}): {c['heads']} heads x {c['key_dim']}, "
             f"ProbSparse factor {c['factor']}, batch 1, fp32; median latency in ms.", ""]
    for run_ in doc["runs"]:
        cells = _table(run_)
        lines += [f"Threads: {run_['threads']}", "",
                  "| L | runtime | ProbSparse | dense (same masking) | dense, no mask (softmax) | "
                  "dense / ProbSparse | dense softmax / ProbSparse |", "|---|---|---|---|---|---|---|"]
        for (rt, L), v in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            lines.append(f"| {L} | {rt} | {_ms(v['probsparse'])} | {_ms(v['dense'])} | {_ms(v['dense_softmax'])} | "
                         f"{v['dense'] / v['probsparse']:.2f}x | {v['dense_softmax'] / v['probsparse']:.2f}x |")
        lines.append("")
        for rt in sorted({k[0] for k in cells}):
            ls = sorted(L for (r, L) in cells if r == rt)
            parts = []
            for base in ("dense", "dense_softmax"):
                w = wins_from(run_, rt, base)
                parts.append(f"than {LABELS[base]} from L = {w}" if w else f"than {LABELS[base]} at no measured length")
            growth = ""
            if len(ls) >= 2 and ls[-1] >= 2 * ls[-2]:
                a, b = ls[max(0, len(ls) - 3)], ls[-1]  # the last two doublings (geometric mean)
                doublings = np.log2(b / a)
                growth = "; latency factor per doubling of L from {} to {}: ".format(a, b) + ", ".join(
                    f"{LABELS[g]} x{(cells[(rt, b)][g] / cells[(rt, a)][g]) ** (1 / doublings):.2f}" for g in GRAPHS)
            lines.append(f"- {rt}: ProbSparse is faster {parts[0]}, {parts[1]}{growth}")
        for r in run_["rows"]:
            if "skipped" in r:
                lines.append(f"- {r['runtime']}: skipped ({r['skipped']})")
        lines.append("")
    return "\n".join(lines)


def plot(doc, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_ = doc["runs"][0]
    cells = _table(run_)
    rts = sorted({k[0] for k in cells})
    if not rts:
        return
    fig, axes = plt.subplots(1, len(rts), figsize=(6 * len(rts), 4.5), squeeze=False)
    styles = {"probsparse": ("o-", "tab:red"), "dense": ("s--", "tab:blue"), "dense_softmax": ("^:", "tab:gray")}
    for ax, rt in zip(axes[0], rts):
        ls = sorted(L for (r, L) in cells if r == rt)
        for g in GRAPHS:
            style, color = styles[g]
            ax.plot(ls, [cells[(rt, L)][g] / 1e3 for L in ls], style, color=color, label=LABELS[g])
        w = wins_from(run_, rt, "dense")
        if w:
            ax.axvspan(w, ls[-1], color="tab:red", alpha=0.07, label=f"ProbSparse faster than dense (L >= {w})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (tokens), batch 1")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(f"{rt}, {run_['threads']} thread(s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Self-attention latency vs L: ProbSparse (factor {doc['config']['factor']}) and dense, "
                 f"{doc['config']['heads']} heads x {doc['config']['key_dim']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_cli(args) -> int:
    if args.bundle:
        raise UsageError(f"--attention-scaling measures the attention layers alone and takes no BUNDLE; "
                         f"received '{args.bundle}'")
    names = tuple(x.strip() for x in args.runtimes.split(",")) if args.runtimes else None
    doc = run(args.out, args.threads, args.lengths, args.quick, names)
    print(markdown(doc))
    print(f"wrote {args.out}/attention_scaling.json, attention_scaling.md, attention_scaling.png")
    return 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _, _, paths_json, t, lengths_, rts, q = sys.argv
    result = worker(json.loads(paths_json), int(t), [int(x) for x in lengths_.split(",")], rts.split(","), q == "1")
    print(json.dumps(result))

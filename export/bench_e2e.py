"""``probattn bench --end-to-end``: what ``predict`` costs against its floor, per runtime.

Three figures, each a ratio measured in one run on this machine (interleaved, so the
machine's load hits both sides alike):

* **bulk**: texts/s of ``probattn predict --input-file`` (read the file, tokenize, run,
  format each line; the CLI's own functions, printing to /dev/null) against the bare
  runtime on the same texts, tokenized beforehand, in batches of 256 in input order, padded
  to each batch's longest row. The floor is the faster of the runtime's default threads and
  one thread. The printed lines are compared with lines made from the bare runtime's
  probabilities (``identical_lines``).
* **single**: ``Predictor.predict([text])`` of one real text against the bare call on that
  text's ids (onnxruntime ``session.run``; LiteRT the faster of its SignatureRunner and
  ``set_tensor`` / ``invoke`` / ``get_tensor``), median over the texts.
* **cold start**: wall time of ``probattn predict BUNDLE TEXT`` in a fresh process against
  ``python -c "import <runtime>, tokenizers, numpy"``, median of interleaved runs.

Texts are the bundle's test split (``--texts FILE``: one text per line instead), repeated
in order up to ``--e2e-texts`` (the report says how many are distinct). Each runtime is
measured in its own child process.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from probattn.models.errors import UsageError

from . import bundle as B
from .contract import INPUT, PROBABILITIES

#: the runtimes ``predict`` is measured on (the TensorFlow-free ones a server or phone runs)
RUNTIMES = ("onnxruntime", "litert")
#: batch of the bare floor (what a hand-written loop over a runtime would use)
BARE_BATCH = 256
#: the import line of each runtime's cold-start floor
FLOOR_IMPORTS = {"onnxruntime": "import onnxruntime, tokenizers, numpy",
                 "litert": "import ai_edge_litert.interpreter, tokenizers, numpy"}
DEFAULT_TEXTS = 100_000
QUICK_TEXTS = 10_000


def load_texts(bundle, texts_file=None) -> list:
    """Real texts: ``texts_file`` (one per line) or the bundle's test split."""
    if texts_file:
        from probattn.models.fsutil import read_regular

        raw = read_regular(Path(texts_file), 1 << 30, what="--texts file")
        try:
            texts = [t for t in raw.decode("utf-8").split("\n") if t.strip()]
        except UnicodeDecodeError:
            raise UsageError(f"--texts {texts_file} is not valid UTF-8") from None
    else:
        from probattn.models.text.data import parse_text_file

        with B.Bundle(bundle) as b:
            data = b.test_data_bytes()
            if data is None:
                raise UsageError(f"{bundle} has no test split; pass --texts FILE (one text per line)")
            texts = [t for t in parse_text_file(data, Path(b.manifest["test_data"])).texts if t.strip()]
    # one text per line: a text holding a line break would be two in the file
    texts = [" ".join(t.splitlines()) for t in texts]
    if not texts:
        raise UsageError("no texts to measure with")
    return texts


def _bare_onnxruntime(path, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ids_dtype = np.int64 if sess.get_inputs()[0].type == "tensor(int64)" else np.int32
    return lambda ids: sess.run([PROBABILITIES], {INPUT: ids.astype(ids_dtype, copy=False)})[0]


def _bare_litert(path, threads, raw=False):
    from ai_edge_litert.interpreter import Interpreter

    from probattn.models.quiet import quiet_stderr

    with quiet_stderr():
        interp = Interpreter(model_path=str(path), num_threads=threads)
    if not raw:
        runner = interp.get_signature_runner()
        return lambda ids: runner(**{INPUT: ids})[PROBABILITIES]
    sig = interp._get_full_signature_list()
    (only,) = sig.values()
    index, out = only["inputs"][INPUT], only["outputs"][PROBABILITIES]
    shape = [None]

    def call(ids):
        if ids.shape != shape[0]:
            interp.resize_tensor_input(index, ids.shape)
            interp.allocate_tensors()
            shape[0] = ids.shape
        interp.set_tensor(index, ids)
        interp.invoke()
        return interp.get_tensor(out)
    return call


def _bare_calls(runtime, path) -> dict:
    """The bare runtime's calls a floor is taken from, by name."""
    from .limits import usable_cpus

    if runtime == "onnxruntime":
        return {"default threads": _bare_onnxruntime(path, None), "1 thread": _bare_onnxruntime(path, 1)}
    calls = {"1 thread": _bare_litert(path, 1), "1 thread, raw invoke": _bare_litert(path, 1, raw=True)}
    if usable_cpus() > 1:
        calls[f"{usable_cpus()} threads"] = _bare_litert(path, usable_cpus())
    return calls


@contextlib.contextmanager
def _stdout_to(target):
    saved = sys.stdout
    sys.stdout = target
    try:
        yield
    finally:
        sys.stdout = saved


def measure(bundle, runtime: str, n_texts: int, quick: bool, texts_file=None) -> dict:
    """The three ratios for ``runtime`` (run in a child process: ``run``)."""
    import io

    from . import cli
    from .predict import Predictor

    texts = load_texts(bundle, texts_file)
    distinct = len(texts)
    texts = (texts * (n_texts // len(texts) + 1))[:n_texts]
    p = Predictor(bundle, runtime=runtime)
    path = p.bundle / p.entry["path"]
    calls = _bare_calls(runtime, path)
    rounds = 2 if quick else 3
    result = {"runtime": runtime, "artifact": p.entry["path"], "texts": len(texts), "distinct_texts": distinct,
              "tokenizer": p.text_path, "threads": p.runner.threads}

    # ---- bulk
    ids = [p.encode(texts[i:i + BARE_BATCH]) for i in range(0, len(texts), BARE_BATCH)]
    for call in calls.values():
        call(ids[0])
    with tempfile.TemporaryDirectory(prefix="probattn-e2e-") as tmp:
        src = Path(tmp) / "texts.txt"
        src.write_text("\n".join(texts) + "\n", encoding="utf-8")
        ours_s, bare_s = [], {k: [] for k in calls}
        printed = None
        for r in range(rounds):
            for name, call in calls.items():
                t = time.perf_counter()
                for batch in ids:
                    call(batch)
                bare_s[name].append(time.perf_counter() - t)
            sink = io.StringIO() if r == rounds - 1 else open(os.devnull, "w")
            out = cli._Output(False)
            t = time.perf_counter()
            with _stdout_to(sink):
                cli._predict_stream(p, cli._open_input(str(src)), 64, out)
            ours_s.append(time.perf_counter() - t)
            if r == rounds - 1:
                printed = sink.getvalue().splitlines()
            sink.close()
    floor_name = min(bare_s, key=lambda k: statistics.median(bare_s[k]))
    best = calls[floor_name]
    probs = np.concatenate([best(batch) for batch in ids])
    want = io.StringIO()
    with _stdout_to(want):
        cli._Output(False).write(texts, [p.result(row) for row in probs])
    want = want.getvalue().splitlines()
    same = sum(a == b for a, b in zip(printed, want))
    ours_tps = len(texts) / statistics.median(ours_s)
    floor_tps = len(texts) / statistics.median(bare_s[floor_name])
    result["bulk"] = {
        "predict_texts_per_s": round(ours_tps), "bare_texts_per_s": round(floor_tps), "bare": floor_name,
        "bare_all": {k: round(len(texts) / statistics.median(v)) for k, v in bare_s.items()},
        "share_of_bare": round(ours_tps / floor_tps, 3), "rounds": rounds,
        "identical_lines": same, "lines": len(want), "printed_lines": len(printed)}

    # ---- single text
    k = min(len(texts), 200 if quick else 500)
    singles = texts[:k]
    one_ids = [p.encode([t]) for t in singles]
    p.predict(singles[:5])
    ours_us, floor_us = [], {name: [] for name in calls}
    for _ in range(rounds):
        for text, x in zip(singles, one_ids):
            t = time.perf_counter_ns()
            p.predict([text])
            ours_us.append((time.perf_counter_ns() - t) / 1e3)
            for name, call in calls.items():
                t = time.perf_counter_ns()
                call(x)
                floor_us[name].append((time.perf_counter_ns() - t) / 1e3)
    single_floor = min(floor_us, key=lambda n: statistics.median(floor_us[n]))
    ours_med, floor_med = statistics.median(ours_us), statistics.median(floor_us[single_floor])
    result["single"] = {"predict_us": round(ours_med, 1), "bare_us": round(floor_med, 1), "bare": single_floor,
                        "bare_all_us": {n: round(statistics.median(v), 1) for n, v in floor_us.items()},
                        "ratio": round(ours_med / floor_med, 2), "texts": k, "rounds": rounds}
    return result


def cold_start(bundle, runtime: str, runs: int) -> dict:
    """``probattn predict BUNDLE TEXT`` against the runtime's bare imports, interleaved.
    One run of each first, with bytecode writing on (a user's first run writes it)."""
    exe = Path(sys.executable).with_name("probattn")
    ours = [str(exe)] if exe.exists() else [sys.executable, "-m", "probattn.export.cli"]
    ours += ["predict", str(bundle), "--runtime", runtime, "a fine film"]
    floor = [sys.executable, "-c", FLOOR_IMPORTS[runtime]]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    times = {"predict": [], "imports": []}
    for i in range(runs + 1):
        for name, cmd in (("predict", ours), ("imports", floor)):
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
            if i:  # the first round writes bytecode
                times[name].append(time.perf_counter() - t)
    ours_s, floor_s = statistics.median(times["predict"]), statistics.median(times["imports"])
    return {"runtime": runtime, "predict_s": round(ours_s, 3), "imports_s": round(floor_s, 3),
            "floor": FLOOR_IMPORTS[runtime], "ratio": round(ours_s / floor_s, 2), "runs": runs}


def run(bundle, runtime_names=None, quick: bool = False, n_texts: int | None = None, texts_file=None) -> list:
    """One row per runtime of ``RUNTIMES`` (among ``runtime_names``): bulk, single, cold start."""
    from . import runtimes
    from .bench import child_result

    rows = []
    n = n_texts or (QUICK_TEXTS if quick else DEFAULT_TEXTS)
    for rt in RUNTIMES:
        if runtime_names and rt not in runtime_names:
            continue
        reason = runtimes.get(rt).unavailable()
        if reason:
            rows.append({"runtime": rt, "skipped": reason})
            continue
        print(f"  end to end on {rt}: {n:,} texts ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "probattn.export.bench_e2e", "--worker", str(bundle), rt, str(n),
               "1" if quick else "0", texts_file or ""]
        row = child_result(cmd, "bulk", f"end-to-end benchmark on {rt}")
        print(f"  cold start on {rt} ...", file=sys.stderr, flush=True)
        row["cold_start"] = cold_start(bundle, rt, runs=3 if quick else 7)
        rows.append(row)
    return rows


def markdown(rows) -> str:
    """The README's table: each figure next to its floor, and the ratio."""
    if not rows:
        return ""
    lines = ["End to end (`probattn bench --end-to-end`): `predict` against its floor, interleaved in one run.", "",
             "| runtime | bulk predict texts/s | bare runtime texts/s | share | single text | bare call | ratio | "
             "cold start | bare imports | ratio |", "|" + "---|" * 10]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['runtime']} | skipped: {r['skipped']} |")
            continue
        b, s, c = r["bulk"], r["single"], r["cold_start"]
        cold = ["-", "-", c.get("error", "-")] if "ratio" not in c else \
            [f"{c['predict_s']:.3f} s", f"{c['imports_s']:.3f} s", f"{c['ratio']:.2f}x"]
        lines.append(f"| {r['runtime']} ({r['artifact']}) | {b['predict_texts_per_s']:,} | {b['bare_texts_per_s']:,} "
                     f"({b['bare']}) | {b['share_of_bare']:.0%} | {s['predict_us']:.1f} us | {s['bare_us']:.1f} us "
                     f"({s['bare']}) | {s['ratio']:.2f}x | " + " | ".join(cold) + " |")
    r = next((r for r in rows if "bulk" in r), None)
    if r:
        lines += ["", f"Bulk: {r['texts']:,} texts ({r['distinct_texts']:,} distinct, repeated in order), batch 64 "
                  f"for predict and {BARE_BATCH} for the bare runtime; printed lines identical to those made from the "
                  f"bare runtime's probabilities: " + ", ".join(
                      f"{x['runtime']} {x['bulk']['identical_lines']:,} of {x['bulk']['lines']:,}"
                      for x in rows if "bulk" in x) + f". Single text: median over {r['single']['texts']} texts x "
                  f"{r['single']['rounds']} rounds. Cold start: median of {r['cold_start'].get('runs', '-')} fresh "
                  "processes each."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    from probattn.models.errors import ProbattnError, one_line

    _, _, b, rt, n, q, tf = sys.argv
    try:
        out = measure(b, rt, int(n), q == "1", tf or None)
    except ProbattnError as e:
        out = {"error": one_line(e, 600)}
    print(json.dumps(out))

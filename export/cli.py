"""The ``probattn`` command: train, export, verify, predict, bench.

Heavy imports happen inside each verb: ``--help`` and ``predict`` never import TensorFlow.
Errors print one line and exit 2 (bad input) or 1 (parity failure or internal error);
set PROBATTN_DEBUG=1 for a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from probattn.models.errors import ProbattnError, UsageError, one_line

from . import contract as C
from . import runtimes


def _quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like our own errors
        self.exit(2, f"probattn: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received '{text}'") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {v}")
    return v


def _add_data_file_args(parser):
    parser.add_argument("--text-column", default="text", help="text column of a CSV/JSONL file (default text)")
    parser.add_argument("--label-column", default="label", help="label column of a CSV/JSONL file (default label)")
    parser.add_argument("--encoding", default="utf-8", help="encoding of a CSV/JSONL file (default utf-8)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="probattn", description="Train, export, verify and run a ProbAttention text classifier "
                "(or your own Keras text model).")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train the classifier on a dataset; writes RUN_DIR")
    t.add_argument("--dataset", default="rotten_tomatoes",
                   help="rotten_tomatoes (default), bbc_news, 20newsgroups, or a path to a .csv/.jsonl file")
    t.add_argument("--out", required=True, help="run directory to write (atomically)")
    _add_data_file_args(t)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=_positive_int, default=4)
    t.add_argument("--max-length", type=_positive_int,
                   help="tokens per text in training (default: 64 for rotten_tomatoes, 256 for bbc_news and "
                        "20newsgroups; for your own file the 95th percentile of its lengths, 16 to 256)")
    t.add_argument("--vocab-size", type=_positive_int, default=20000)
    t.add_argument("--embedding-dim", type=_positive_int, default=64)
    t.add_argument("--batch-size", type=_positive_int, default=32)
    t.add_argument("--limit", type=int, default=0, help="use only the first N examples (0 = all)")
    t.add_argument("--model", default="probattn",
                   help="architecture: probattn (default), dot, additive, mha, bilstm (see README)")
    t.add_argument("--keras", default=None,
                   help="3 (Keras 3, what tf.keras is on TensorFlow 2.16+) or 2 (tf_keras); "
                   "default: the one a TensorFlow 2.21 user gets")
    t.add_argument("--tokenizer", default="wordlevel",
                   help="wordlevel (default: NFKC, lowercase, word split), regex (exactly MediaPipe "
                   "TextClassifier's regex tokenizer: case-sensitive split on [^0-9A-Za-z_']+, <PAD>=0, "
                   "<UNKNOWN>=1; its bundles get the mediapipe format) or regex-start (the same with <START> "
                   "first)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing RUN_DIR")

    e = sub.add_parser("export", help="export SOURCE to SavedModel, TFLite and ONNX in a bundle")
    e.add_argument("source", help="RUN_DIR from 'probattn train', a .keras/.h5 file or a SavedModel directory")
    e.add_argument("--out", required=True, help="bundle directory to write (atomically)")
    e.add_argument("--formats", default=None,
                   help=f"comma list of {', '.join(C.EXPORT_FORMATS)} (default: {','.join(C.DEFAULT_EXPORT_FORMATS)}, "
                   "plus mediapipe when the run was trained with --tokenizer regex; what cannot be built is left "
                   "out and reported; named formats must all build)")
    e.add_argument("--precisions", default=None,
                   help="comma list of " + ", ".join(C.PRECISIONS) + " (default: all; "
                   + "; ".join(f"{f} has {'/'.join(C.SUPPORTED[f])}" for f in C.EXPORT_FORMATS) + ")")
    e.add_argument("--opset", default="17", help="ONNX opset, 13 to 18 (default 17)")
    e.add_argument("--calibration-data", help="texts for full-int8 calibration (.csv/.jsonl/.txt or dataset name)")
    e.add_argument("--tokenizer", help="tokenizer.json (required unless SOURCE is a run directory)")
    e.add_argument("--labels", help="labels: JSON list or one per line")
    e.add_argument("--max-length", type=_positive_int, help="training max length (default: from the run or tokenizer)")
    e.add_argument("--no-attention-weights", action="store_true", help=f"export only '{C.PROBABILITIES}'")
    e.add_argument("--c-array", action="store_true",
                   help=f"also write {C.C_ARRAY_DIR}/: the fixed-shape int8 model, vocabulary and labels as C99 "
                   "const arrays (model 16-byte aligned) for a microcontroller build")
    e.add_argument("--unsafe", action="store_true", help="allow Lambda layers (runs code from the model file)")
    e.add_argument("--custom-objects", metavar="FILE.py",
                   help="your classes and functions the model uses (runs that file; recorded in the manifest)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing bundle")

    v = sub.add_parser("verify", help="check every artifact of a bundle against Keras")
    v.add_argument("bundle")
    v.add_argument("--data", help="held-out texts: a .csv/.jsonl file or a dataset name (default: the bundle's test split)")
    _add_data_file_args(v)
    v.add_argument("--report-dir", help="where to write parity.json/.md/.png (default BUNDLE/report)")
    v.add_argument("--formats", help=f"only these formats (comma list of {', '.join(C.EXPORT_FORMATS)})")
    v.add_argument("--strict", action="store_true",
                   help="fail when a runtime is not installed or an artifact could not be run (for CI)")
    v.add_argument("--custom-objects", metavar="FILE.py",
                   help="the file the bundle was exported with, when it was (its SHA-256 is checked)")

    d = sub.add_parser("doctor", help="what a Keras model does with padding, layer by layer (no export)")
    d.add_argument("model", help="a .keras/.h5 file, a SavedModel directory or a RUN_DIR")
    d.add_argument("--custom-objects", metavar="FILE.py", help="your classes and functions the model uses")
    d.add_argument("--tokenizer", help="tokenizer.json: probe with real texts from --data instead of random ids")
    d.add_argument("--data", help="texts to probe with (.csv/.jsonl/.txt or a dataset name; needs --tokenizer)")
    d.add_argument("--unsafe", action="store_true", help="allow Lambda layers (runs code from the model file)")
    d.add_argument("--json", action="store_true", help="print the diagnosis as JSON")

    free = runtimes.names(tensorflow_free=True)
    pr = sub.add_parser("predict", help=f"label texts with {', '.join(free)} (no TensorFlow)")
    pr.add_argument("bundle")
    pr.add_argument("texts", nargs="*")
    pr.add_argument("--runtime", default="onnxruntime",
                    help=f"one of {', '.join(free)} (default onnxruntime); each runs its first format: "
                    + ", ".join(f"{r} -> {runtimes.default_format(r)}" for r in free))
    pr.add_argument("--precision", default="fp32", help=f"one of {', '.join(C.PRECISIONS)} (default fp32)")
    pr.add_argument("--input-file", help="one text per line; '-' for stdin")
    pr.add_argument("--batch-size", type=_positive_int, default=64)
    pr.add_argument("--json", action="store_true", help="one JSON object per line")

    b = sub.add_parser("bench", help="latency, throughput, size and accuracy per artifact and runtime")
    b.add_argument("bundle")
    b.add_argument("--out", help="directory for bench.json/.md/.png (default BUNDLE/bench)")
    b.add_argument("--threads", default="1,all", help="comma list of thread counts and/or 'all' (default 1,all)")
    b.add_argument("--quick", action="store_true", help="fewer repetitions and shapes")
    b.add_argument("--runtimes", help=f"only these runtimes (comma list of {', '.join(runtimes.names())})")
    b.add_argument("--custom-objects", metavar="FILE.py",
                   help="the file the bundle was exported with, when it was (its SHA-256 is checked)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # texts given after options: `probattn predict BUNDLE --runtime litert "text"`
        if args.verb == "predict" and not any(x.startswith("-") for x in extra):
            args.texts = list(args.texts) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _dispatch(args)
    except ProbattnError as e:
        print(f"probattn {args.verb}: error: {one_line(e, 600)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"probattn {args.verb}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug or an unexpected library failure: one line, not a wall
        if os.environ.get("PROBATTN_DEBUG"):
            raise
        print(f"probattn {args.verb}: internal error: {type(e).__name__}: {one_line(e, 400)} "
              "(set PROBATTN_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    if args.verb == "predict":
        return _predict(args)
    _quiet_tensorflow()
    if args.verb == "train":
        return _train(args)
    if args.verb == "export":
        return _export(args)
    if args.verb == "verify":
        return _verify(args)
    if args.verb == "doctor":
        return _doctor(args)
    if args.verb == "bench":
        from .bench import run_cli

        return run_cli(args)
    raise UsageError(f"unknown verb {args.verb}")


def _train(args) -> int:
    from probattn.models.train import TrainConfig, train

    cfg = TrainConfig(dataset=args.dataset, text_column=args.text_column, label_column=args.label_column,
                      encoding=args.encoding, seed=args.seed, epochs=args.epochs, max_length=args.max_length,
                      vocab_size=args.vocab_size, embedding_dim=args.embedding_dim,
                      batch_size=args.batch_size, limit=args.limit, tokenizer=args.tokenizer, model=args.model,
                      keras=args.keras)
    cfg.validate()
    m = train(cfg, args.out, overwrite=args.overwrite)
    t = m["test"]
    print(f"{m['model']} model, Keras flavour {m['keras']}: "
          f"trained on {m['sizes']['train']} texts in {m['train_seconds']} s ({m['epochs_run']} epochs); "
          f"test accuracy {t['accuracy']:.4f}, macro F1 {t['macro_f1']:.4f} on {t['n']} texts -> {args.out}")
    return 0


def _export(args) -> int:
    from .exporter import ExportOptions, export, summary_table

    opts = ExportOptions(formats=args.formats, precisions=args.precisions, opset=args.opset,
                         calibration_data=args.calibration_data, tokenizer=args.tokenizer, labels=args.labels,
                         max_length=args.max_length, attention_weights=not args.no_attention_weights,
                         unsafe=args.unsafe, overwrite=args.overwrite, custom_objects=args.custom_objects,
                         c_array=args.c_array)
    manifest = export(args.source, args.out, opts)
    print(summary_table(manifest))
    print(f"exported {len(manifest['artifacts'])} artifacts in {manifest['export_seconds']} s -> {args.out}")
    return 0


def _verify(args) -> int:
    from pathlib import Path

    from .parity import terminal_summary, verify

    formats = None
    if args.formats:
        formats = C.parse_list(args.formats, C.EXPORT_FORMATS, "format")
    report_dir = Path(args.report_dir) if args.report_dir else Path(args.bundle) / "report"
    report = verify(args.bundle, data=args.data, report_dir=report_dir, formats=formats,
                    text_column=args.text_column, label_column=args.label_column, encoding=args.encoding,
                    custom_objects=args.custom_objects, strict=args.strict)
    print(terminal_summary(report))
    print(f"report: {report_dir}/parity.md, parity.json, parity.png")
    return 0 if report.passed else 1


def _doctor(args) -> int:
    from .doctor import doctor, render

    result = doctor(args.model, custom_objects=args.custom_objects, tokenizer=args.tokenizer, data=args.data,
                    unsafe=args.unsafe)
    print(json.dumps(result, indent=1, default=str) if args.json else render(result))
    return 1 if result["breaks_masking"] else 0


def _predict(args) -> int:
    from .predict import Predictor

    texts = list(args.texts)
    for i, t in enumerate(texts, 1):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:  # undecodable argv bytes arrive as surrogates
            raise UsageError(f"text argument {i} is not valid UTF-8; pass UTF-8 text") from None
    if args.input_file:
        if args.input_file == "-":
            try:
                texts += sys.stdin.buffer.read().decode("utf-8").splitlines()
            except UnicodeDecodeError as e:
                raise UsageError(f"standard input is not valid UTF-8 (offset {e.start})") from None
        else:
            from pathlib import Path

            p = Path(args.input_file)
            if not p.is_file():
                raise UsageError(f"input file not found: {p}" if not p.exists() else f"expected a file, received a directory: {p}")
            try:
                texts += p.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as e:
                raise UsageError(f"{p} is not valid UTF-8 (offset {e.start})") from None
    if not texts:
        raise UsageError("no texts given: pass TEXT arguments or --input-file FILE|-")
    predictor = Predictor(args.bundle, runtime=args.runtime, precision=args.precision)
    results = predictor.predict(texts, batch_size=args.batch_size)
    for text, r in zip(texts, results):
        if args.json:
            print(json.dumps({"text": text, **r}, ensure_ascii=False))
        else:
            values = r.get("probabilities") or r.get("scores") or {}
            probs = ", ".join(f"{k}={v:.3f}" for k, v in values.items())
            label = ",".join(r["label"]) if isinstance(r["label"], list) else r["label"]
            print(f"{label}\t{probs}\t{text[:80]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``probattn`` command: train, export, verify, predict, package, bench.

Heavy imports happen inside each verb: ``--help`` and ``predict`` never import TensorFlow.
Errors print one line and exit 2 (bad input) or 1 (parity failure or internal error);
set PROBATTN_DEBUG=1 for a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from probattn.models.bounds import MAX_EMBEDDING_DIM, MAX_EPOCHS, MAX_TRAIN_BATCH
from probattn.models.errors import ProbattnError, UsageError, one_line
from probattn.models.text.tokenizer import DEFAULT_TOKENIZER_KIND, MAX_LENGTH_LIMIT
from probattn.models.text.tokenizer_guard import MAX_VOCAB

from . import contract as C
from . import runtimes
from .limits import MAX_BATCH


def _quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, the terminal's width found as ``shutil.get_terminal_size``
    finds it (``COLUMNS``, else the terminal of stdout, else 80) without importing
    ``shutil``, which with its archive modules costs ``predict``'s start-up a few ms."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            try:
                width = int(os.environ["COLUMNS"])
            except (KeyError, ValueError):
                width = 0
            if width <= 0:
                try:
                    width = os.get_terminal_size(sys.__stdout__.fileno()).columns
                except (AttributeError, ValueError, OSError):
                    width = 0
            width = (width or 80) - 2
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line, exit 2, like our own errors
        self.exit(2, f"probattn: error: {message} (see '{self.prog} --help')\n")


def _int_range(lo: int, hi: int):
    """An argparse type: an integer from ``lo`` to ``hi`` (what is allowed is in the message)."""
    allowed = f"a positive integer up to {hi:,}" if lo == 1 else f"an integer from {lo:,} to {hi:,}"

    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, received '{text}'") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"expected {allowed}, received {v}")
        return v

    parse.__name__ = "integer"
    return parse


def _positive_int(text):
    return _int_range(1, 2**31 - 1)(text)


def _add_data_file_args(parser):
    parser.add_argument("--text-column", default="text", help="text column of a CSV/JSONL file (default text)")
    parser.add_argument("--label-column", default="label", help="label column of a CSV/JSONL file (default label)")
    parser.add_argument("--encoding", default="utf-8", help="encoding of a CSV/JSONL file (default utf-8)")


#: the verbs of ``probattn``
VERBS = ("train", "export", "verify", "doctor", "predict", "package", "bench")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The command line; ``verb``: build only that verb's options (what ``main`` runs: the
    other verbs' parsers cost start-up time), None for every verb (``--help``)."""
    p = _Parser(prog="probattn", description="Train, export, verify and run a ProbAttention text classifier "
                "(or your own Keras text model).")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    if verb in (None, "train"):
        t = sub.add_parser("train", help="train the classifier on a dataset; writes RUN_DIR")
        t.add_argument("--dataset", default="rotten_tomatoes",
                       help="rotten_tomatoes (default), bbc_news, 20newsgroups, or a path to a .csv/.jsonl file")
        t.add_argument("--out", required=True, help="run directory to write (atomically)")
        _add_data_file_args(t)
        t.add_argument("--seed", type=_int_range(0, 2**32 - 1), default=0)
        t.add_argument("--epochs", type=_int_range(1, MAX_EPOCHS), default=4)
        t.add_argument("--max-length", type=_int_range(1, MAX_LENGTH_LIMIT),
                       help="tokens per text in training (default: 64 for rotten_tomatoes, 256 for bbc_news and "
                            "20newsgroups; for your own file the 95th percentile of its lengths, 16 to 256)")
        t.add_argument("--vocab-size", type=_int_range(3, MAX_VOCAB), default=20000)
        t.add_argument("--embedding-dim", type=_int_range(1, MAX_EMBEDDING_DIM), default=64)
        t.add_argument("--batch-size", type=_int_range(1, MAX_TRAIN_BATCH), default=32)
        t.add_argument("--limit", type=_int_range(0, 2**31 - 1), default=0,
                       help="use only N examples, drawn from every class in proportion (0 = all)")
        t.add_argument("--model", default="probattn",
                       help="architecture: probattn (default), dot, additive, mha, bilstm, probsparse (see README)")
        t.add_argument("--keras", default=None,
                       help="3 (Keras 3, what tf.keras is on TensorFlow 2.16+) or 2 (tf_keras); "
                       "default: the one a TensorFlow 2.21 user gets")
        t.add_argument("--tokenizer", default=DEFAULT_TOKENIZER_KIND,
                       help="portable (default: the same ids in Python, tokenizers.js and transformers.js; "
                       "tokenizer_config.json for JavaScript clients), wordlevel (the earlier default: NFKC, "
                       "lowercase, Whitespace split), regex (exactly MediaPipe "
                       "TextClassifier's regex tokenizer: case-sensitive split on [^0-9A-Za-z_']+, <PAD>=0, "
                       "<UNKNOWN>=1; its bundles get the mediapipe format) or regex-start (the same with <START> "
                       "first)")
        t.add_argument("--overwrite", action="store_true", help="replace an existing RUN_DIR")

    if verb in (None, "export"):
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
        e.add_argument("--max-length", type=_int_range(1, MAX_LENGTH_LIMIT),
                       help="training max length (default: from the run or tokenizer)")
        e.add_argument("--no-attention-weights", action="store_true", help=f"export only '{C.PROBABILITIES}'")
        e.add_argument("--no-onnx-int64", action="store_true",
                       help="skip the int64-input twin of each ONNX precision (model_<precision>_int64.onnx, for "
                       "clients that send int64 ids, such as transformers.js)")
        e.add_argument("--c-array", action="store_true",
                       help=f"also write {C.C_ARRAY_DIR}/: the fixed-shape int8 model, vocabulary and labels as C99 "
                       "const arrays (model 16-byte aligned) for a microcontroller build")
        e.add_argument("--one-graph", action="store_true",
                       help="every artifact from the int8-safe graph; by default the float files (SavedModel, ONNX, "
                       "TFLite fp32/fp16) take ProbAttention's float math: one pooling matmul, token scores from a "
                       "precomputed table after an embedding, the same outputs up to float32 rounding")
        e.add_argument("--unsafe", action="store_true", help="allow Lambda layers (runs code from the model file)")
        e.add_argument("--custom-objects", metavar="FILE.py",
                       help="your classes and functions the model uses (runs that file; recorded in the manifest)")
        e.add_argument("--overwrite", action="store_true", help="replace an existing bundle")

    if verb in (None, "verify"):
        v = sub.add_parser("verify", help="check every artifact of a bundle against Keras")
        v.add_argument("bundle")
        v.add_argument("--data", help="held-out texts: a .csv/.jsonl file or a dataset name (default: the bundle's test split)")
        _add_data_file_args(v)
        v.add_argument("--report-dir", help="where to write parity.json/.md/.png (default BUNDLE/report)")
        v.add_argument("--formats", help=f"only these formats (comma list of {', '.join(C.EXPORT_FORMATS)})")
        v.add_argument("--strict", action="store_true",
                       help="fail when a runtime is not installed or an artifact could not be run (for CI)")
        v.add_argument("--unsafe", action="store_true",
                       help="run what the safety checks refuse (Lambda layers, SavedModel ops outside the allow-list)")
        v.add_argument("--custom-objects", metavar="FILE.py",
                       help="the file the bundle was exported with, when it was (its SHA-256 is checked)")

    if verb in (None, "doctor"):
        d = sub.add_parser("doctor", help="what a Keras model does with padding, layer by layer (no export)")
        d.add_argument("model", help="a .keras/.h5 file, a SavedModel directory or a RUN_DIR")
        d.add_argument("--custom-objects", metavar="FILE.py", help="your classes and functions the model uses")
        d.add_argument("--tokenizer", help="tokenizer.json: probe with real texts from --data instead of random ids")
        d.add_argument("--data", help="texts to probe with (.csv/.jsonl/.txt or a dataset name; needs --tokenizer)")
        d.add_argument("--unsafe", action="store_true", help="allow Lambda layers (runs code from the model file)")
        d.add_argument("--json", action="store_true", help="print the diagnosis as JSON")

    if verb in (None, "predict"):
        free = runtimes.names(tensorflow_free=True)
        pr = sub.add_parser("predict", help=f"label texts with {', '.join(free)} (no TensorFlow)")
        pr.add_argument("bundle")
        pr.add_argument("texts", nargs="*")
        pr.add_argument("--runtime", default="onnxruntime",
                        help=f"one of {', '.join(free)} (default onnxruntime); each runs its first format: "
                        + ", ".join(f"{r} -> {runtimes.default_format(r)}" for r in free))
        pr.add_argument("--precision", default="fp32", help=f"one of {', '.join(C.PRECISIONS)} (default fp32)")
        pr.add_argument("--input-file", help="one text per line; '-' for stdin")
        pr.add_argument("--batch-size", type=_int_range(1, MAX_BATCH), default=64,
                        help=f"texts per runtime call, 1 to {MAX_BATCH:,} (default 64)")
        pr.add_argument("--json", action="store_true", help="one JSON object per line")
        pr.add_argument("--engine", default="local",
                        help="local (default: this process) or ray (Ray Data over an actor pool; a local cluster of "
                        "this machine's cores, or the cluster RAY_ADDRESS names; pip install 'probattn[ray]'). "
                        "Both give identical results")
        pr.add_argument("--threads", type=_positive_int,
                        help="the runtime's intra-op threads (default 1: one text gains nothing from more, and in "
                        "bulk the tokenizer runs on this thread while the runtime runs the previous window on its "
                        "own, so two cores are busy); at most the CPUs this process may use")
        pr.add_argument("--workers", type=_positive_int,
                        help="--engine ray: actors in the pool (default: one per CPU of the cluster)")

    if verb in (None, "package"):
        k = sub.add_parser("package", help="write serving layouts of a bundle: a Triton model repository, "
                           "a TF Serving versioned SavedModel")
        k.add_argument("bundle")
        k.add_argument("--serving", default="triton,tfserving",
                       help="comma list of triton, tfserving (default: both)")
        k.add_argument("--out", required=True, help="directory to write (atomically): OUT/triton/NAME, OUT/tfserving/NAME")
        k.add_argument("--name", default="probattn", help="model name in both layouts (default probattn)")
        k.add_argument("--precision", default="fp32", help="ONNX precision for Triton: fp32 (default), fp16 or int8")
        k.add_argument("--input-dtype", default="int32",
                       help="Triton's token_ids dtype: int32 (default) or int64 (the bundle's int64 ONNX twin)")
        k.add_argument("--version", type=_positive_int, default=1, help="model version folder (default 1)")
        k.add_argument("--max-batch-size", type=_positive_int, default=64, help="Triton max_batch_size (default 64)")
        k.add_argument("--overwrite", action="store_true", help="replace an earlier 'probattn package' output")

    if verb in (None, "bench"):
        b = sub.add_parser("bench", help="latency, throughput, size and accuracy per artifact and runtime")
        b.add_argument("bundle", nargs="?", help="the bundle to measure (not with --attention-scaling)")
        b.add_argument("--out", help="directory for bench.json/.md/.png (default BUNDLE/bench)")
        b.add_argument("--attention-scaling", action="store_true",
                       help="instead of a bundle: latency against sequence length of ProbSparse self-attention and "
                            "of dense attention of the same size, in LiteRT and onnxruntime (needs --out)")
        b.add_argument("--lengths", help="with --attention-scaling: comma list of lengths (default 64 to 4096, "
                                         "doubling)")
        b.add_argument("--end-to-end", action="store_true",
                       help="instead of the per-artifact table: `predict` against its floor on onnxruntime and LiteRT "
                       "(bulk texts/s vs the bare runtime, one text vs a bare call, cold start vs bare imports)")
        b.add_argument("--e2e-texts", type=_int_range(1, 10_000_000),
                       help="--end-to-end: texts for the bulk figure (default 100,000; 10,000 with --quick)")
        b.add_argument("--texts", metavar="FILE", help="--end-to-end: real texts, one per line (default: the bundle's "
                       "test split)")
        b.add_argument("--threads", default="1,all", help="comma list of thread counts and/or 'all' (default 1,all)")
        b.add_argument("--quick", action="store_true", help="fewer repetitions and shapes")
        b.add_argument("--runtimes", help=f"only these runtimes (comma list of {', '.join(runtimes.names())})")
        b.add_argument("--unsafe", action="store_true",
                       help="run what the safety checks refuse (Lambda layers, SavedModel ops outside the allow-list)")
        b.add_argument("--custom-objects", metavar="FILE.py",
                       help="the file the bundle was exported with, when it was (its SHA-256 is checked)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = argv[0] if argv else None
    parser = build_parser(first if first in VERBS else None)
    args, extra = parser.parse_known_args(argv)
    if extra:  # texts given after options: `probattn predict BUNDLE --runtime litert "text"`
        if args.verb == "predict" and not any(x.startswith("-") for x in extra):
            args.texts = list(args.texts) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from probattn.models.termination import exit_code, graceful_termination, signal_name
    from probattn.models.text.tokenizer_guard import is_panic

    verb = args.verb
    try:
        with graceful_termination(verb=verb):  # SIGTERM and SIGHUP clean up like Ctrl-C
            return _dispatch(args)
    except ProbattnError as e:
        print(f"probattn {verb}: error: {one_line(e, 600)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        name = signal_name(e)
        what = "interrupted" if name == "SIGINT" else f"terminated by {name}"
        print(f"probattn {verb}: {what}; nothing was written", file=sys.stderr)
        return exit_code(e)
    except BrokenPipeError:
        return 0
    except MemoryError:
        print(f"probattn {verb}: error: ran out of memory; nothing was written (use smaller inputs or a "
              "bigger machine)", file=sys.stderr)
        return 1
    except OSError as e:
        known = os_error_line(e)
        if known is None:
            return _internal(verb, e)
        print(f"probattn {verb}: error: {known[0]}", file=sys.stderr)
        return known[1]
    except Exception as e:  # a bug or an unexpected library failure: one line, not a wall
        if "No space left on device" in str(e):  # TensorFlow reports ENOSPC in its own exceptions
            print(f"probattn {verb}: error: no space left on the device; nothing was written (free some space or "
                  "choose another --out)", file=sys.stderr)
            return 1
        return _internal(verb, e)
    except BaseException as e:  # pyo3's PanicException is a BaseException
        if not is_panic(e) or os.environ.get("PROBATTN_DEBUG"):
            raise
        print(f"probattn {verb}: error: a Rust library panicked ({one_line(e, 300)})", file=sys.stderr)
        return 1


def _internal(verb, e) -> int:
    if os.environ.get("PROBATTN_DEBUG"):
        raise e
    print(f"probattn {verb}: internal error: {type(e).__name__}: {one_line(e, 400)} "
          "(set PROBATTN_DEBUG=1 for a traceback)", file=sys.stderr)
    return 1


def os_error_line(e: OSError):
    """``(message, exit code)`` for a full disk or a permission problem, else None."""
    import errno

    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device{where}; nothing was written (free some space or choose another "
                "--out)", 1)
    if e.errno == errno.EFBIG:
        return f"a file grew past the file-size limit{where}; nothing was written", 1
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}; choose a path you can write, or fix its permissions", 2
    if e.errno == errno.EROFS:
        return f"read-only file system{where}; choose a writable path", 2
    return None


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
    if args.verb == "package":
        return _package(args)
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
                      batch_size=args.batch_size, limit=args.limit, model=args.model,
                      tokenizer=args.tokenizer, keras=args.keras)
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
                         onnx_int64=not args.no_onnx_int64, unsafe=args.unsafe, overwrite=args.overwrite,
                         custom_objects=args.custom_objects,
                         c_array=args.c_array, float_graph=not args.one_graph)
    manifest = export(args.source, args.out, opts)
    print(summary_table(manifest))
    print(f"exported {len(manifest['artifacts'])} artifacts in {manifest['export_seconds']} s -> {args.out}")
    return 0


def _package(args) -> int:
    from .serving import package

    summary = package(args.bundle, args.out, targets=args.serving, name=args.name, precision=args.precision,
                      input_dtype=args.input_dtype, version=args.version, max_batch_size=args.max_batch_size,
                      overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr, flush=True))
    for target, info in summary["targets"].items():
        print(f"{target}: {args.out}/{info['model_dir']} ({info['check']})")
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
                    strict=args.strict, unsafe=args.unsafe, default_report_dir=not args.report_dir,
                    custom_objects=args.custom_objects)
    print(terminal_summary(report))
    print(f"report: {report_dir}/parity.md, parity.json, parity.png")
    return 0 if report.passed else 1


def _doctor(args) -> int:
    from .doctor import doctor, render

    result = doctor(args.model, custom_objects=args.custom_objects, tokenizer=args.tokenizer, data=args.data,
                    unsafe=args.unsafe)
    print(json.dumps(result, indent=1, default=str) if args.json else render(result))
    return 1 if result["breaks_masking"] else 0


#: set by a ``predict --engine local`` that printed every answer (``entry`` may then exit at once)
_ANSWERED_LOCALLY = False


def _predict(args) -> int:
    """Texts from the arguments, then ``--input-file`` (or stdin) read as it arrives: each
    batch is run and printed as soon as it is complete, or as soon as no more input is
    waiting, so memory holds one batch and a pipe gets answers line by line. With
    ``--engine ray`` the whole input is read first and labelled by an actor pool."""
    import gc

    from .predict import ENGINES, Predictor, predict_texts

    texts = list(args.texts)
    for i, t in enumerate(texts, 1):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:  # undecodable argv bytes arrive as surrogates
            raise UsageError(f"text argument {i} is not valid UTF-8; pass UTF-8 text") from None
    stream = None
    if args.input_file:
        stream = _open_input(args.input_file)
    if not texts and stream is None:
        raise UsageError("no texts given: pass TEXT arguments or --input-file FILE|-")
    if args.engine not in ENGINES:
        raise UsageError(f"unknown engine '{args.engine}'; allowed: {', '.join(ENGINES)}")
    if args.threads and args.engine == "ray":
        raise UsageError(f"--threads {args.threads} is for --engine local (each Ray actor runs one runtime thread)")
    if args.workers and args.engine != "ray":
        raise UsageError(f"--workers {args.workers} is for --engine ray; received --engine {args.engine}")
    out = _Output(args.json)
    try:
        if args.engine == "ray":  # bulk: every text, then one pass over the pool
            if stream is not None:
                texts += [t for batch, _ in _stream_batches(stream, args.batch_size) for t in batch]
            predictor, probs = predict_texts(args.bundle, texts, runtime=args.runtime, precision=args.precision,
                                             batch_size=args.batch_size, engine=args.engine, workers=args.workers)
            out.write(texts, map(predictor.result, probs))
        else:
            gc.disable()  # loading allocates many long-lived objects and no cycles worth a collection
            try:
                predictor = Predictor(args.bundle, runtime=args.runtime, precision=args.precision,
                                      threads=args.threads)
            finally:
                gc.enable()
            if texts:
                out.write(texts, predictor.predict(texts, batch_size=args.batch_size))
            if stream is not None:
                _predict_stream(predictor, stream, args.batch_size, out)
    finally:
        if stream is not None and stream[0] != 0:
            os.close(stream[0])
    if out.failed:
        raise ProbattnError(f"{out.failed} of {out.count} texts got no label: {out.first_error}")
    global _ANSWERED_LOCALLY
    _ANSWERED_LOCALLY = args.engine == "local"
    return 0


def _open_input(name):
    """``(fd, shown name)``: stdin for '-', else a file or a pipe (a FIFO streams; a
    directory or a missing file is refused)."""
    if name == "-":
        return 0, "standard input"
    import stat

    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"input file not found: {name}") from None
    except IsADirectoryError:
        raise UsageError(f"expected a file, received a directory: {name}") from None
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
        os.close(fd)
        raise UsageError(f"expected a file, received a directory: {name}")
    return fd, name


#: a line is refused past this many bytes (UTF-8 takes up to 4 bytes a character, plus \r\n)
def _max_line_bytes():
    from probattn.models.bounds import MAX_TEXT_CHARS

    return 4 * MAX_TEXT_CHARS + 2


def read_blocks(fd: int, shown: str):
    """``(texts, more_waiting)`` for the lines of ``fd`` as they arrive, a block at a time
    (every complete line read so far), split on ``\n`` only (a ``\r`` before it is
    dropped: ``\r\n`` files); U+2028, form feed, NEL and the like stay inside the text.
    ``more_waiting``: another line can be read without blocking. A line over
    ``MAX_TEXT_CHARS`` characters or not UTF-8 is refused with its number, after the lines
    before it are given."""
    import select

    from probattn.models.bounds import MAX_TEXT_CHARS

    cap = _max_line_bytes()
    buf, lineno, eof, scanned = bytearray(), 0, False, 0

    def waiting():
        if eof:
            return False
        try:
            return bool(select.select([fd], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def decode(raw):
        nonlocal lineno
        lineno += 1
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{shown} is not valid UTF-8 (line {lineno}, byte {e.start + 1}); pass UTF-8 text") from None
        if len(text) > MAX_TEXT_CHARS:
            raise UsageError(f"{shown} line {lineno} has {len(text):,} characters; at most {MAX_TEXT_CHARS:,} allowed")
        return text

    while True:
        nl = buf.rfind(b"\n", scanned)
        if nl >= 0:  # every complete line in the buffer, decoded at once (a \n byte is never inside a UTF-8 character)
            block = bytes(buf[:nl])
            del buf[:nl + 1]
            scanned = 0
            try:
                texts = block.decode("utf-8").split("\n")
            except UnicodeDecodeError:
                texts = None
            if texts is not None and b"\r" in block:
                texts = [t[:-1] if t.endswith("\r") else t for t in texts]
            if texts is None or max(map(len, texts)) > MAX_TEXT_CHARS:
                good = []  # line by line: the error names its line, after the lines before it
                for raw in block.split(b"\n"):
                    try:
                        good.append(decode(raw))
                    except UsageError:
                        if good:
                            yield good, True
                        raise
                yield good, b"\n" in buf or waiting()
                continue
            lineno += len(texts)
            yield texts, waiting()
            continue
        scanned = len(buf)
        if eof:
            if buf:
                text = decode(bytes(buf))
                buf.clear()
                yield [text], False
            return
        if len(buf) > cap:
            raise UsageError(f"{shown} line {lineno + 1} is longer than {MAX_TEXT_CHARS:,} characters; at most "
                             f"{MAX_TEXT_CHARS:,} allowed")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            eof = True
        else:
            buf += chunk


def _stream_batches(stream, batch_size):
    """``(window, flush)`` of ``predict.windows`` over the input's lines as they arrive."""
    from .predict import windows_of_blocks

    return windows_of_blocks(read_blocks(*stream), batch_size)


def _predict_stream(predictor, stream, batch_size, out):
    for window, outs in predictor.iter_outputs(_stream_batches(stream, batch_size), batch_size,
                                               predictor.result_heads):
        out.write_outputs(window, outs, predictor)


#: characters that some line readers (``str.splitlines``, editors) take as line breaks
_LINE_BREAKS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def _one_json_line(row) -> str:
    """One JSON object on one line for every reader: NaN is refused (``allow_nan=False``; the
    caller puts null), and the line breaks JSON leaves raw (NEL, U+2028, U+2029) are escaped."""
    text = json.dumps(row, ensure_ascii=False, allow_nan=False)
    for c in "\x85\u2028\u2029":
        text = text.replace(c, f"\\u{ord(c):04x}")
    return text


_AS_SPACES = str.maketrans({c: " " for c in _LINE_BREAKS})


def _shown(text: str) -> str:
    """The start of a text as echoed in plain output: line breaks shown as spaces."""
    text = text[:80]
    return text if text.isprintable() else text.translate(_AS_SPACES)  # every line break is unprintable


class _Output:
    """Prints results as they come (flushed per batch). JSON lines are valid JSON: a value
    that is not a finite number is ``null`` and the row carries ``"nan": true`` and an
    ``"error"``; such a row counts as a failure (the command exits 1 at the end)."""

    #: plain lines of at most this many labels use the tables of ``_tables``
    TABLE_LABELS = 64

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.count = self.failed = 0
        self.first_error = None
        self._cache = {}

    def _tables(self, labels) -> tuple:
        """``(labels, per-label strings)`` as object arrays: the labels, and per label
        ``"label=0.000"`` .. ``"label=1.000"`` indexed by thousandths (made once per label set)."""
        import numpy as np

        key = tuple(labels)
        if key not in self._cache:
            values = ["%d.%03d" % divmod(v, 1000) for v in range(1001)]
            self._cache[key] = (np.array(key, dtype=object),
                                [np.array([f"{l}={v}" for v in values], dtype=object) for l in labels])
        return self._cache[key]

    def write_outputs(self, texts, outs, predictor):
        """``write`` from ``Predictor.outputs`` arrays: plain lines of a single softmax head
        are formatted straight from the array (the same text ``write`` prints)."""
        import numpy as np

        if self.as_json or not predictor._single:
            return self.write(texts, predictor.results(texts, outs))
        probs = outs[predictor.heads[0]["output"]]
        finite = np.isfinite(probs).all(axis=1)
        if not finite.all():
            return self.write(texts, predictor.results(texts, outs))
        labels = predictor.labels
        line = "%s\t" + ", ".join(l.replace("%", "%%") + "=%.3f" for l in labels) + "\t%s"
        best = probs.argmax(axis=1)
        # the result dicts round to 6 places before printing 3: that differs from printing 3
        # places directly only within 1e-6 of a rounding edge (k + 0.5) / 1000; rows with such
        # a value are rounded first
        wide = probs.astype(np.float64) * 1000.0
        edge = np.abs(np.mod(wide, 1.0) - 0.5) < 2e-3
        twice = np.flatnonzero(edge.any(axis=1)).tolist()
        thousandths = np.rint(wide)
        if len(labels) <= self.TABLE_LABELS and thousandths.size and 0 <= thousandths.min() and thousandths.max() <= 1000:
            # away from an edge, "%.3f" of p is the string of its nearest thousandth: looked up
            q = thousandths.astype(np.int64)
            names, tables = self._tables(labels)
            cols = [tables[j][q[:, j]] for j in range(len(labels))]
            mid = list(map(", ".join, zip(*cols))) if len(cols) > 1 else cols[0].tolist()
            lines = list(map("\t".join, zip(names[best].tolist(), mid, map(_shown, texts))))
            for i in twice:
                lines[i] = line % (labels[best[i]], *[round(p, 6) for p in probs[i].tolist()], _shown(texts[i]))
        else:
            rows = probs.tolist()
            for i in twice:
                rows[i] = [round(p, 6) for p in rows[i]]
            lines = [line % (labels[k], *row, _shown(text)) for k, row, text in zip(best.tolist(), rows, texts)]
        self.count += len(lines)
        if lines:
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()

    def write(self, texts, results):
        lines = []
        for text, r in zip(texts, results):
            self.count += 1
            bad = r.get("error")
            if bad:
                self.failed += 1
                self.first_error = self.first_error or f"text {self.count}: {bad}"
            if self.as_json:
                row = {"text": text, **r}
                if bad:
                    row["nan"] = True
                lines.append(_one_json_line(row))
            elif bad:
                lines.append(f"ERROR\t{bad}\t{_shown(text)}")
            else:
                values = r.get("probabilities") or r.get("scores") or {}
                probs = ", ".join(f"{k}={v:.3f}" for k, v in values.items())
                label = ",".join(r["label"]) if isinstance(r["label"], list) else r["label"]
                lines.append(f"{label}\t{probs}\t{_shown(text)}")
        if lines:
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()


def entry() -> None:
    """The ``probattn`` command (the console script and ``python -m``): ``main``, then exit.
    A ``predict`` that answered exits at once (``os._exit`` once stdout and stderr are
    flushed): it wrote no file and holds nothing to release, and tearing the interpreter
    down (every module, the runtime's objects) is a large share of a one-text call's wall
    time. Every other verb, a predict that failed and ``--engine ray`` (its cluster is shut
    down at exit) exit the normal way."""
    code = main(sys.argv[1:])
    if code == 0 and _ANSWERED_LOCALLY:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (BrokenPipeError, OSError):
            sys.exit(code)  # let the normal exit report what it can
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()

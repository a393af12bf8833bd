"""Why ProbAttention masks and pools the way it does: full int8 on both LiteRT kernel families.

Trains the classifier twice on the same data and seed, once with ``ProbAttention`` and
once with ``NaiveProbAttention`` (``tf.where(mask, u, -1e4)`` + ``reduce_sum(x * a)``),
exports each to full-integer int8 TFLite with the same calibration texts, runs
``probattn verify`` on both, and prints top-1 agreement with Keras per kernel family.

    python scripts/int8_masking_demo.py [--dataset rotten_tomatoes] [--epochs 2] [--out DIR]
"""
import argparse
import sys
import tempfile
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="rotten_tomatoes")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", help="keep the runs and bundles here (default: a temporary directory)")
    args = ap.parse_args(argv)

    from probattn.export.exporter import ExportOptions, export
    from probattn.export.parity import verify
    from probattn.models.naive import NaiveProbAttention
    from probattn.models.train import TrainConfig, train

    root = Path(args.out or tempfile.mkdtemp(prefix="probattn-int8-demo-"))
    rows = []
    for name, layer in (("ProbAttention", None), ("NaiveProbAttention", NaiveProbAttention)):
        run = root / f"{name}-run"
        print(f"== {name}: train, export int8, verify", file=sys.stderr)
        train(TrainConfig(dataset=args.dataset, epochs=args.epochs), run, overwrite=True, verbose=0,
              attention_layer=layer)
        bundle = root / f"{name}-bundle"
        export(run, bundle, ExportOptions(formats=("tflite",), precisions=("int8",), overwrite=True))
        report = verify(bundle, quiet=True)
        for r in report.rows:
            rows.append((name, r["artifact"], r["runtime"], r["accuracy"], r["top1_agreement"], r["passed"]))
    print("| layer | artifact | runtime | accuracy | top-1 agreement with Keras | verdict |")
    print("|---|---|---|---|---|---|")
    for name, art, rt, acc, agree, ok in rows:
        print(f"| {name} | {art} | {rt} | {acc:.4f} | {agree:.4f} | {'PASS' if ok else 'FAIL'} |")
    print(f"(runs and bundles in {root})", file=sys.stderr)


if __name__ == "__main__":
    main()

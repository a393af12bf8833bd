"""Train every architecture of the model family on a dataset, export every format, verify.

    python scripts/zoo_report.py [--out runs/zoo] [--keras 3] [--dataset rotten_tomatoes] [--models a,b]

For each ``--model``: ``probattn train`` (default settings), ``probattn export`` (every
format and precision), ``probattn verify``; prints one Markdown row per model with its
test accuracy, the artifacts built or left out, and verify's verdict. Writes
OUT/zoo.md and OUT/zoo.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from probattn.models.zoo import ARCHITECTURES


def sh(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "probattn.export.cli", *map(str, args)], capture_output=True,
                          text=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/zoo")
    ap.add_argument("--keras", default="3")
    ap.add_argument("--dataset", default="rotten_tomatoes")
    ap.add_argument("--models", default=",".join(ARCHITECTURES))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        run, bundle = out / f"{name}-k{args.keras}" / "run", out / f"{name}-k{args.keras}" / "bundle"
        row = {"model": name, "keras": args.keras}
        t = time.perf_counter()
        p = sh("train", "--dataset", args.dataset, "--model", name, "--keras", args.keras, "--out", run, "--overwrite")
        row["train_seconds"] = round(time.perf_counter() - t, 1)
        if p.returncode:
            row["error"] = "train: " + p.stderr.strip().splitlines()[-1]
            rows.append(row)
            continue
        metrics = json.loads((run / "metrics.json").read_text())
        row["accuracy"], row["macro_f1"] = metrics["test"]["accuracy"], metrics["test"]["macro_f1"]
        t = time.perf_counter()
        p = sh("export", run, "--out", bundle, "--overwrite")
        row["export_seconds"] = round(time.perf_counter() - t, 1)
        if p.returncode:
            row["error"] = "export: " + p.stderr.strip().splitlines()[-1]
            rows.append(row)
            continue
        manifest = json.loads((bundle / "manifest.json").read_text())
        row["artifacts"] = len(manifest["artifacts"])
        row["left_out"] = manifest["left_out"]
        row["rewrites"] = manifest["rewrites"]
        t = time.perf_counter()
        p = sh("verify", bundle)
        row["verify_seconds"] = round(time.perf_counter() - t, 1)
        report = json.loads((bundle / "report" / "parity.json").read_text())
        row["verify_exit"] = p.returncode
        row["checks"] = len(report["checks"])
        row["failures"] = report["failures"]
        row["skipped"] = report["skipped"]
        row["pairs"] = len(report["rows"])
        rows.append(row)
        print(json.dumps(row)[:400], file=sys.stderr, flush=True)
    lines = ["| model | Keras | test accuracy | macro F1 | artifacts | left out | rewrites | verify |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['keras']} | {r.get('accuracy', '-')} | | | | | {r['error'][:120]} |")
            continue
        verdict = (f"PASS ({r['checks']} checks, {r['pairs']} artifact x runtime pairs)" if r["verify_exit"] == 0
                   else f"FAIL: {len(r['failures'])} of {r['checks']} checks")
        left = "; ".join(f"{x['format']} {x['precision']}" for x in r["left_out"]) or "none"
        lines.append(f"| {r['model']} | {r['keras']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['artifacts']} | "
                     f"{left} | {', '.join(r['rewrites']) or '-'} | {verdict} |")
    table = "\n".join(lines)
    (out / "zoo.md").write_text(table + "\n")
    (out / "zoo.json").write_text(json.dumps(rows, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Wall time and peak memory of a full export: this checkout against an earlier revision,
interleaved in one session (the machine's load hits both sides alike).

    bash scripts/env.sh is sourced by the caller; then
    python scripts/export_compare.py REV [RUN_DIR] [--rounds N]

REV's ``export/`` and ``models/`` are taken with ``git archive`` into a temporary
``probattn`` package that is put first on PYTHONPATH for its runs (the working tree is not
touched; both sides use this environment's packages). Peak RSS is summed over the
exporter's whole process tree (children such as a converter or a runtime worker
included), sampled every 50 ms from /proc. Linux only.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(root: int) -> int:
    """Bytes of RSS summed over ``root`` and all its descendants."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
        todo += children.get(pid, [])
    return total


def measure(run_dir: Path, out: Path, env: dict) -> tuple:
    """``(wall seconds, peak tree RSS bytes)`` of ``probattn export RUN --out OUT``."""
    cmd = [sys.executable, "-m", "probattn.export.cli", "export", str(run_dir), "--out", str(out), "--overwrite"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.05)
    wall = time.perf_counter() - t
    err = proc.stderr.read()
    if proc.returncode != 0:
        sys.exit(f"export failed (exit {proc.returncode}): {(err.strip().splitlines() or ['no output'])[-1]}")
    return wall, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="the git revision to compare against (e.g. the previous release's commit)")
    ap.add_argument("run_dir", nargs="?", default=str(ROOT / "runs" / "main" / "run"))
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    if not (run_dir / "model.keras").is_file():
        sys.exit(f"no run at {run_dir} (expected model.keras there; run scripts/main_job.sh first)")
    with tempfile.TemporaryDirectory(prefix="probattn-export-compare-") as tmp:
        tmp = Path(tmp)
        pkg = tmp / "pkg" / "probattn"
        pkg.mkdir(parents=True)
        try:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.rev, "export", "models"],
                                     capture_output=True, check=True).stdout
        except subprocess.CalledProcessError as e:
            sys.exit(f"git archive {args.rev} failed: {e.stderr.decode(errors='replace').strip()}")
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(pkg, filter="data")
        sides = {args.rev: dict(os.environ, PYTHONPATH=str(tmp / "pkg")),
                 "this checkout": {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}}
        got = {name: [] for name in sides}
        for r in range(args.rounds):
            for name, env in sides.items():
                wall, peak = measure(run_dir, tmp / "bundle", env)
                got[name].append((wall, peak))
                print(f"round {r + 1}, {name}: {wall:.1f} s wall, peak RSS of the process tree {peak / 1e6:,.0f} MB",
                      flush=True)
        print("\n| code | wall (each round) | peak RSS, process tree (each round) |\n|---|---|---|")
        for name, rows in got.items():
            print(f"| {name} | {', '.join(f'{w:.1f} s' for w, _ in rows)} (median {statistics.median(w for w, _ in rows):.1f} s) "
                  f"| {', '.join(f'{p / 1e6:,.0f} MB' for _, p in rows)} |")


if __name__ == "__main__":
    main()

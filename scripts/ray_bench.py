"""texts/s of ``probattn predict`` with ``--engine local`` (one process) and ``--engine ray``
(Ray Data, an actor pool of one actor per core), and whether their outputs are identical.

usage: python scripts/ray_bench.py BUNDLE [--sizes 1000,10000,100000] [--workers N] [--out ray_bench.json]

Texts are the bundle's test split repeated to each size. For each size:
* local: ``predict_texts(engine="local")`` (loads the bundle, tokenizes, runs), wall time,
  with ``predict``'s default of one runtime thread, as each Ray actor runs;
* ray, cold: ``predict_texts(engine="ray")`` as the CLI runs it: starts a local cluster,
  runs, shuts it down (what ``probattn predict --engine ray`` costs end to end);
* ray, warm: the same on a cluster that is already up (what a long-running cluster pays:
  the actor pool start, the transfer of texts and results, and the work).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import numpy as np
    import ray

    from probattn.export.predict import predict_texts
    from probattn.export.versions import machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("ray_bench.json"))
    a = ap.parse_args(argv)
    base = [json.loads(l)["text"] for l in (a.bundle / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    report = {"machine": machine(), "ray": ray.__version__, "load_average_start": os.getloadavg(), "sizes": {}}
    for n in [int(s) for s in a.sizes.split(",")]:
        texts = [base[i % len(base)] for i in range(n)]
        row = {}
        t = time.perf_counter()
        _, local = predict_texts(a.bundle, texts)
        row["local_s"] = time.perf_counter() - t
        t = time.perf_counter()
        _, cold = predict_texts(a.bundle, texts, engine="ray", workers=a.workers)
        row["ray_cold_s"] = time.perf_counter() - t
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False,
                 _node_ip_address="127.0.0.1")
        try:
            predict_texts(a.bundle, base[:256], engine="ray", workers=a.workers)  # first pipeline: warms imports
            t = time.perf_counter()
            _, warm = predict_texts(a.bundle, texts, engine="ray", workers=a.workers)
            row["ray_warm_s"] = time.perf_counter() - t
        finally:
            ray.shutdown()
        row["identical"] = bool(np.array_equal(local, cold) and np.array_equal(local, warm))
        for k in ("local", "ray_cold", "ray_warm"):
            row[f"{k}_texts_per_s"] = round(n / row[f"{k}_s"])
            row[f"{k}_s"] = round(row[f"{k}_s"], 2)
        report["sizes"][n] = row
        print(f"{n:>7,} texts: local {row['local_texts_per_s']:>7,}/s ({row['local_s']} s)  "
              f"ray cold {row['ray_cold_texts_per_s']:>7,}/s ({row['ray_cold_s']} s)  "
              f"ray warm {row['ray_warm_texts_per_s']:>7,}/s ({row['ray_warm_s']} s)  identical: {row['identical']}",
              flush=True)
    report["load_average_end"] = os.getloadavg()
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"load average {report['load_average_start'][0]:.2f} -> {report['load_average_end'][0]:.2f}; "
          f"written {a.out}")
    return 0 if all(r["identical"] for r in report["sizes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

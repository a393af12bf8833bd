"""The user-model collection (tests/user_models.py) with every format and precision:
model x Keras flavour x format -> outcome, as a Markdown table.

    python scripts/user_models_table.py [--out DIR] [--only NAME,...]

Each model is exported without --formats/--precisions (so what cannot be built is left out
and reported), verified (every runtime in a child process) and predicted from its ONNX
fp32 file against the user's own model. Writes DIR/table.md and DIR/results.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import user_models as U  # noqa: E402

FORMATS = (("savedmodel", "fp32"), ("tflite", "fp32"), ("tflite", "fp16"), ("tflite", "int8-dynamic"),
           ("tflite", "int8"), ("onnx", "fp32"), ("onnx", "fp16"), ("onnx", "int8"))


def cell(result, fmt, precision) -> str:
    from probattn.export import contract as C

    path = C.artifact_filename(fmt, precision)
    left = [x for x in result["left_out"] if (x["format"], x["precision"]) == (fmt, precision)]
    if left:
        return "left out: " + left[0]["reason"][:60].replace("|", "/")
    rows = {rt: ok for (a, rt), ok in result["rows"].items() if a == path}
    if not rows:
        return "-"
    bad = sorted(rt for rt, ok in rows.items() if not ok)
    if not bad:
        return "PASS"
    if result["case_expect"] == "broken" and all(result["row_cases_follow_model"].get((path, rt)) for rt in bad):
        return "as the model"
    return "FAIL " + ",".join(bad)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/user_models")
    ap.add_argument("--only", help="comma list of case names")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = [c for c in U.COLLECTION if not args.only or c.name in args.only.split(",")]
    results = []
    for case in cases:
        t = time.perf_counter()
        print(f"== {case.name}", file=sys.stderr, flush=True)
        try:
            built = U.build(case, out / case.name / "src")
            res = U.run(built, out / case.name / "bundle", formats=None, precisions=None, all_formats=True)
        except Exception as e:
            traceback.print_exc()
            results.append({"name": case.name, "flavour": case.flavour, "error": f"{type(e).__name__}: {e}"})
            continue
        ref = [a for a in res["manifest"]["artifacts"] if a["format"] == "keras"][0]["path"]
        model_cases = {f.split(", case ")[1].split(":")[0] for f in res["failures"] if f.startswith(f"{ref} on")}
        follow = {}
        for (a, rt), ok in res["rows"].items():
            mine = [f for f in res["failures"] if f.startswith(f"{a} on {rt}, case ")]
            follow[(a, rt)] = all(f.split(", case ")[1].split(":")[0] in model_cases for f in mine)
        res.update(case_expect=case.expect, row_cases_follow_model=follow, seconds=round(time.perf_counter() - t, 1))
        results.append(res)
    lines = ["| model | Keras | expect | " + " | ".join(f"{f} {p}" for f, p in FORMATS)
             + " | bundle vs user's model | verify |",
             "|---|---|---|" + "---|" * len(FORMATS) + "---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['flavour']} | | ERROR {r['error'][:80]} |")
            continue
        verdict = "PASS" if r["passed"] else f"exit 1: {r['diagnosis'].get('starts_at') or 'see report'}"
        lines.append(f"| {r['name']} | {'Keras 3' if r['flavour'] == '3' else 'tf_keras'} | {r['case_expect']} | "
                     + " | ".join(cell(r, f, p) for f, p in FORMATS)
                     + f" | {r['max_abs']:.2g}, {r['flipped']} flipped | {verdict} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k not in ("manifest", "rows", "row_cases_follow_model")} for r in results],
        indent=1, default=str))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Parity engine: every artifact x runtime x case family against the Keras reference.

``verify(bundle)`` runs the Keras model (the reference) and every artifact in every
runtime it supports on real held-out texts and on generated case families, checks the
named tolerances below, and writes ``parity.json``, ``parity.md`` and ``parity.png``.
Padding invariance is checked on the Keras model itself too: a model whose masking is
broken fails even when every runtime agrees with it.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import bundle as B
from .errors import UsageError
from .fsutil import directory_lock
from .runners import VARIANTS, runner_for
from .tokenizer import PAD_ID, UNK_ID, encode, load_tokenizer
from .versions import machine, versions

# ---------------------------------------------------------------------------------------
# Tolerances, per precision, with the reason beside each.
# ---------------------------------------------------------------------------------------
#: fp32 artifacts run the same float32 math as Keras; only op order and fused kernels
#: differ, which moves probabilities by a few float32 ulps (measured ~2e-7).
FP32_MAX_ABS = 1e-5
#: float16 has an 11-bit mantissa (relative step ~1e-3); a probability in [0, 1] after
#: two dense layers can move by a few of those steps.
FP16_MAX_ABS = 5e-3
#: Quantized artifacts are judged by decisions, not values: the same top-1 class on at
#: least 98% of real texts, and accuracy within one point of Keras.
INT8_MIN_AGREEMENT = 0.98
INT8_MAX_ACCURACY_DROP = 0.01
#: Appending padding must not move float32 outputs: masked steps carry at most
#: exp(-20) of the softmax mass before the mask zeroes them.
FP32_PAD_INVARIANCE = 1e-6
#: For fp16 and int8 artifacts padding may move outputs no more than the precision's own
#: error budget against Keras (a pad must never be worth more than rounding).
FP16_PAD_INVARIANCE = FP16_MAX_ABS
#: int8: padding appended to real texts must not change a single decision.
INT8_PAD_MIN_AGREEMENT = 1.0
#: An all-padding row never reaches the attention arithmetic (its pooled vector is exactly
#: zero), so only the two dense layers' rounding remains: for int8 that is bounded by two
#: steps of the int8 softmax output scale (1/256).
INT8_ALL_PAD_MAX_ABS = 2 / 256
#: Attention on padded steps: the layer multiplies the weights by the mask, so any
#: precision must put (numerically) nothing there.
MAX_PAD_ATTENTION = 1e-6

TOLERANCES = {
    "fp32": {"max_abs": FP32_MAX_ABS, "pad_invariance": FP32_PAD_INVARIANCE},
    "fp16": {"max_abs": FP16_MAX_ABS, "pad_invariance": FP16_PAD_INVARIANCE},
    "int8-dynamic": {"min_top1_agreement": INT8_MIN_AGREEMENT, "max_accuracy_drop": INT8_MAX_ACCURACY_DROP,
                     "pad_min_top1_agreement": INT8_PAD_MIN_AGREEMENT},
    "int8": {"min_top1_agreement": INT8_MIN_AGREEMENT, "max_accuracy_drop": INT8_MAX_ACCURACY_DROP,
             "pad_min_top1_agreement": INT8_PAD_MIN_AGREEMENT},
    "keras": {"pad_invariance": FP32_PAD_INVARIANCE},
    "all": {"nan_inf": 0, "max_pad_attention": MAX_PAD_ATTENTION,
            "all_padding_row_max_abs": {"fp32": FP32_MAX_ABS, "fp16": FP16_MAX_ABS,
                                        "int8-dynamic": INT8_ALL_PAD_MAX_ABS, "int8": INT8_ALL_PAD_MAX_ABS}},
}

#: max relative error is taken over probabilities of at least this size (smaller ones
#: make any ratio meaningless)
REL_FLOOR = 1e-3
PAD_COUNTS = (1, 7, 64)
BATCH = 64


@dataclass
class Case:
    name: str
    batches: list  # list of int32 arrays
    labels: np.ndarray | None = None  # for accuracy
    base: list | None = None  # unpadded batches for padding-invariance families
    real: bool = False  # built from real texts (decision checks apply)


@dataclass
class Check:
    artifact: str
    runtime: str
    case: str
    metric: str
    value: float
    bound: float
    op: str  # "<=" or ">="
    passed: bool

    def message(self) -> str:
        rel = "within" if self.passed else "outside"
        return (f"{self.artifact} on {self.runtime}, case {self.case}: {self.metric} "
                f"{_fmt(self.value)} {rel} bound {self.op} {_fmt(self.bound)}")


@dataclass
class Report:
    rows: list = field(default_factory=list)  # one per artifact x runtime
    checks: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def failures(self):
        return [c for c in self.checks if not c.passed]

    @property
    def passed(self) -> bool:
        return bool(self.checks) and not self.failures


def _fmt(v) -> str:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    if isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1):
        return str(int(v))
    return f"{v:.3g}"


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------
def load_texts(bundle: Path, manifest: dict, data: str | None, text_column: str = "text",
               label_column: str = "label", encoding: str = "utf-8"):
    """Held-out texts and labels: ``--data`` (a file or dataset name) or the bundle's test split."""
    from .data import load_dataset, load_text_file, stratified_split

    if data:
        p = Path(data)
        if p.suffix.lower() in (".csv", ".jsonl") or p.exists():
            ds = load_text_file(p, text_column, label_column, encoding)
            return ds.texts, ds.labels, str(p)
        seed = int((manifest.get("source") or {}).get("seed") or 0)  # the split the run trained on
        test = stratified_split(load_dataset(data), seed=seed).test
        return test.texts, test.labels, f"{data} (test split)"
    name = manifest.get("test_data")
    if name and (bundle / name).is_file():
        ds = load_text_file(bundle / name)
        return ds.texts, ds.labels, f"bundle {name}"
    raise UsageError(f"{bundle} has no test split; pass --data FILE or a dataset name")


def build_cases(tokenizer, manifest: dict, texts, labels, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    max_len = int(manifest.get("max_length") or 64)
    vocab = int(manifest["vocab_size"])
    names = manifest["labels"]
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({l for l in labels if l not in index})
    y = None
    if labels is not None and not unknown:
        y = np.array([index[l] for l in labels], np.int32)
    elif unknown:
        print(f"note: labels {unknown[:5]} are not the bundle's {names}; accuracy is not computed",
              file=sys.stderr)
    texts = list(texts)
    heldout = [encode(tokenizer, texts[i:i + BATCH], max_len) for i in range(0, len(texts), BATCH)]
    cases = [Case("heldout", heldout, y, real=True)]
    base = heldout[:1]  # first 64 real texts, padded to their longest
    for k in PAD_COUNTS + (4 * max_len - base[0].shape[1],):
        if k <= 0:
            continue
        padded = [np.pad(b, ((0, 0), (0, k))) for b in base]
        name = f"pad+{k}" if k in PAD_COUNTS else f"pad_to_4x_max_length({4 * max_len})"
        cases.append(Case(name, padded, base=base, real=True))
    allpad = np.concatenate([base[0][:7], np.full((1, base[0].shape[1]), PAD_ID, np.int32)])
    cases.append(Case("all_padding_row", [allpad], real=True))
    cases.append(Case("length_1", [rng.integers(2, vocab, (32, 1), dtype=np.int32)]))
    cases.append(Case("max_length", [rng.integers(2, vocab, (16, max_len), dtype=np.int32)]))
    cases.append(Case("4x_max_length", [rng.integers(2, vocab, (8, 4 * max_len), dtype=np.int32)]))
    cases.append(Case("batch_1", [heldout[0][:1]], real=True))
    cases.append(Case("batch_64", [heldout[0][:64]], real=True))
    big = rng.integers(2, vocab, (8, 16), dtype=np.int32)
    big[:, ::3] = vocab - 1
    cases.append(Case("largest_id", [big]))
    unk = rng.integers(2, vocab, (16, 24), dtype=np.int32)
    unk[rng.random(unk.shape) < 0.8] = UNK_ID
    cases.append(Case("unknown_heavy", [unk]))
    return cases


# ---------------------------------------------------------------------------------------
# Running and comparing
# ---------------------------------------------------------------------------------------
def _run_case(runner, case: Case):
    outs = [runner.run(b) for b in case.batches]
    merged = {k: _concat([o[k] for o in outs]) for k in outs[0]}
    base = None
    if case.base is not None:
        bouts = [runner.run(b) for b in case.base]
        base = {k: _concat([o[k] for o in bouts]) for k in bouts[0]}
    return merged, base


def _concat(arrs):
    width = max(a.shape[1] for a in arrs) if arrs[0].ndim == 2 else None
    if width is not None and any(a.shape[1] != width for a in arrs):  # attention weights of varying length
        arrs = [np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in arrs]
    return np.concatenate(arrs)


def _metrics(out, ref, case: Case, base, keras_acc):
    p, r = out["probabilities"], ref["probabilities"]
    m = {}
    m["nan_inf"] = int(sum(np.count_nonzero(~np.isfinite(v)) for v in out.values()))
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.abs(p.astype(np.float64) - r)
        m["max_abs"] = float(np.nanmax(diff)) if np.isfinite(diff).any() else float("nan")
        m["mean_abs"] = float(np.nanmean(diff)) if np.isfinite(diff).any() else float("nan")
        big = np.abs(r) >= REL_FLOOR
        m["max_rel"] = float(np.nanmax(diff[big] / np.abs(r[big]))) if big.any() and np.isfinite(diff).any() else float("nan")
    if m["nan_inf"]:
        m["max_abs"] = float("inf")
    m["top1_agreement"] = float(np.mean(p.argmax(-1) == r.argmax(-1)))
    ids_rows = np.concatenate([b.max(axis=1) for b in case.batches])
    allpad = ids_rows == PAD_ID
    if allpad.any():
        m["all_pad_abs"] = float(np.max(diff[allpad])) if np.isfinite(p[allpad]).all() else float("inf")
    if case.labels is not None:
        acc = float(np.mean(p.argmax(-1) == case.labels))
        m["accuracy"] = acc
        if keras_acc is not None:
            m["accuracy_drop"] = keras_acc - acc
    if base is not None:
        bp = base["probabilities"]
        m["pad_invariance"] = float(np.max(np.abs(p.astype(np.float64) - bp))) if np.isfinite(p).all() else float("inf")
        m["pad_top1_agreement"] = float(np.mean(p.argmax(-1) == bp.argmax(-1)))
    if "attention_weights" in out:
        ids = np.concatenate([np.pad(b, ((0, 0), (0, out["attention_weights"].shape[1] - b.shape[1])))
                              for b in case.batches])
        w = out["attention_weights"]
        m["pad_attention"] = float(np.max(np.sum(np.where(ids == PAD_ID, np.abs(w), 0.0), axis=1)))
    return m


def _checks_for(artifact, runtime, precision, case: Case, m) -> list:
    """The checks for one artifact x runtime x case; every bound comes from TOLERANCES."""
    out = []

    def add(metric, bound, op):
        if metric not in m:
            return
        v = m[metric]
        ok = (v <= bound) if op == "<=" else (v >= bound)
        if isinstance(v, float) and math.isnan(v):
            ok = False
        out.append(Check(artifact, runtime, case.name, metric, v, bound, op, bool(ok)))

    common = TOLERANCES["all"]
    add("nan_inf", common["nan_inf"], "<=")
    add("pad_attention", common["max_pad_attention"], "<=")
    if artifact == "model.keras":  # the reference itself: masking must hold
        add("pad_invariance", TOLERANCES["keras"]["pad_invariance"], "<=")
        return out
    add("all_pad_abs", common["all_padding_row_max_abs"][precision], "<=")  # same on every runtime
    t = TOLERANCES[precision]
    if precision in ("fp32", "fp16"):
        add("max_abs", t["max_abs"], "<=")
        add("pad_invariance", t["pad_invariance"], "<=")
    else:
        if case.real:  # decisions are judged on real texts; random ids give near-ties
            add("top1_agreement", t["min_top1_agreement"], ">=")
        if case.name == "heldout":
            add("accuracy_drop", t["max_accuracy_drop"], "<=")
        add("pad_top1_agreement", t["pad_min_top1_agreement"], ">=")
    return out


def verify(bundle, data: str | None = None, report_dir=None, formats=None, quiet=False,
           check_hashes: bool = True, text_column: str = "text", label_column: str = "label",
           encoding: str = "utf-8") -> Report:
    bundle = Path(bundle).absolute()
    manifest = B.load_manifest(bundle)
    t0 = time.perf_counter()
    if report_dir is not None and Path(report_dir).exists() and not Path(report_dir).is_dir():
        raise UsageError(f"--report-dir exists and is not a directory: {report_dir}")
    # everything that can be refused is refused before the lock file is touched
    tok_path = B.verified_path(bundle, manifest["tokenizer"]) if check_hashes else bundle / manifest["tokenizer"]["path"]
    tokenizer = load_tokenizer(tok_path)
    texts, labels, source = load_texts(bundle, manifest, data, text_column, label_column, encoding)
    # every artifact's hash is checked, also those --formats leaves out
    paths = {a["path"]: (B.verified_path(bundle, a) if check_hashes else bundle / a["path"])
             for a in manifest["artifacts"]}
    # a shared lock: an export cannot replace the bundle while it is judged
    with directory_lock(bundle, shared=True):
        if B.load_manifest(bundle)["artifacts"] != manifest["artifacts"]:
            raise UsageError(f"{bundle} was replaced while verify started; run verify again")
        return _verify_locked(bundle, manifest, tokenizer, texts, labels, source, paths, report_dir,
                              formats, quiet, t0)


def _verify_locked(bundle, manifest, tokenizer, texts, labels, source, paths, report_dir, formats,
                   quiet, t0) -> Report:
    cases = build_cases(tokenizer, manifest, texts, labels)
    vocab = int(manifest["vocab_size"])
    report = Report(meta={"bundle": str(bundle), "data": source, "n_texts": len(texts),
                          "versions": versions(), "machine": machine(), "tolerances": TOLERANCES,
                          "cases": [c.name for c in cases]})
    say = (lambda *a: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))

    keras_entry = B.find_artifact(manifest, "keras")
    if keras_entry is None:
        raise UsageError(f"{bundle}: no Keras reference (model.keras) in the manifest")
    entries = [keras_entry] + [a for a in manifest["artifacts"] if a["format"] != "keras"
                               and (not formats or a["format"] in formats)]

    reference = {}
    keras_acc = None
    for entry in entries:
        for variant in VARIANTS[entry["format"]]:
            runner = runner_for(entry["format"], paths[entry["path"]], vocab, variant=variant)
            label = f"{entry['path']} on {runner.name}"
            reason = runner.unavailable()
            if reason:
                report.skipped.append({"artifact": entry["path"], "runtime": runner.name, "reason": reason})
                say(f"  - skip {label}: {reason}")
                continue
            t = time.perf_counter()
            per_case = {}
            with runner:
                for case in cases:
                    out, base = _run_case(runner, case)
                    if entry is keras_entry:
                        reference[case.name] = out
                    ref = reference[case.name]
                    m = _metrics(out, ref, case, base, keras_acc)
                    if entry is keras_entry and case.name == "heldout" and "accuracy" in m:
                        keras_acc = m["accuracy"]
                    per_case[case.name] = m
                    report.checks.extend(_checks_for(entry["path"], runner.name, entry["precision"], case, m))
            row = _summary_row(entry, runner.name, per_case)
            row["seconds"] = round(time.perf_counter() - t, 2)
            report.rows.append(row)
            row["passed"] = _row_passed(report, entry["path"], runner.name)
            verdict = "PASS" if row["passed"] else "FAIL"
            say(f"  {verdict} {label}  ({row['seconds']:.1f} s)")
    report.meta["seconds"] = round(time.perf_counter() - t0, 1)
    if report_dir is not None:
        write_report(report, Path(report_dir))
    accuracy_checked = any(c.metric == "accuracy_drop" for c in report.checks)
    report.meta["accuracy_checked"] = accuracy_checked
    verdict = {"passed": report.passed, "failures": len(report.failures), "checks": len(report.checks),
               "skipped": [f"{s['artifact']} on {s['runtime']}: {s['reason']}" for s in report.skipped],
               "formats": sorted({e["format"] for e in entries}), "data": source,
               "accuracy_checked": accuracy_checked,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    current = B.load_manifest(bundle)  # record only the verdict, on the manifest that was judged
    if current.get("artifacts") == manifest["artifacts"]:
        current["verdict"] = verdict
        B.write_manifest(bundle, current)
    return report


def _row_passed(report, artifact, runtime) -> bool:
    return all(c.passed for c in report.checks if c.artifact == artifact and c.runtime == runtime)


def _summary_row(entry, runtime, per_case) -> dict:
    held = per_case.get("heldout", {})
    pad = [m["pad_invariance"] for m in per_case.values() if "pad_invariance" in m]
    patt = [m["pad_attention"] for m in per_case.values() if "pad_attention" in m]
    return {
        "artifact": entry["path"], "format": entry["format"], "precision": entry["precision"],
        "runtime": runtime, "bytes": entry["bytes"],
        "accuracy": held.get("accuracy"), "accuracy_drop": held.get("accuracy_drop"),
        "top1_agreement": held.get("top1_agreement"),
        "max_abs": max(m["max_abs"] for m in per_case.values()),
        "mean_abs": held.get("mean_abs"), "max_rel": held.get("max_rel"),
        "pad_invariance": max(pad) if pad else None,
        "pad_attention": max(patt) if patt else None,
        "nan_inf": sum(m["nan_inf"] for m in per_case.values()),
        "cases": per_case, "passed": None,
    }


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
def _cell(v, kind="g"):
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * v:.2f}%"
    if kind == "acc":
        return f"{v:.4f}"
    return _fmt(float(v))


def markdown_table(report: Report) -> str:
    lines = ["| artifact | runtime | size | accuracy | top-1 agreement | max abs error | padding invariance | pad attention | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report.rows:
        lines.append(
            f"| {r['artifact']} | {r['runtime']} | {r['bytes'] / 1e6:.2f} MB | {_cell(r['accuracy'], 'acc')} | "
            f"{_cell(r['top1_agreement'], 'pct')} | {_cell(r['max_abs'])} | {_cell(r['pad_invariance'])} | "
            f"{_cell(r['pad_attention'])} | {'PASS' if r['passed'] else '**FAIL**'} |")
    for s in report.skipped:
        lines.append(f"| {s['artifact']} | {s['runtime']} | - | - | - | - | - | - | skipped: {s['reason']} |")
    return "\n".join(lines)


def terminal_summary(report: Report) -> str:
    out = [markdown_table(report), ""]
    if report.failures:
        out.append(f"{len(report.failures)} of {len(report.checks)} checks FAILED:")
        out.extend(f"  FAIL {c.message()}" for c in report.failures[:40])
        if len(report.failures) > 40:
            out.append(f"  ... and {len(report.failures) - 40} more (parity.json lists all)")
    else:
        out.append(f"all {len(report.checks)} checks passed ({len(report.rows)} artifact x runtime pairs, "
                   f"{len(report.meta['cases'])} case families)")
    return "\n".join(out)


def _json_safe(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return _json_safe(v.item())
    return v


def write_report(report: Report, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"passed": report.passed, "meta": report.meta, "rows": report.rows, "skipped": report.skipped,
           "checks": [c.__dict__ for c in report.checks],
           "failures": [c.message() for c in report.failures]}
    (out_dir / "parity.json").write_text(json.dumps(_json_safe(doc), indent=1))
    md = ["# Parity report", "", f"Bundle `{report.meta['bundle']}`, data: {report.meta['data']} "
          f"({report.meta['n_texts']} texts), {len(report.checks)} checks: "
          f"**{'PASS' if report.passed else 'FAIL'}**", "", markdown_table(report), ""]
    if report.failures:
        md += ["## Failures", ""] + [f"- {c.message()}" for c in report.failures] + [""]
    md += ["## Tolerances", "", "```", json.dumps(TOLERANCES, indent=1), "```", ""]
    (out_dir / "parity.md").write_text("\n".join(md))
    plot_errors(report, out_dir / "parity.png")


def plot_errors(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.rows if r["artifact"] != "model.keras"]
    if not rows:
        return
    labels = [f"{r['artifact']}\n{r['runtime']}" for r in rows]
    floor = 1e-9
    maxabs = [max(floor, r["max_abs"]) if np.isfinite(r["max_abs"]) else 1.0 for r in rows]
    pad = [max(floor, r["pad_invariance"] or 0.0) if np.isfinite(r["pad_invariance"] or 0.0) else 1.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(rows)), 5))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, maxabs, 0.4, label="max abs error vs Keras")
    ax.bar(x + 0.2, pad, 0.4, label="padding invariance")
    for bound, style, name in ((FP32_MAX_ABS, "--", "fp32 bound"), (FP16_MAX_ABS, ":", "fp16 bound")):
        ax.axhline(bound, linestyle=style, color="grey", linewidth=1)
        ax.text(len(rows) - 0.5, bound, name, fontsize=7, va="bottom", ha="right")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"probability error (floor {floor:g})")
    ax.set_title("Parity with Keras per artifact and runtime (all case families)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

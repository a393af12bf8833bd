"""Reports: the result object and its three views (terminal table, parity.md/.json, plot)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from . import tolerances as T
from .compare import fmt


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
        """Every check held, every requested format ran somewhere, and (``--strict``) no
        runtime was skipped."""
        if not self.checks or self.failures or self.meta.get("unverified_formats"):
            return False
        return not (self.meta.get("strict") and self.skipped)

    def verdict_line(self) -> str:
        skipped = f"; {len(self.skipped)} artifact x runtime pairs skipped" if self.skipped else ""
        unverified = self.meta.get("unverified_formats") or []
        scope = (f"{len(self.rows)} artifact x runtime pairs, {len(self.meta.get('cases', []))} case families"
                 + ("" if self.meta.get("accuracy_checked") else "; accuracy not checked")
                 + ("" if self.meta.get("real_texts", True) else "; no real texts: decisions not judged"))
        if self.failures:
            return f"FAIL: {len(self.failures)} of {len(self.checks)} checks failed ({scope}){skipped}"
        if unverified:
            return (f"NOT VERIFIED: requested format(s) {', '.join(unverified)} ran on no runtime "
                    f"({len(self.checks)} other checks passed; {scope}){skipped}")
        if self.meta.get("strict") and self.skipped:
            return f"FAIL (--strict): {len(self.skipped)} artifact x runtime pairs skipped ({scope})"
        if not self.checks:
            return "NOT VERIFIED: no check ran"
        return f"all {len(self.checks)} checks passed ({scope}){skipped}"

    def row_passed(self, artifact, runtime) -> bool:
        return all(c.passed for c in self.checks if c.artifact == artifact and c.runtime == runtime)


def _cell(v, kind="g"):
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * v:.2f}%"
    if kind == "acc":
        return f"{v:.4f}"
    return fmt(float(v))


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


def bucket_table(report: Report) -> str:
    """Top-1 agreement with Keras per real-text length bucket (rows: artifact x runtime)."""
    names = []
    for r in report.rows:
        for b in r.get("buckets", {}):
            if b not in names:
                names.append(b)
    if not names:
        return ""
    lines = ["| artifact | runtime | " + " | ".join(f"{b} tokens" for b in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for r in report.rows:
        if r.get("reference"):
            continue
        cells = []
        for b in names:
            v = r.get("buckets", {}).get(b)
            cells.append("-" if v is None else f"{100 * v['top1_agreement']:.2f}% (n={v['rows']})")
        lines.append(f"| {r['artifact']} | {r['runtime']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def terminal_summary(report: Report) -> str:
    out = [markdown_table(report), ""]
    buckets = bucket_table(report)
    if buckets:
        out += ["Top-1 agreement with Keras per length bucket (real texts cut to each length):", buckets, ""]
    out += list(report.meta.get("explanations") or [])
    if report.failures:
        out.append(f"{len(report.failures)} of {len(report.checks)} checks FAILED:")
        out.extend(f"  FAIL {c.message()}" for c in report.failures[:40])
        if len(report.failures) > 40:
            out.append(f"  ... and {len(report.failures) - 40} more (parity.json lists all)")
    out.append(report.verdict_line())
    return "\n".join(out)


def json_safe(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [json_safe(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return json_safe(v.item())
    return v


def write_report(report: Report, out_dir) -> None:
    """parity.json, parity.md and parity.png into ``out_dir``: a directory descriptor from
    ``fsutil.open_output_dir`` (or a path, opened that way). Every file is written through it
    with no link followed."""
    import os

    from probattn.models.fsutil import open_output_dir, write_file_at

    fd = out_dir if isinstance(out_dir, int) else open_output_dir(out_dir)
    try:
        doc = {"passed": report.passed, "verdict": report.verdict_line(), "meta": report.meta, "rows": report.rows,
               "skipped": report.skipped, "checks": [c.__dict__ for c in report.checks],
               "failures": [c.message() for c in report.failures]}
        write_file_at(fd, "parity.json", json.dumps(json_safe(doc), indent=1))
        md = ["# Parity report", "", f"Bundle `{report.meta['bundle']}`, data: {report.meta['data']} "
              f"({report.meta['n_texts']} texts), {len(report.checks)} checks: "
              f"**{'PASS' if report.passed else 'FAIL'}**: {report.verdict_line()}", "", markdown_table(report), ""]
        buckets = bucket_table(report)
        if buckets:
            md += ["## Top-1 agreement per length bucket", "", buckets, ""]
        if report.meta.get("explanations"):
            md += ["## Diagnosis", ""] + [f"{l}" for l in report.meta["explanations"]] + [""]
        if report.failures:
            md += ["## Failures", ""] + [f"- {c.message()}" for c in report.failures] + [""]
        md += ["## Tolerances", "", "```", json.dumps(T.as_json(), indent=1), "```", ""]
        write_file_at(fd, "parity.md", "\n".join(md))
        png = plot_errors(report)
        if png is not None:
            write_file_at(fd, "parity.png", png)
    finally:
        if not isinstance(out_dir, int):
            os.close(fd)


def plot_errors(report: Report) -> bytes | None:
    """The error plot as PNG bytes (None when there is nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import io

    rows = [r for r in report.rows if not r.get("reference")]
    if not rows:
        return None
    labels = [f"{r['artifact']}\n{r['runtime']}" for r in rows]
    floor = 1e-9
    maxabs = [max(floor, r["max_abs"]) if np.isfinite(r["max_abs"]) else 1.0 for r in rows]
    pad = [max(floor, r["pad_invariance"] or 0.0) if np.isfinite(r["pad_invariance"] or 0.0) else 1.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(rows)), 5))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, maxabs, 0.4, label="max abs error vs Keras")
    ax.bar(x + 0.2, pad, 0.4, label="padding invariance")
    for bound, style, name in ((T.FP32_MAX_ABS, "--", "fp32 bound"), (T.FP16_MAX_ABS, ":", "fp16 bound")):
        ax.axhline(bound, linestyle=style, color="grey", linewidth=1)
        ax.text(len(rows) - 0.5, bound, name, fontsize=7, va="bottom", ha="right")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"probability error (floor {floor:g})")
    ax.set_title("Parity with Keras per artifact and runtime (all case families)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()

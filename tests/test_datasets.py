"""The main flow with defaults (train -> export -> verify) on the other bundled datasets:
long news articles (bbc_news) and Usenet posts (20newsgroups), whose lengths and classes
the verdicts were not tuned on. Each runs the real command line, as a user would."""
from __future__ import annotations

import json

import pytest

from helpers import run_cli

#: 20newsgroups has 18,821 posts; a stratified 3,000 keeps the suite's time in budget
#: (every class stays, in proportion). bbc_news runs whole.
FLOWS = {"bbc_news": [], "20newsgroups": ["--limit", "3000"]}
#: Known limit (README, "Full int8 on many classes"): on 20newsgroups (20 classes) full int8
#: falls short of 98% top-1 agreement in some length buckets — 97.9% in the >256-token bucket
#: with all 18,821 posts, lower for this smaller, less confident model — because the pooled
#: vector of a long text is small against the int8 range it shares with short texts. Verify
#: must report exactly that: every other check holds.
KNOWN_SHORTFALL = {"20newsgroups": ("model_int8.tflite", {"top1_agreement"})}


def _flow(dataset, tmp_path):
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    proc = run_cli("train", "--dataset", dataset, "--out", run, *FLOWS[dataset], timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("export", run, "--out", bundle, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("verify", bundle, timeout=3600)
    return proc, json.loads((bundle / "report" / "parity.json").read_text())


@pytest.mark.parametrize("dataset", sorted(FLOWS))
def test_main_flow_with_defaults(dataset, tmp_path):
    proc, doc = _flow(dataset, tmp_path)
    where = proc.stdout[-4000:] + proc.stderr[-2000:]
    if dataset in KNOWN_SHORTFALL:
        artifact, metrics = KNOWN_SHORTFALL[dataset]
        failed = {(f["artifact"], f["metric"]) for f in doc["checks"] if not f["passed"]}
        assert proc.returncode == 1 and failed, where  # reported, not hidden
        assert {a for a, _ in failed} == {artifact} and {m for _, m in failed} <= metrics, failed
    else:
        assert proc.returncode == 0 and doc["passed"], where
    # full int8 was judged in every length bucket with enough texts, on both LiteRT kernel families
    for runtime in ("litert-xnnpack", "litert-reference"):
        row = next(r for r in doc["rows"] if r["artifact"] == "model_int8.tflite" and r["runtime"] == runtime)
        judged = {c["case"] for c in doc["checks"] if c["artifact"] == "model_int8.tflite"
                  and c["runtime"] == runtime and c["metric"] == "top1_agreement" and c["case"].startswith("bucket:")}
        assert judged and judged == {f"bucket:{b}" for b in row["buckets"] if row["buckets"][b]["rows"] >= 50}, judged

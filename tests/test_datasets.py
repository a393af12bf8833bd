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
#: Full int8 must hold 98% top-1 agreement in every length bucket on both LiteRT kernel
#: families, on both datasets: on 20newsgroups (20 classes, texts to 4x 256 tokens) it does
#: since the classifier L2-normalises its pooled vector (``ProbAttention(normalize=True)``);
#: before, the >256-token bucket stayed at 97.9% with all 18,821 posts (the pooled vector of
#: a long text was small against the int8 range it shared with short texts).
#: Known limit, measured: this 3,000-post 20newsgroups model is less confident, and OpenVINO
#: running the same full-int8 ``model_int8.tflite`` with its own int8 arithmetic agrees with
#: float on 97.3% of its 1- and 3-4-token texts (LiteRT: 98.7% or more in every bucket; all
#: 18,821 posts: OpenVINO 98.2% or more). Verify must report exactly that, if anything, and
#: nothing else.
KNOWN_SHORTFALL = {"20newsgroups": {("model_int8.tflite", "openvino", "top1_agreement")}}


def _flow(dataset, tmp_path):
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    proc = run_cli("train", "--dataset", dataset, "--out", run, *FLOWS[dataset], timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("export", run, "--out", bundle, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("verify", bundle, timeout=3600)
    return proc, bundle, json.loads((bundle / "report" / "parity.json").read_text())


@pytest.mark.parametrize("dataset", sorted(FLOWS))
def test_main_flow_with_defaults(dataset, tmp_path):
    proc, bundle, doc = _flow(dataset, tmp_path)
    where = proc.stdout[-4000:] + proc.stderr[-2000:]
    failed = sorted({(f["artifact"], f["runtime"], f["case"], f["metric"]) for f in doc["checks"] if not f["passed"]})
    assert proc.returncode == (1 if failed else 0) and doc["passed"] == (not failed), (failed[:10], where)
    allowed = KNOWN_SHORTFALL.get(dataset, set())
    assert {(a, r, m) for a, r, _, m in failed} <= allowed, (failed[:10], where)
    # full int8 was judged in every length bucket with enough texts, on both LiteRT kernel families
    for runtime in ("litert-xnnpack", "litert-reference"):
        row = next(r for r in doc["rows"] if r["artifact"] == "model_int8.tflite" and r["runtime"] == runtime)
        judged = {c["case"] for c in doc["checks"] if c["artifact"] == "model_int8.tflite"
                  and c["runtime"] == runtime and c["metric"] == "top1_agreement" and c["case"].startswith("bucket:")}
        assert judged and judged == {f"bucket:{b}" for b in row["buckets"] if row["buckets"][b]["rows"] >= 50}, judged

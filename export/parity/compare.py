"""Comparison: run a case on a runner, compute metrics against the reference, and turn
metrics into checks with the bounds of ``tolerances``."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from probattn.models.text.tokenizer import PAD_ID

from ..contract import ATTENTION, PROBABILITIES
from . import tolerances as T
from .cases import Case


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
    detail: str = ""  # e.g. how a runtime crashed

    def message(self) -> str:
        rel = "within" if self.passed else "outside"
        return (f"{self.artifact} on {self.runtime}, case {self.case}: {self.metric} "
                f"{fmt(self.value)} {rel} bound {self.op} {fmt(self.bound)}"
                + (f" ({self.detail})" if self.detail else ""))


def fmt(v) -> str:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    if isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1):
        return str(int(v))
    return f"{v:.3g}"


def run_case(runner, case: Case):
    """Outputs of every batch of a case (and of its unpadded base), merged."""
    outs = [runner.infer(b) for b in case.batches]
    merged = {k: _concat([o[k] for o in outs]) for k in outs[0]}
    base = None
    if case.base is not None:
        bouts = [runner.infer(b) for b in case.base]
        base = {k: _concat([o[k] for o in bouts]) for k in bouts[0]}
    return merged, base


def _concat(arrs):
    width = max(a.shape[1] for a in arrs) if arrs[0].ndim == 2 else None
    if width is not None and any(a.shape[1] != width for a in arrs):  # attention weights of varying length
        arrs = [np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in arrs]
    return np.concatenate(arrs)


def decisions(probs: np.ndarray, kind: str = "softmax") -> np.ndarray:
    """The decision each row's outputs stand for, by head kind (``export/signature.py``):
    the top class (softmax, scores), one yes/no per unit at 0.5 (sigmoid; a single unit is
    a binary head: class 1 when >= 0.5), or positive when >= 0 (a single logit)."""
    if kind == "sigmoid":
        return (probs[:, 0] >= 0.5).astype(np.int64) if probs.shape[1] == 1 else probs >= 0.5
    if kind == "logit":
        return (probs[:, 0] >= 0.0).astype(np.int64)
    return probs.argmax(-1)


def decision_margin(values: np.ndarray, kind: str = "softmax") -> float:
    """How far the closest row is from changing its decision: the gap between the top two
    classes (softmax, scores), or the distance to the threshold (0.5 for sigmoid units, 0
    for a logit); inf when there is no second class to flip to."""
    v = np.asarray(values, np.float64)
    if kind == "sigmoid":
        return float(np.min(np.abs(v - 0.5)))
    if kind == "logit":
        return float(np.min(np.abs(v)))
    if v.shape[-1] < 2:
        return float("inf")
    top2 = np.sort(v, axis=-1)[:, -2:]
    return float(np.min(top2[:, 1] - top2[:, 0]))


def _agreement(a: dict, b: dict, heads, rows=None) -> float:
    """Share of decisions two runs agree on (per label for multi-label heads); the worst
    head. ``rows``: a boolean row selection."""
    sel = (lambda x: x) if rows is None else (lambda x: x[rows])
    return min(float(np.mean(decisions(sel(a[h]), k) == decisions(sel(b[h]), k))) for h, k in heads)


def metrics(out, ref, case: Case, base, keras_acc, heads=None):
    """Every figure of one artifact x runtime x case against the reference outputs (and, for
    an invariance family, against the same rows computed another way on this runtime).
    ``heads``: ``[(output name, kind), ...]``, every score output (default: one softmax
    ``probabilities``); values are compared over all of them, decisions per head."""
    heads = heads or [(PROBABILITIES, "softmax")]
    p = np.concatenate([out[h] for h, _ in heads], axis=1)
    r = np.concatenate([ref[h] for h, _ in heads], axis=1)
    m = {"rows": int(p.shape[0])}
    m["nan_inf"] = int(sum(np.count_nonzero(~np.isfinite(v)) for v in out.values()))
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.abs(p.astype(np.float64) - r)
        m["max_abs"] = float(np.nanmax(diff)) if np.isfinite(diff).any() else float("nan")
        m["mean_abs"] = float(np.nanmean(diff)) if np.isfinite(diff).any() else float("nan")
        big = np.abs(r) >= T.REL_FLOOR
        m["max_rel"] = float(np.nanmax(diff[big] / np.abs(r[big]))) if big.any() and np.isfinite(diff).any() else float("nan")
    if m["nan_inf"]:
        m["max_abs"] = float("inf")
    m["top1_agreement"] = _agreement(out, ref, heads)
    ids_rows = np.concatenate([b.max(axis=1) for b in case.batches])
    allpad = ids_rows == PAD_ID
    if allpad.any():
        m["all_pad_abs"] = float(np.max(diff[allpad])) if np.isfinite(p[allpad]).all() else float("inf")
        m["all_pad_margin"] = min(decision_margin(ref[h][allpad], k) for h, k in heads)
        m["all_pad_top1_agreement"] = _agreement(out, ref, heads, allpad)
    primary = decisions(out[heads[0][0]], heads[0][1])
    if case.labels is not None and primary.ndim == 1:  # a multi-label head has no single label
        acc = float(np.mean(primary == case.labels))
        m["accuracy"] = acc
        if keras_acc is not None:
            m["accuracy_drop"] = keras_acc - acc
    if base is not None:
        bp = np.concatenate([base[h] for h, _ in heads], axis=1)
        kind = case.invariance
        m[f"{kind}_invariance"] = (float(np.max(np.abs(p.astype(np.float64) - bp))) if np.isfinite(p).all()
                                   else float("inf"))
        m[f"{kind}_top1_agreement"] = _agreement(out, base, heads)
    if ATTENTION in out:
        ids = np.concatenate([np.pad(b, ((0, 0), (0, out[ATTENTION].shape[1] - b.shape[1])))
                              for b in case.batches])
        w = out[ATTENTION]
        m["pad_attention"] = float(np.max(np.sum(np.where(ids == PAD_ID, np.abs(w), 0.0), axis=1)))
    return m


def checks_for(artifact, runtime, precision, case: Case, m, reference: bool = False) -> list:
    """The checks for one artifact x runtime x case; every bound comes from ``tolerances``.
    ``reference``: the Keras model itself, whose masking (padding on either side, and
    batching) must hold."""
    out = []

    def add(metric, bound, op):
        if metric not in m or bound is None:
            return
        v = m[metric]
        ok = (v <= bound) if op == "<=" else (v >= bound)
        if isinstance(v, float) and math.isnan(v):
            ok = False
        out.append(Check(artifact, runtime, case.name, metric, v, bound, op, bool(ok)))

    add("nan_inf", T.COMMON["nan_inf"], "<=")
    add("pad_attention", T.COMMON["max_pad_attention"], "<=")
    if reference:
        add("pad_invariance", T.REFERENCE.pad_invariance, "<=")
        add("batch_invariance", T.REFERENCE.batch_invariance, "<=")
        return out
    pol = T.policy(precision)  # raises on a precision without a policy
    judge_decisions = m.get("rows", 0) >= T.MIN_JUDGED_ROWS  # below it one flip alone would fail
    add("all_pad_abs", pol.all_padding_row_max_abs, "<=")  # same on every runtime
    if pol.all_padding_row_decision_margin is not None and m.get("all_pad_margin", 0) > pol.all_padding_row_decision_margin:
        add("all_pad_top1_agreement", 1.0, ">=")
    add("max_abs", pol.max_abs, "<=")
    add("pad_invariance", pol.pad_invariance, "<=")
    add("batch_invariance", pol.batch_invariance, "<=")
    if judge_decisions and (case.real or not pol.decisions_on_real_texts_only):  # random ids: near-ties
        add("top1_agreement", pol.min_top1_agreement, ">=")
        add("batch_top1_agreement", pol.batch_min_top1_agreement, ">=")
    if case.name == "heldout":
        add("accuracy_drop", pol.max_accuracy_drop, "<=")
    add("pad_top1_agreement", pol.pad_min_top1_agreement, ">=")
    return out

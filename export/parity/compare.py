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

    def message(self) -> str:
        rel = "within" if self.passed else "outside"
        return (f"{self.artifact} on {self.runtime}, case {self.case}: {self.metric} "
                f"{fmt(self.value)} {rel} bound {self.op} {fmt(self.bound)}")


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


def decisions(probs: np.ndarray) -> np.ndarray:
    """The decision each row's probabilities stand for: the top-1 class."""
    return probs.argmax(-1)


def metrics(out, ref, case: Case, base, keras_acc):
    """Every figure of one artifact x runtime x case against the reference outputs (and, for
    an invariance family, against the same rows computed another way on this runtime)."""
    p, r = out[PROBABILITIES], ref[PROBABILITIES]
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
    m["top1_agreement"] = float(np.mean(decisions(p) == decisions(r)))
    ids_rows = np.concatenate([b.max(axis=1) for b in case.batches])
    allpad = ids_rows == PAD_ID
    if allpad.any():
        m["all_pad_abs"] = float(np.max(diff[allpad])) if np.isfinite(p[allpad]).all() else float("inf")
        top2 = np.sort(r[allpad], axis=-1)[:, -2:] if r.shape[-1] > 1 else None
        m["all_pad_margin"] = float(np.min(top2[:, 1] - top2[:, 0])) if top2 is not None else float("inf")
        m["all_pad_top1_agreement"] = float(np.mean(decisions(p[allpad]) == decisions(r[allpad])))
    if case.labels is not None:
        acc = float(np.mean(decisions(p) == case.labels))
        m["accuracy"] = acc
        if keras_acc is not None:
            m["accuracy_drop"] = keras_acc - acc
    if base is not None:
        bp = base[PROBABILITIES]
        kind = case.invariance
        m[f"{kind}_invariance"] = (float(np.max(np.abs(p.astype(np.float64) - bp))) if np.isfinite(p).all()
                                   else float("inf"))
        m[f"{kind}_top1_agreement"] = float(np.mean(decisions(p) == decisions(bp)))
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

"""Tolerances: one policy per precision, each bound with the reason beside it.

``policy(precision)`` raises on a precision it does not know: a new precision needs its
own policy here, it never inherits another's by accident.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

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
#: For fp16 artifacts padding may move outputs no more than the precision's own error
#: budget against Keras (a pad must never be worth more than rounding).
FP16_PAD_INVARIANCE = FP16_MAX_ABS
#: int8: padding appended to real texts must not change a single decision.
INT8_PAD_MIN_AGREEMENT = 1.0
#: The int8 SOFTMAX output step, fixed by the TFLite int8 spec (scale 1/256, zero point -128).
INT8_OUTPUT_STEP = 1 / 256
#: An all-padding row pools to exactly the zero vector, so only the dense layers' rounding
#: moves its int8 output, by an amount that depends on each model's weights (measured
#: 0.002 to 0.015 across datasets: no fixed value bound is right for every model). So a
#: quantized artifact is judged there by its decision: it must equal Keras's wherever
#: Keras's top-2 margin exceeds two output steps (one for the rounding of the two
#: probabilities, one for the error upstream of it); a closer race is a tie, reported only.
INT8_ALL_PAD_DECISION_MARGIN = 2 * INT8_OUTPUT_STEP
#: Attention on padded steps: the layer multiplies the weights by the mask, so any
#: precision must put (numerically) nothing there.
MAX_PAD_ATTENTION = 1e-6
#: max relative error is taken over probabilities of at least this size (smaller ones
#: make any ratio meaningless)
REL_FLOOR = 1e-3
#: Top-1 agreement is judged on at least this many rows: with the 2% budget of
#: INT8_MIN_AGREEMENT, fewer rows would let one flipped near-tie fail a whole family
#: (1/50 = 2%). Smaller families are reported, their values still judged.
MIN_JUDGED_ROWS = round(1 / (1 - INT8_MIN_AGREEMENT))


@dataclass(frozen=True)
class Policy:
    """What an artifact of one precision must hold. ``None``: not judged this way."""

    #: largest |artifact - Keras| probability (value parity)
    max_abs: float | None = None
    #: largest change of the artifact's own output when padding is appended
    pad_invariance: float | None = None
    #: share of real texts with Keras's top-1 class (decision parity)
    min_top1_agreement: float | None = None
    #: accuracy lost against Keras on the held-out texts
    max_accuracy_drop: float | None = None
    #: share of decisions padding may leave unchanged
    pad_min_top1_agreement: float | None = None
    #: largest change of a row's output between running alone and inside a batch
    batch_invariance: float | None = None
    #: share of rows whose decision is the same alone and inside a batch
    batch_min_top1_agreement: float | None = None
    #: |artifact - Keras| on an all-padding row
    all_padding_row_max_abs: float | None = None
    #: on an all-padding row the decision must equal Keras's where Keras's top-2 margin
    #: exceeds this (quantized artifacts)
    all_padding_row_decision_margin: float | None = None
    #: values are judged on every family; decisions only on families of real texts
    decisions_on_real_texts_only: bool = True

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


POLICIES = {
    # a row alone and inside a batch run the same float math on different kernel shapes:
    # the precision's own value bound applies
    "fp32": Policy(max_abs=FP32_MAX_ABS, pad_invariance=FP32_PAD_INVARIANCE,
                   all_padding_row_max_abs=FP32_MAX_ABS, batch_invariance=FP32_MAX_ABS),
    "fp16": Policy(max_abs=FP16_MAX_ABS, pad_invariance=FP16_PAD_INVARIANCE,
                   all_padding_row_max_abs=FP16_MAX_ABS, batch_invariance=FP16_MAX_ABS),
    "int8-dynamic": Policy(min_top1_agreement=INT8_MIN_AGREEMENT, max_accuracy_drop=INT8_MAX_ACCURACY_DROP,
                           pad_min_top1_agreement=INT8_PAD_MIN_AGREEMENT,
                           all_padding_row_decision_margin=INT8_ALL_PAD_DECISION_MARGIN,
                           batch_min_top1_agreement=INT8_MIN_AGREEMENT),
    "int8": Policy(min_top1_agreement=INT8_MIN_AGREEMENT, max_accuracy_drop=INT8_MAX_ACCURACY_DROP,
                   pad_min_top1_agreement=INT8_PAD_MIN_AGREEMENT,
                   all_padding_row_decision_margin=INT8_ALL_PAD_DECISION_MARGIN,
                   batch_min_top1_agreement=INT8_MIN_AGREEMENT),
}
#: the Keras model itself (the reference): its masking must hold on both padding sides,
#: and a row must mean the same alone and inside a batch
REFERENCE = Policy(pad_invariance=FP32_PAD_INVARIANCE, batch_invariance=FP32_MAX_ABS)
#: every artifact, whatever its precision
COMMON = {"nan_inf": 0, "max_pad_attention": MAX_PAD_ATTENTION}


def policy(precision: str) -> Policy:
    try:
        return POLICIES[precision]
    except KeyError:
        raise ValueError(f"no tolerance policy for precision {precision!r}; known: "
                         f"{', '.join(POLICIES)} (add one in probattn.export.parity.tolerances)") from None


def as_json() -> dict:
    """Every bound, as written into parity.json."""
    return {"common": dict(COMMON), "reference": REFERENCE.as_dict(),
            **{p: pol.as_dict() for p, pol in POLICIES.items()}}

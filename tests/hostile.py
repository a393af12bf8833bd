"""Hostile files, built by the tests that use them (never committed): ONNX graphs that expand
or loop, lie about their signature or give NaN; .keras archives that inflate; tokenizer.json
files that pad, truncate or backtrack; and helpers that put one into a copy of a bundle with
its hashes updated, so what is tested is the check, not the hash."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np

from probattn.export import bundle as B
from probattn.models.fsutil import hash_tree, sha256_path

VOCAB, DIM, CLASSES = 50, 4, 2


# ------------------------------------------------------------------ bundles

def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def manifest(bundle: Path) -> dict:
    return json.loads((bundle / B.MANIFEST).read_text())


def write_manifest(bundle: Path, m: dict) -> None:
    (bundle / B.MANIFEST).write_text(json.dumps(m, indent=1))


def rehash(bundle: Path, m: dict | None = None) -> dict:
    """Make the manifest agree with what is on disk (contents and every artifact's hash), as an
    attacker who controls the whole bundle would."""
    m = m or manifest(bundle)
    m["contents"] = hash_tree(bundle, skip=B.OWN_ENTRIES)
    for a in m["artifacts"]:
        if (bundle / a["path"]).exists() and not (bundle / a["path"]).is_symlink():
            a["sha256"] = sha256_path(bundle / a["path"])
    tok = bundle / m["tokenizer"]["path"]
    if tok.is_file() and not tok.is_symlink():
        m["tokenizer"]["sha256"] = sha256_path(tok)
    files = m.get("files") or {}
    for f in [files.get(k) for k in ("labels", "vocabulary")] + list((files.get("c_array") or {}).get("files", [])):
        if f and (bundle / f["path"]).is_file() and not (bundle / f["path"]).is_symlink():
            f["sha256"] = sha256_path(bundle / f["path"])
    write_manifest(bundle, m)
    return m


def replace_file(bundle: Path, rel: str, data: bytes) -> None:
    (bundle / rel).write_bytes(data)
    rehash(bundle)


# ------------------------------------------------------------------ ONNX

def _onnx():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    return onnx, TensorProto, helper, numpy_helper


def _io(inputs=None, outputs=None, classes=CLASSES):
    onnx, TP, helper, _ = _onnx()
    inputs = inputs or [helper.make_tensor_value_info("token_ids", TP.INT32, ["batch", "sequence"])]
    outputs = outputs or [helper.make_tensor_value_info("probabilities", TP.FLOAT, ["batch", classes])]
    return inputs, outputs


def classifier_nodes(vocab=VOCAB, classes=CLASSES, ids="token_ids"):
    """Embedding -> mean over time -> dense -> softmax: a working classifier."""
    onnx, TP, helper, nh = _onnx()
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(vocab, DIM)).astype(np.float32)
    inits = [nh.from_array(emb, "emb"), nh.from_array(rng.normal(size=(DIM, classes)).astype(np.float32), "dense_w"),
             nh.from_array(np.array([1], np.int64), "axis_1")]
    nodes = [helper.make_node("Gather", ["emb", ids], ["x"]),
             helper.make_node("ReduceMean", ["x"], ["p"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["p", "dense_w"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)]
    return nodes, inits


def onnx_model(nodes, inits, inputs=None, outputs=None, classes=CLASSES) -> bytes:
    onnx, TP, helper, _ = _onnx()
    i, o = _io(inputs, outputs, classes)
    m = helper.make_model(helper.make_graph(nodes, "hostile", i, o, initializer=inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def onnx_benign(vocab=VOCAB, classes=CLASSES) -> bytes:
    n, i = classifier_nodes(vocab, classes)
    return onnx_model(n, i, classes=classes)


def onnx_nan_on_padding(vocab=VOCAB, classes=CLASSES) -> bytes:
    """Probabilities are the mean embedding of the non-pad steps: sum / count, which is
    0 / 0 = NaN for an all-padding row (a real bug pattern: masked mean without a guard)."""
    onnx, TP, helper, nh = _onnx()
    rng = np.random.default_rng(1)
    emb = np.abs(rng.normal(size=(vocab, classes))).astype(np.float32)
    emb[0] = 0.0
    inits = [nh.from_array(emb, "emb"), nh.from_array(np.array([1], np.int64), "axis_1"),
             nh.from_array(np.array(0, np.int32), "pad")]
    nodes = [helper.make_node("Gather", ["emb", "token_ids"], ["x"]),
             helper.make_node("ReduceSum", ["x", "axis_1"], ["s"], keepdims=0),
             helper.make_node("Equal", ["token_ids", "pad"], ["is_pad"]),
             helper.make_node("Not", ["is_pad"], ["real"]),
             helper.make_node("Cast", ["real"], ["realf"], to=TP.FLOAT),
             helper.make_node("ReduceSum", ["realf", "axis_1"], ["n"], keepdims=1),
             helper.make_node("Div", ["s", "n"], ["mean"]),
             helper.make_node("ReduceSum", ["mean", "axis_1"], ["total"], keepdims=1),
             helper.make_node("Div", ["mean", "total"], ["probabilities"])]
    return onnx_model(nodes, inits, classes=classes)


def onnx_constant_bomb(vocab=VOCAB) -> bytes:
    """A 1 KB file whose ConstantOfShape makes 3 x 10**9 floats (12 GB) before the classifier."""
    onnx, TP, helper, nh = _onnx()
    n, i = classifier_nodes(vocab)
    i.append(nh.from_array(np.array([3_000_000_000], np.int64), "huge"))
    n.insert(0, helper.make_node("ConstantOfShape", ["huge"], ["bomb"],
                                 value=helper.make_tensor("v", TP.FLOAT, [1], [1.0])))
    n.append(helper.make_node("ReduceMax", ["bomb"], ["bomb_max"], keepdims=0))
    outs = [helper.make_tensor_value_info("probabilities", TP.FLOAT, ["batch", CLASSES]),
            helper.make_tensor_value_info("attention_weights", TP.FLOAT, ["batch", "sequence"])]
    n.append(helper.make_node("Cast", ["token_ids"], ["ids_f"], to=TP.FLOAT))
    n.append(helper.make_node("Mul", ["ids_f", "bomb_max"], ["attention_weights"]))
    return onnx_model(n, i, outputs=outs)


def onnx_input_scaled_bomb(vocab=VOCAB) -> bytes:
    """A tensor of sequence x 10**7 floats: small for one token, 10 GB for 256 tokens, and
    invisible to a check of constants (its size comes from the input)."""
    onnx, TP, helper, nh = _onnx()
    n, i = classifier_nodes(vocab)
    i += [nh.from_array(np.array([10_000_000], np.int64), "scale"),
          nh.from_array(np.array([1], np.int64), "one"), nh.from_array(np.array([2], np.int64), "two")]
    n = [helper.make_node("Shape", ["token_ids"], ["shape"]),
         helper.make_node("Slice", ["shape", "one", "two"], ["seq"]),
         helper.make_node("Mul", ["seq", "scale"], ["size"]),
         helper.make_node("ConstantOfShape", ["size"], ["bomb"],
                          value=helper.make_tensor("v", TP.FLOAT, [1], [0.0])),
         helper.make_node("ReduceMax", ["bomb"], ["bomb_max"], keepdims=0)] + n
    n[-1] = helper.make_node("Softmax", ["logits"], ["probs0"], axis=-1)
    n.append(helper.make_node("Add", ["probs0", "bomb_max"], ["probabilities"]))
    return onnx_model(n, i)


def onnx_loop_bomb(vocab=VOCAB) -> bytes:
    """A Loop with a trip count of 10**12 around the classifier's output."""
    onnx, TP, helper, nh = _onnx()
    n, i = classifier_nodes(vocab)
    n[-1] = helper.make_node("Softmax", ["logits"], ["probs0"], axis=-1)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TP.INT64, []), helper.make_tensor_value_info("cond_in", TP.BOOL, []),
         helper.make_tensor_value_info("v_in", TP.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TP.BOOL, []), helper.make_tensor_value_info("v_out", TP.FLOAT, None)])
    i += [nh.from_array(np.array(10**12, np.int64), "trips"), nh.from_array(np.array(True), "yes")]
    n.append(helper.make_node("Loop", ["trips", "yes", "probs0"], ["probabilities"], body=body))
    return onnx_model(n, i)


def onnx_signature(kind: str, vocab=VOCAB) -> bytes:
    """The classifier with a wrong signature: ``renamed``, ``rank3`` or ``extra`` input, or
    ``no-probabilities`` (a float input: ``onnx_float_input``)."""
    onnx, TP, helper, nh = _onnx()
    n, i = classifier_nodes(vocab)
    if kind == "renamed":
        n, i = classifier_nodes(vocab, ids="input_1")
        return onnx_model(n, i, inputs=[helper.make_tensor_value_info("input_1", TP.INT32, ["batch", "sequence"])])
    if kind == "rank3":
        return onnx_model(n, i, inputs=[helper.make_tensor_value_info("token_ids", TP.INT32, ["batch", "sequence", 1])])
    if kind == "extra":
        return onnx_model(n, i, inputs=[helper.make_tensor_value_info("token_ids", TP.INT32, ["batch", "sequence"]),
                                        helper.make_tensor_value_info("mask", TP.INT32, ["batch", "sequence"])])
    if kind == "no-probabilities":
        n[-1] = helper.make_node("Softmax", ["logits"], ["scores"], axis=-1)
        return onnx_model(n, i, outputs=[helper.make_tensor_value_info("scores", TP.FLOAT, ["batch", CLASSES])])
    raise ValueError(kind)


def onnx_float_input(vocab=VOCAB) -> bytes:
    """``token_ids`` declared float32."""
    onnx, TP, helper, nh = _onnx()
    n, i = classifier_nodes(vocab, ids="ids_int")
    n.insert(0, helper.make_node("Cast", ["token_ids"], ["ids_int"], to=TP.INT32))
    return onnx_model(n, i, inputs=[helper.make_tensor_value_info("token_ids", TP.FLOAT, ["batch", "sequence"])])


# ------------------------------------------------------------------ .keras archives

def keras_zip(path: Path, members: dict, compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def keras_bombs(d: Path, real_keras: Path) -> dict:
    """Archives built from a real .keras file with one thing wrong each."""
    src = zipfile.ZipFile(real_keras)
    real = {n: src.read(n) for n in src.namelist()}
    out = {}
    big_config = real["config.json"] + b" " * (5 << 20)  # valid JSON, 5 MB: over the 4 MB cap
    out["config-over-cap"] = keras_zip(d / "config.keras", {**real, "config.json": big_config})
    out["weights-ratio"] = keras_zip(d / "ratio.keras", {**real, "model.weights.h5": bytes(64 << 20)})
    out["path-traversal"] = keras_zip(d / "traversal.keras", {**real, "../evil.txt": b"x"})
    out["unknown-entry"] = keras_zip(d / "unknown.keras", {**real, "payload.py": b"import os"})
    link = d / "link.keras"
    with zipfile.ZipFile(link, "w") as z:
        for n, data in real.items():
            z.writestr(n, data)
        info = zipfile.ZipInfo("assets/link")
        info.external_attr = (0o120777 << 16)
        z.writestr(info, "/etc/passwd")
    out["symlink-entry"] = link
    return out


# ------------------------------------------------------------------ tokenizer.json

def tokenizer_with(path: Path, **changes) -> bytes:
    cfg = json.loads(Path(path).read_text())
    cfg.update(changes)
    return json.dumps(cfg).encode()


PAD_18 = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None, "pad_id": 18,
          "pad_type_id": 0, "pad_token": "[PAD]"}
PAD_FIXED_2M = {"strategy": {"Fixed": 2_000_000}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                "pad_type_id": 0, "pad_token": "[PAD]"}
#: a regex that backtracks: Oniguruma gives up (a Rust panic) or takes seconds on long words
BACKTRACKING_SPLIT = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}

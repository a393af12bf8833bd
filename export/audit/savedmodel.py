"""Audit a SavedModel directory without loading or running it.

Loading a SavedModel runs code from it: ``tf.saved_model.load`` runs the restore function
and every resource initialiser, and calling a signature runs whatever ops it holds. A
signature with ``tf.io.write_file`` writes a file anywhere the user can, while still
returning the right probabilities, so parity passes. So before TensorFlow sees a
SavedModel:

* ``check_files``: only the files TensorFlow writes (``saved_model.pb``,
  ``fingerprint.pb``, ``keras_metadata.pb``, ``variables/variables.index``,
  ``variables/variables.data-NNNNN-of-NNNNN``, ``assets.extra/*``); the caller walks the tree
  with ``fsutil.hash_tree``, which refuses links, FIFOs and devices and hashes every file.
* ``audit_ops``: parses ``saved_model.pb`` with the protobuf classes only and checks every op
  of every MetaGraphDef, per context: top-level graph nodes (``GRAPH_OPS``); every function
  reachable from anything but the saver (signatures, object-graph functions, resource
  initialisers: ``FUNCTION_OPS``, no I/O); functions reachable only from the saver's save or
  restore node (``SaveV2`` / ``RestoreV2`` allowed there only). A node whose op is a library
  function is a call; ``func`` attributes (``If``/``While`` branches and bodies) are followed.

``from tensorflow.core.protobuf import saved_model_pb2`` imports all of TensorFlow, so this
runs only where TensorFlow is loaded anyway (the SavedModel runtime, export from a
SavedModel). ``unsafe=True`` (``--unsafe``) skips the op check, never the file check.
"""
from __future__ import annotations

import os
import re

from probattn.models.errors import UsageError
from probattn.models.fsutil import hash_tree, read_regular

#: saved_model.pb above this is refused (ours is well under 1 MB; the weights are in variables/)
MAX_PB_BYTES = 64 << 20
#: files in a SavedModel at most
MAX_FILES = 64

#: Top-level graph nodes of every export.
GRAPH_OPS = frozenset({
    "AssignVariableOp", "Const", "NoOp", "Placeholder", "ReadVariableOp", "StatefulPartitionedCall",
    "VarHandleOp", "VarIsInitializedOp",
})

#: Every function but the saver's. The union of the op types in real exports (tf.saved_model.save
#: of the traced serving function, and Keras 3 ``model.export``) of the ProbAttention
#: classifier (the int8-safe pooling: Exp/Log/Relu/Maximum/Minimum/GreaterEqual; Dropout's
#: training branch: RandomUniform), a BiLSTM classifier (While, TensorList*, CudnnRNN* and the
#: gradient functions tf_keras attaches to a saved LSTM) and a MultiHeadAttention classifier
#: (Einsum, Softmax, LayerNormalization's FusedBatchNormV3), in tf_keras 2.21 and Keras 3.15.
#: No file, Python, dataset, print, summary, debug or checkpoint op is in it.
FUNCTION_OPS = frozenset({
    "AddN", "AddV2", "All", "Any", "BatchMatMulV2", "BiasAdd", "BiasAddGrad", "BroadcastGradientArgs", "Cast",
    "ConcatOffset", "ConcatV2", "Const", "CudnnRNNBackpropV3", "CudnnRNNV3", "Einsum", "EmptyTensorList", "Equal",
    "Exp", "ExpandDims", "Fill", "FloorMod", "FusedBatchNormV3", "GatherV2", "Greater", "GreaterEqual", "Identity",
    "If", "InvertPermutation", "Less", "LessEqual", "Log", "LogicalAnd", "LogicalNot", "LogicalOr", "MatMul",
    "Max", "Maximum", "Mean", "Min", "Minimum", "Mul", "Neg", "NoOp", "NotEqual", "OptionalFromValue",
    "OptionalGetValue", "OptionalNone", "Pack", "PartitionedCall", "Prod", "RandomUniform", "Range",
    "ReadVariableOp", "RealDiv", "Relu", "Reshape", "ResourceGather", "ReverseSequence", "ReverseV2", "Rsqrt",
    "SelectV2", "Shape", "Sigmoid", "SigmoidGrad", "Slice", "Softmax", "Split", "Sqrt", "SquaredDifference",
    "Squeeze", "StatefulPartitionedCall", "StatelessIf", "StatelessWhile", "StopGradient", "StridedSlice",
    "StridedSliceGrad", "Sub", "Sum", "Tanh", "TanhGrad", "TensorListElementShape", "TensorListFromTensor",
    "TensorListGetItem", "TensorListLength", "TensorListPopBack", "TensorListPushBack", "TensorListReserve",
    "TensorListSetItem", "TensorListStack", "Tile", "Transpose", "Unpack", "While", "ZerosLike",
    # ProbSparse self-attention (models/probsparse.py): kept queries, causal means, sample ranks
    "Cumsum", "FloorDiv", "Select", "TopKV2",
    # ProbAttention(normalize=True): tf.math.l2_normalize (Square, Sum, Maximum, Rsqrt, Mul)
    "Square",
})

#: Extra ops allowed only in functions reachable only from ``saver_def.save_tensor_name``.
SAVE_OPS = frozenset({
    "Const", "DisableCopyOnRead", "Identity", "MergeV2Checkpoints", "NoOp", "Pack", "ReadVariableOp", "SaveV2",
    "Select", "ShardedFilename", "StaticRegexFullMatch", "StringJoin",
})

#: Extra ops allowed only in functions reachable only from ``saver_def.restore_op_name``.
RESTORE_OPS = frozenset({"AssignVariableOp", "Const", "Identity", "NoOp", "RestoreV2"})

_TOP_FILES = {"saved_model.pb", "fingerprint.pb", "keras_metadata.pb"}
_VARIABLES = re.compile(r"variables/variables\.(index|data-[0-9]{5}-of-[0-9]{5})")


def check_files(files, what: str = "SavedModel") -> None:
    """Refuse a file list (relative to the SavedModel) with anything TensorFlow does not write."""
    names = list(files)
    if len(names) > MAX_FILES:
        raise UsageError(f"{what} holds {len(names)} files; at most {MAX_FILES} allowed")
    for rel in names:
        if rel in _TOP_FILES or _VARIABLES.fullmatch(rel) or rel.startswith("assets.extra/"):
            continue
        raise UsageError(f"{what}: file '{rel}' is not allowed; a SavedModel holds saved_model.pb, fingerprint.pb, "
                         "keras_metadata.pb, variables/variables.index and variables/variables.data-* only "
                         "(no assets)")
    if "saved_model.pb" not in names:
        raise UsageError(f"{what} has no saved_model.pb")


def audit_tree(path, what: str = "SavedModel") -> dict:
    """``{relative path: sha256}`` of a SavedModel directory after ``check_files`` (no link,
    FIFO or device anywhere; walked without following links)."""
    if os.path.islink(path):
        raise UsageError(f"{what} {path} is a symbolic link; a real directory is required")
    files = hash_tree(path, what=what)
    check_files(files, f"{what} {path}")
    return files


def _parse(path, what):
    from tensorflow.core.protobuf import saved_model_pb2  # the protobuf classes only

    data = read_regular(os.path.join(os.fspath(path), "saved_model.pb"), MAX_PB_BYTES, what=f"{what} saved_model.pb")
    sm = saved_model_pb2.SavedModel()
    try:
        sm.ParseFromString(data)
    except Exception as e:  # google.protobuf.message.DecodeError
        raise UsageError(f"{what}: saved_model.pb is not a SavedModel protobuf ({type(e).__name__})") from None
    if not sm.meta_graphs:
        raise UsageError(f"{what}: saved_model.pb holds no MetaGraphDef")
    return sm


def _called(node, fns):
    out = [node.op] if node.op in fns else []
    for v in node.attr.values():
        if v.HasField("func"):
            out.append(v.func.name)
        elif v.HasField("list"):
            out.extend(f.name for f in v.list.func)
    return out


def _closure(roots, fns, what):
    seen, stack = set(), [r for r in roots if r in fns]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for n in fns[name].node_def:
            for c in _called(n, fns):
                if c not in fns:
                    raise UsageError(f"{what}: function {name!r} calls {c!r}, which is not in its function library")
                if c not in seen:
                    stack.append(c)
    return seen


def collect_ops(path, what: str = "SavedModel") -> list:
    """Per MetaGraphDef: ``{"contexts": {"graph"|"function"|"save"|"restore": {op: [where]}},
    "assets": [...]}``. Nothing is executed."""
    sm = _parse(path, what)
    result = []
    for mg in sm.meta_graphs:
        gd = mg.graph_def
        fns = {f.signature.name: f for f in gd.library.function}
        if len(fns) != len(gd.library.function):
            raise UsageError(f"{what}: the function library defines a name twice")
        by_name = {n.name: n for n in gd.node}

        def node_of(tensor):
            return tensor.lstrip("^").split(":")[0]

        saver = mg.saver_def
        save_node = node_of(saver.save_tensor_name) if saver.save_tensor_name else None
        restore_node = node_of(saver.restore_op_name) if saver.restore_op_name else None
        # ancestors of every signature's outputs are always audited strictly: a saver_def
        # naming a signature's node cannot relax the signature's allow-list
        sig_nodes, stack = set(), [node_of(t.name) for s in mg.signature_def.values() for t in s.outputs.values()]
        while stack:
            nn = stack.pop()
            if nn in sig_nodes or nn not in by_name:
                continue
            sig_nodes.add(nn)
            stack.extend(node_of(i) for i in by_name[nn].input)
        if save_node in sig_nodes or restore_node in sig_nodes:
            raise UsageError(f"{what}: the saver names a node a signature depends on; save/restore functions must "
                             "be separate from signatures")
        save_roots = _called(by_name[save_node], fns) if save_node in by_name else []
        restore_roots = _called(by_name[restore_node], fns) if restore_node in by_name else []
        strict_roots = [c for n in gd.node if n.name not in (save_node, restore_node) for c in _called(n, fns)]
        og = mg.object_graph_def
        strict_roots.extend(og.concrete_functions.keys())
        for obj in og.nodes:
            kind = obj.WhichOneof("kind")
            if kind == "function":
                strict_roots.extend(obj.function.concrete_functions)
            elif kind == "bare_concrete_function":
                strict_roots.append(obj.bare_concrete_function.concrete_function_name)
        missing = [r for r in strict_roots + save_roots + restore_roots if r not in fns]
        if missing:
            raise UsageError(f"{what}: the graph calls function {missing[0]!r}, which is not in its function library")
        save_set = _closure(save_roots, fns, what)
        restore_set = _closure(restore_roots, fns, what)
        strict_roots.extend(n for n in fns if n not in save_set and n not in restore_set)
        strict_set = _closure(strict_roots, fns, what)
        contexts = {"graph": {}, "function": {}, "save": {}, "restore": {}}
        for n in gd.node:
            contexts["graph"].setdefault(n.op, []).append(n.name)
        for name, f in fns.items():
            if name in strict_set or (name in save_set and name in restore_set):
                ctx = "function"
            elif name in save_set:
                ctx = "save"
            else:
                ctx = "restore"
            for n in f.node_def:
                if n.op not in fns:  # a direct call's body is audited as its own function
                    contexts[ctx].setdefault(n.op, []).append(f"{name}/{n.name}")
        result.append({"contexts": contexts, "assets": [a.filename for a in mg.asset_file_def]})
    return result


_LABELS = {"graph": "the top-level graph", "function": "a signature or object function",
           "save": "the saver's save function", "restore": "the saver's restore function"}


def audit_ops(path, what: str = "SavedModel") -> list:
    """Refuse a SavedModel holding an op outside the allow-list of its context; return the
    sorted op types seen."""
    allowed = {"graph": GRAPH_OPS, "function": FUNCTION_OPS, "save": FUNCTION_OPS | SAVE_OPS,
               "restore": FUNCTION_OPS | RESTORE_OPS}
    seen = set()
    for mg in collect_ops(path, what):
        if mg["assets"]:
            raise UsageError(f"{what} declares asset files ({', '.join(mg['assets'][:3])}); none are allowed")
        bad = []
        for ctx, ops in mg["contexts"].items():
            for op, where in sorted(ops.items()):
                seen.add(op)
                if op not in allowed[ctx]:
                    bad.append(f"{op} in {_LABELS[ctx]} ({where[0]})")
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise UsageError(f"{what} holds ops outside the allow-list: {'; '.join(bad[:3])}{more}. Allowed: the math, "
                             "variable and control-flow ops of Keras text classifiers (no file, Python, dataset, print "
                             "or checkpoint ops outside the saver). Pass --unsafe only if you trust it")
    return sorted(seen)


def audit(path, unsafe: bool = False, what: str = "SavedModel") -> dict:
    """Both checks: the files (always) and the ops (unless ``unsafe``). Returns the hashes."""
    files = audit_tree(path, what)
    if not unsafe:
        audit_ops(path, what)
    return files

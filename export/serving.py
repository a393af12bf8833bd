"""``probattn package BUNDLE --serving triton,tfserving --out DIR``: the folders serving
systems load, made from a bundle (its hashes checked first).

* ``triton``: a Triton Inference Server model repository for the onnxruntime backend::

      DIR/triton/NAME/config.pbtxt    names, dtypes, dims, max_batch_size, dynamic batching,
                                      label_filename (classification extension)
      DIR/triton/NAME/labels.txt      one label per line, in output order
      DIR/triton/NAME/1/model.onnx    the bundle's ONNX file of the chosen precision

  Triton batches requests together only when their shapes match: clients pad
  ``token_ids`` to the bundle's max length with the pad id 0, which the model masks (so
  padding changes no result). ``config.pbtxt`` is parsed into Triton's own ``ModelConfig``
  protobuf (``tritonclient``, extra ``probattn[serving]``) and checked against the ONNX
  session's inputs and outputs.
* ``tfserving``: a TensorFlow Serving model base path with a numbered version::

      DIR/tfserving/NAME/1/saved_model.pb, variables/   signature serving_default
      DIR/tfserving/NAME/1/assets/                      tokenizer.json, tokenizer_config.json,
                                                        labels.txt, vocab.txt (tracked assets)

  ``labels.txt`` and ``vocab.txt`` are the bundle's own files (the ones ``export`` writes
  for devices, hash-checked); a bundle exported before they existed gets a ``labels.txt``
  written from its manifest's labels, the same bytes.

  It is the bundle's SavedModel re-saved with the tokenizer and labels as
  ``tf.saved_model.Asset`` s, so they are part of the model's MetaGraph. It is loaded back
  with the TF1 session loader TF Serving uses (``tf.compat.v1.saved_model.loader.load``,
  tag ``serve``) and its ``serving_default`` signature is run and compared with the
  bundle's SavedModel.

Neither server is installed here: these checks are what can run without one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from probattn.models.errors import UsageError, one_line
from probattn.models.fsutil import atomic_directory, check_output_dir
from probattn.models.text.tokenizer import PAD_ID

from . import bundle as B
from . import contract as C

SERVING_TARGETS = ("triton", "tfserving")
#: the summary of a ``probattn package`` run, written at the top of its output
SERVING_MANIFEST = "serving.json"
#: the output marker's kind (``fsutil.OUTPUT_MARKER``): what ``package --overwrite`` may replace
SERVING_KIND = "serving"
DEFAULT_NAME = "probattn"
#: Triton's ONNX model file name inside a version folder
TRITON_MODEL_FILE = "model.onnx"
TRITON_CONFIG = "config.pbtxt"
#: dtype names of onnxruntime -> Triton's ``DataType``
ORT_TO_TRITON = {"tensor(int32)": "TYPE_INT32", "tensor(int64)": "TYPE_INT64", "tensor(float)": "TYPE_FP32",
                 "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64", "tensor(bool)": "TYPE_BOOL"}
TRITON_TYPES = {"int32": "TYPE_INT32", "int64": "TYPE_INT64", "float32": "TYPE_FP32"}


def check_name(name: str) -> str:
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise UsageError(f"--name must be 1 to 64 letters, digits, '_', '.' or '-' (not first); received {name!r}")
    return name


def package(bundle, out, targets=SERVING_TARGETS, name: str = DEFAULT_NAME, precision: str = "fp32",
            input_dtype: str = C.INPUT_DTYPE, version: int = 1, max_batch_size: int = 64,
            queue_delay_us: int = 1000, overwrite: bool = False, log=print) -> dict:
    """Write the serving layouts of ``bundle`` into ``out`` (atomically) and check them.
    Returns the summary also written to ``out/serving.json``.

    The bundle is read through ``bundle.Bundle``: one shared lock for the whole run (a
    concurrent ``export --overwrite`` waits) and every byte copied out of it hash-checked
    against the manifest first, so a tampered bundle fails before ``out`` is touched."""
    targets = C.parse_list(targets, SERVING_TARGETS, "serving target")
    name = check_name(name)
    for what, v in (("--version", version), ("--max-batch-size", max_batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"{what} must be a positive integer; received {v!r}")
    if input_dtype not in C.INPUT_DTYPES:
        raise UsageError(f"unknown input dtype '{input_dtype}'; allowed: {', '.join(C.INPUT_DTYPES)}")
    bundle = Path(bundle)
    with B.Bundle(bundle) as b:
        manifest = b.manifest
        check_out_not_in_bundle(out, bundle)
        check_output_dir(out, overwrite, SERVING_KIND)  # before the slow part, not after it
        entries = {}
        if "triton" in targets:
            entry = B.find_artifact(manifest, "onnx", precision, input_dtype=input_dtype)
            if entry is None:
                have = sorted(f"{a['precision']} ({C.input_dtype_of(a)})" for a in manifest["artifacts"]
                              if a["format"] == "onnx")
                raise UsageError(f"bundle has no onnx {precision} artifact with {input_dtype} input; it has onnx: "
                                 f"{', '.join(have) or 'none'}")
            entries["triton"] = entry
        if "tfserving" in targets:
            entry = B.find_artifact(manifest, "savedmodel", "fp32")
            if entry is None:
                raise UsageError("bundle has no savedmodel artifact (export it with --formats including savedmodel)")
            if input_dtype != C.INPUT_DTYPE:
                raise UsageError(f"the SavedModel takes {C.INPUT_DTYPE} ids; --input-dtype {input_dtype} is for "
                                 "triton only")
            entries["tfserving"] = entry
        # every input hash-checked before anything is written
        onnx_bytes = b.artifact_bytes(entries["triton"]) if "triton" in entries else None
        saved_model = b.check_entry(entries["tfserving"]) if "tfserving" in entries else None
        assets = bundle_assets(b)

        summary = {"bundle": str(bundle.absolute()), "name": name, "version": version,
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "targets": {}}
        with atomic_directory(out, overwrite=overwrite, kind=SERVING_KIND) as tmp:
            if "triton" in targets:
                info = write_triton(tmp / "triton", name, version, onnx_bytes, manifest, entries["triton"],
                                    max_batch_size, queue_delay_us, labels=assets.get(C.LABELS_FILE))
                summary["targets"]["triton"] = info
                log(f"  ✓ triton     {info['model_dir']}  ({info['check']})")
            if "tfserving" in targets:
                info = write_tfserving(tmp / "tfserving", name, version, saved_model, manifest, assets)
                summary["targets"]["tfserving"] = info
                log(f"  ✓ tfserving  {info['model_dir']}  ({info['check']})")
            (tmp / SERVING_MANIFEST).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def check_out_not_in_bundle(out, bundle: Path) -> None:
    """A bundle holds only what its manifest hashes: ``--out`` inside it is refused."""
    out_abs, bundle_abs = Path(out).absolute().resolve(), bundle.absolute().resolve()
    if out_abs == bundle_abs or bundle_abs in out_abs.parents:
        raise UsageError(f"--out {out} is inside the bundle {bundle}; a bundle holds only the files its manifest "
                         "hashes: choose a directory outside it")


def bundle_assets(b: B.Bundle) -> dict:
    """``{file name: bytes}`` of the bundle files a serving layout carries, each read under
    the bundle's lock after its hash matched: ``tokenizer.json``, ``tokenizer_config.json``
    (when the manifest lists it), ``labels.txt`` and ``vocab.txt`` (bundles exported before
    them have neither; ``labels.txt`` is then written from the manifest's labels)."""
    from probattn.models.text.tokenizer_guard import MAX_TOKENIZER_BYTES

    m = b.manifest
    tok = m["tokenizer"]
    out = {C.TOKENIZER_FILE: b.read(tok["path"], MAX_TOKENIZER_BYTES, "tokenizer")}
    if tok.get("config"):
        out[C.TOKENIZER_CONFIG_FILE] = b.read(tok["config"]["path"], MAX_TOKENIZER_BYTES, "tokenizer config")
    files = m.get("files") or {}
    for key, fname in B.PLAIN_FILES.items():
        if isinstance(files.get(key), dict):
            out[fname] = b.read(files[key]["path"], MAX_TOKENIZER_BYTES, fname)
    return out


def write_labels(dest: Path, manifest: dict, data: bytes | None = None) -> Path:
    """``labels.txt`` at ``dest``: the bundle's (hash-checked bytes), or written from the
    manifest's labels the way ``export`` writes it (one per line, in output order)."""
    if data is None:
        data = "".join(f"{l}\n" for l in manifest["labels"]).encode("utf-8")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        lines = None
    if lines != [str(l) for l in manifest["labels"]]:
        raise UsageError(f"{C.LABELS_FILE} does not list the manifest's labels in order")
    dest.write_bytes(data)
    return dest


# ----------------------------------------------------------------------------- Triton
def triton_config(name: str, manifest: dict, input_dtype: str, max_batch_size: int = 64,
                  queue_delay_us: int = 1000) -> str:
    """``config.pbtxt`` (protobuf text format) for the onnxruntime backend."""
    outputs = [o["name"] for o in manifest["signature"]["outputs"]]
    n_classes = len(manifest["labels"])
    max_length = manifest.get("max_length")
    lines = [
        f"# Triton model configuration written by probattn for {name} (onnxruntime backend).",
        f"# Layout: {name}/{TRITON_CONFIG}, {name}/{C.LABELS_FILE}, {name}/<version>/{TRITON_MODEL_FILE}",
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        "  {",
        f'    name: "{C.INPUT}"',
        f"    data_type: {TRITON_TYPES[input_dtype]}",
        "    dims: [ -1 ]  # [sequence] per request; Triton adds the batch dim",
        "  }",
        "]",
        "output [",
    ]
    for i, o in enumerate(C.ordered_outputs(outputs)):
        lines += ["  {", f'    name: "{o}"', f"    data_type: {TRITON_TYPES[C.OUTPUT_DTYPE]}"]
        if o == C.PROBABILITIES:
            lines += [f"    dims: [ {n_classes} ]",
                      f'    label_filename: "{C.LABELS_FILE}"  # one label per line, in class order']
        else:
            lines += ["    dims: [ -1 ]  # one weight per step; padded steps get 0"]
        lines.append("  }" + ("," if i < len(outputs) - 1 else ""))
    lines += [
        "]",
        "# Requests are batched together only when their shapes match: pad token_ids to",
        f"# {max_length} ids (the bundle's max length) with the pad id {PAD_ID}, which the model masks.",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {queue_delay_us}",
        "}",
        "instance_group [",
        "  {",
        "    count: 1",
        "    kind: KIND_CPU",
        "  }",
        "]",
    ]
    return "\n".join(lines) + "\n"


def write_triton(root: Path, name: str, version: int, onnx_bytes: bytes, manifest: dict, entry: dict,
                 max_batch_size: int, queue_delay_us: int, labels: bytes | None = None) -> dict:
    """``root/name``: ``onnx_bytes`` (the bundle's file, hash-checked) as ``version/model.onnx``,
    ``labels.txt`` and ``config.pbtxt``, checked against each other."""
    model_dir = root / name
    (model_dir / str(version)).mkdir(parents=True)
    (model_dir / str(version) / TRITON_MODEL_FILE).write_bytes(onnx_bytes)
    write_labels(model_dir / C.LABELS_FILE, manifest, labels)
    input_dtype = C.input_dtype_of(entry)
    text = triton_config(name, manifest, input_dtype, max_batch_size, queue_delay_us)
    (model_dir / TRITON_CONFIG).write_text(text, encoding="utf-8")
    problems = check_triton(model_dir, version)
    if problems is None:
        check = "not checked: tritonclient is not installed (pip install 'probattn[serving]')"
    elif problems:
        raise UsageError(f"the Triton configuration does not match the model: {'; '.join(problems)}")
    else:
        check = "config.pbtxt parsed as Triton's ModelConfig and matches the ONNX session"
    return {"model_dir": str(Path("triton") / name), "artifact": entry["path"],
            "precision": entry["precision"], "input_dtype": input_dtype, "max_batch_size": max_batch_size,
            "pad_to": manifest.get("max_length"), "check": check}


def parse_triton_config(text: str):
    """``config.pbtxt`` -> ``tritonclient``'s ``ModelConfig`` message (every field name and
    enum value checked by protobuf's text format parser). ImportError without tritonclient."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def check_triton(model_dir: Path, version: int = 1) -> list | None:
    """What does not match between ``config.pbtxt`` and the ONNX model; [] when nothing,
    None when ``tritonclient`` is not installed (nothing could be checked)."""
    try:
        from tritonclient.grpc import model_config_pb2 as mc
    except ImportError:
        return None
    import onnxruntime as ort
    from google.protobuf import text_format

    model_dir = Path(model_dir)
    try:
        cfg = parse_triton_config((model_dir / TRITON_CONFIG).read_text(encoding="utf-8"))
    except text_format.ParseError as e:
        return [f"{TRITON_CONFIG} does not parse as Triton's ModelConfig: {one_line(e, 200)}"]
    problems = []
    if cfg.name != model_dir.name:
        problems.append(f"name {cfg.name!r} is not the folder name {model_dir.name!r}")
    if (cfg.backend or cfg.platform) not in ("onnxruntime", "onnxruntime_onnx") or (cfg.backend and cfg.platform):
        problems.append(f"backend {cfg.backend!r} / platform {cfg.platform!r}: expected backend onnxruntime")
    batched = cfg.max_batch_size > 0
    if cfg.HasField("dynamic_batching") and not batched:
        problems.append("dynamic_batching needs max_batch_size > 0")
    model_file = model_dir / str(version) / (cfg.default_model_filename or TRITON_MODEL_FILE)
    if not model_file.is_file():
        return problems + [f"model file {model_file} missing"]
    sess = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])

    def compare(kind, declared, actual):
        names = {a.name: a for a in actual}
        if sorted(d.name for d in declared) != sorted(names):
            problems.append(f"{kind}s {sorted(d.name for d in declared)} in the config, {sorted(names)} in the model")
        for d in declared:
            a = names.get(d.name)
            if a is None:
                continue
            if mc.DataType.Name(d.data_type) != ORT_TO_TRITON.get(a.type):
                problems.append(f"{kind} {d.name}: config {mc.DataType.Name(d.data_type)}, model {a.type}")
            shape = list(a.shape)
            if batched:
                if not shape or isinstance(shape[0], int):
                    problems.append(f"{kind} {d.name}: the model's first dim {shape[:1]} is not a dynamic batch")
                shape = shape[1:]
            dims = list(d.dims)
            fixed = [isinstance(m, int) and m > 0 for m in shape]
            if len(dims) != len(shape) or any((c == -1) == f or (f and c != m)
                                               for c, m, f in zip(dims, shape, fixed)):
                problems.append(f"{kind} {d.name}: config dims {dims}, model dims {shape}")

    compare("input", cfg.input, sess.get_inputs())
    compare("output", cfg.output, sess.get_outputs())
    for o in cfg.output:
        if o.label_filename:
            path = model_dir / o.label_filename
            labels = path.read_text(encoding="utf-8").splitlines() if path.is_file() else None
            if labels is None:
                problems.append(f"label file {o.label_filename} missing")
            elif list(o.dims) != [len(labels)]:
                problems.append(f"{o.label_filename} has {len(labels)} labels, output {o.name} dims {list(o.dims)}")
    return problems


# ----------------------------------------------------------------------------- TF Serving
def _tensorflow():
    from probattn.models.quiet import import_tensorflow

    return import_tensorflow()


@contextlib.contextmanager
def _quiet_tf():
    """TensorFlow's deprecation notes for the TF1 loader and its native device start-up
    lines off stderr (Python exceptions still propagate)."""
    from probattn.models.quiet import quiet_stderr

    logger = logging.getLogger("tensorflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with quiet_stderr():
            yield
    finally:
        logger.setLevel(level)


def write_tfserving(root: Path, name: str, version: int, saved_model, manifest: dict, assets: dict) -> dict:
    """``root/name/version``: the bundle's SavedModel (``saved_model``: a path to it, already
    hash-checked) re-saved with ``assets`` (``{file name: bytes}``, hash-checked) and
    ``labels.txt`` as tracked assets."""
    tf = _tensorflow()
    version_dir = root / name / str(version)
    scratch = root / ".assets"
    scratch.mkdir(parents=True)
    files = []
    for fname, data in assets.items():
        if fname == C.LABELS_FILE:
            continue
        (scratch / fname).write_bytes(data)
        files.append(scratch / fname)
    files.append(write_labels(scratch / C.LABELS_FILE, manifest, assets.get(C.LABELS_FILE)))
    loaded = tf.saved_model.load(str(saved_model))
    signature = loaded.signatures.get(C.SIGNATURE_KEY)
    if signature is None:
        raise UsageError(f"the bundle's SavedModel has no '{C.SIGNATURE_KEY}' signature")
    holder = tf.Module()
    holder.model = loaded
    # tracked assets: listed in the MetaGraph, copied into assets/ and kept with the model
    holder.assets = [tf.saved_model.Asset(str(p)) for p in files]
    with _quiet_tf():
        tf.saved_model.save(holder, str(version_dir), signatures={C.SIGNATURE_KEY: signature})
    shutil.rmtree(scratch)
    diff = check_tfserving(version_dir, signature, manifest)
    assets = sorted(p.name for p in (version_dir / "assets").iterdir())
    return {"model_dir": str(Path("tfserving") / name), "version_dir": str(Path("tfserving") / name / str(version)),
            "assets": assets, "check": f"loaded with the TF1 session loader (tag serve); serving_default "
                                       f"equals the bundle's SavedModel (max abs difference {diff:g})"}


def run_tf1_signature(version_dir, ids: np.ndarray) -> tuple:
    """Load ``version_dir`` as TF Serving does (TF1 session loader, tag ``serve``) and run
    ``serving_default`` on ``ids``. Returns ({output: array}, [asset file names])."""
    tf = _tensorflow()
    tf1 = tf.compat.v1
    graph = tf.Graph()
    with _quiet_tf(), graph.as_default(), tf1.Session(graph=graph) as sess:
        meta = tf1.saved_model.loader.load(sess, [tf1.saved_model.tag_constants.SERVING], str(version_dir))
        sig = meta.signature_def[C.SIGNATURE_KEY]
        fetches = {k: v.name for k, v in sig.outputs.items()}
        out = sess.run(fetches, {sig.inputs[C.INPUT].name: ids})
        return out, sorted(a.filename for a in meta.asset_file_def)


def check_tfserving(version_dir: Path, signature, manifest: dict) -> float:
    """Run the written model through the TF1 loader on a few id rows (padding included) and
    compare it with the bundle's signature: the same graph must give the same numbers."""
    tf = _tensorflow()

    vocab = int(manifest["vocab_size"])
    rng = np.random.default_rng(0)
    ids = rng.integers(2, vocab, size=(4, 12)).astype(np.int32)
    ids[1, 5:] = 0
    ids[2, 1:] = 0
    out, assets = run_tf1_signature(version_dir, ids)
    want = {C.TOKENIZER_FILE, C.LABELS_FILE}
    if not want <= set(assets):
        raise UsageError(f"the TF Serving model lists assets {assets}; expected {sorted(want)} among them")
    ref = signature(**{C.INPUT: tf.constant(ids)})
    diff = 0.0
    for k, v in ref.items():
        if k not in out:
            raise UsageError(f"the TF Serving model has no output {k}")
        diff = max(diff, float(np.abs(np.asarray(out[k]) - v.numpy()).max()))
    if diff != 0.0:  # the same graph and weights: any difference is a broken copy
        raise UsageError(f"the TF Serving model differs from the bundle's SavedModel by {diff:g}")
    return diff

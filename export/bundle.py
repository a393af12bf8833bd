"""Bundles: the manifest (its schema, checked completely), the SHA-256 of every file, and
reading a bundle as one consistent generation (TF-free).

A bundle is something users download and pass around, and CI verifies bundles from pull
requests, so everything in it is checked before anything runs:

* ``validate_manifest``: every field's type and range (labels, vocabulary size, maximum
  length, the signature and its class count, artifacts unique by path and by format and
  precision, each at the path its format and precision name, input shapes); paths are plain
  relative names (no absolute path, ``..``, NUL or backslash).
* ``contents``: ``{relative path: sha256}`` of every file of the bundle but the ones the
  tool itself writes later (``manifest.json``, the output marker, ``report/``, ``bench/``),
  SavedModel variables included. Each artifact's ``sha256`` must agree with it (a directory
  artifact's hash is ``tree_digest`` of its files).
* ``Bundle``: opens the bundle once (``fsutil.LockedDirectory``: a shared lock on the
  directory, every file opened relative to it with no link followed and no FIFO or device
  opened), so a concurrent ``export --overwrite`` can never mix two bundles, and returns
  file contents only after their hash matched.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from probattn.models.errors import UsageError
from probattn.models.fsutil import (OUTPUT_MARKER, LockedDirectory, safe_relpath, sha256_path,  # noqa: F401
                                    tree_digest, write_file_at)
from probattn.models.text.tokenizer import MAX_LENGTH_LIMIT, PAD_ID, UNK_ID
from probattn.models.text.tokenizer_guard import MAX_TOKENIZER_BYTES, MAX_VOCAB

from . import contract as C

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
#: written by verify and bench into a bundle (with no-follow semantics), never hashed, never run
REPORT_DIR, BENCH_DIR = "report", "bench"
#: top-level names of a bundle that are the tool's own (not in ``contents``)
OWN_ENTRIES = (MANIFEST, OUTPUT_MARKER, REPORT_DIR, BENCH_DIR)

MAX_MANIFEST_BYTES = 16 << 20
#: labels: at most this many, each at most this long
MAX_LABELS, MAX_LABEL_CHARS = 10_000, 200
MAX_ARTIFACTS = 64
MAX_FILES = 512
#: artifact files read into memory at most (ONNX's own limit is 2 GB)
MAX_ARTIFACT_BYTES = 2 << 30
#: test split read by verify and bench
MAX_TEST_DATA_BYTES = 256 << 20

_HEX64 = re.compile(r"[0-9a-f]{64}")


def size_of(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.stat().st_size


# ------------------------------------------------------------------ the schema

def _int_in(m, key, lo, hi, where):
    v = m.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise UsageError(f"{where}: '{key}' must be an integer from {lo:,} to {hi:,}; found {v!r}")
    return v


def _sha(v, what, where):
    if not isinstance(v, str) or not _HEX64.fullmatch(v):
        raise UsageError(f"{where}: {what} must be a SHA-256 (64 lowercase hex digits); found {str(v)[:80]!r}")
    return v


def _dims(shape, what, where):
    if not isinstance(shape, list) or len(shape) != 2:
        raise UsageError(f"{where}: {what} shape must be a list of 2 dims; found {shape!r}")
    for d in shape:
        if isinstance(d, bool) or not (isinstance(d, str) and 0 < len(d) <= 64
                                       or isinstance(d, int) and 1 <= d <= MAX_LENGTH_LIMIT * 4):
            raise UsageError(f"{where}: {what} dims must be names or integers from 1 to {MAX_LENGTH_LIMIT * 4:,}; "
                             f"found {shape!r}")
    return shape


def output_units(manifest: dict) -> int:
    """The width of the first output (``probabilities``): one per label, or one unit for a
    binary sigmoid / logit head between two labels."""
    heads = manifest.get("heads") or []
    if heads and isinstance(heads[0], dict) and isinstance(heads[0].get("units"), int):
        return heads[0]["units"]
    return len(manifest["labels"])


#: the kinds of score output ``signature.py`` tells apart
HEAD_KINDS = ("softmax", "sigmoid", "scores", "logit")


def _heads(m, names, where) -> None:
    """``heads``: one entry per score output of the signature, in its order, each with its
    kind and width; the first is ``probabilities``."""
    heads = m.get("heads")
    if heads is None:
        return
    score_outputs = [n for n in names if n != C.ATTENTION]
    if not isinstance(heads, list) or [h.get("output") if isinstance(h, dict) else None for h in heads] \
            != score_outputs:
        raise UsageError(f"{where}: 'heads' must list the signature's score outputs {score_outputs!r} in order")
    for h in heads:
        if h.get("kind") not in HEAD_KINDS or isinstance(h.get("units"), bool) or not isinstance(h.get("units"), int) \
                or not 1 <= h["units"] <= MAX_LABELS:
            raise UsageError(f"{where}: head {h.get('output')!r} needs a kind ({', '.join(HEAD_KINDS)}) and 1 to "
                             f"{MAX_LABELS:,} units; found {str(h)[:120]}")


def _output_name_ok(name) -> bool:
    return isinstance(name, str) and (name in C.OUTPUT_ORDER or name.startswith(C.PROBABILITIES + "_"))


def _expected_path(entry) -> str | None:
    """Where a format / precision / output dtype lives in a bundle (None: the Keras reference
    may be any of the reference files)."""
    dtype = entry.get("output_dtype", C.OUTPUT_DTYPE)
    allowed = C.output_dtypes(entry["format"], entry["precision"])
    if not isinstance(dtype, str) or dtype not in allowed:
        raise UsageError(f"artifact {entry['path']}: output_dtype {str(dtype)[:40]!r} is not allowed for "
                         f"{entry['format']} {entry['precision']}; allowed: {', '.join(allowed)}")
    if entry["format"] == "keras":
        return None
    if C.input_dtype_of(entry) not in C.INPUT_DTYPES:
        raise UsageError(f"artifact {entry['path']}: input_dtype {str(entry.get('input_dtype'))[:40]!r} is not "
                         f"allowed; allowed: {', '.join(C.INPUT_DTYPES)}")
    return C.artifact_filename(entry["format"], entry["precision"], dtype, C.input_dtype_of(entry))


#: C sources ``export --c-array`` writes (``regex_tokenizer.*`` only for a regex tokenizer)
C_ARRAY_FILES = ("labels_data.c", "labels_data.h", "model_data.c", "model_data.h", "regex_tokenizer.c",
                 "regex_tokenizer.h", "vocab_data.c", "vocab_data.h")
#: the plain files of ``files`` (key: file name)
PLAIN_FILES = {"labels": C.LABELS_FILE, "vocabulary": C.VOCAB_FILE}
#: the largest TFLM arena a manifest may claim (the runner's own arena is 4 MB)
MAX_ARENA_BYTES = 1 << 30


def _device_fields(a, max_length_hi, where):
    """The fields the TFLite-family formats add: a fixed ``input_shape`` of ``[1, length]``
    for the fixed-shape formats, measured ``targets`` and ``target_checks``, ``arena_bytes``."""
    w = f"{where}: artifact {a['path']}"
    shape = a.get("input_shape")
    if a["format"] in C.FIXED_SHAPE_FORMATS:
        if not (isinstance(shape, list) and len(shape) == 2 and shape[0] == 1 and type(shape[1]) is int
                and 1 <= shape[1] <= max_length_hi):
            raise UsageError(f"{w}: a {a['format']} file needs input_shape [1, length] with a length from 1 to "
                             f"{max_length_hi:,}; found {shape!r}")
    elif shape is not None:
        _dims(shape, f"artifact {a['path']} input", where)
    if "targets" in a:
        t = a["targets"]
        if not isinstance(t, list) or len(set(map(str, t))) != len(t) or not set(t) <= set(C.TARGETS):
            raise UsageError(f"{w}: 'targets' must be a list of distinct names from {', '.join(C.TARGETS)}; "
                             f"found {str(t)[:80]}")
    if "target_checks" in a:
        tc = a["target_checks"]
        if not isinstance(tc, dict) or not set(tc) <= set(C.TARGETS) or \
                not all(isinstance(v, str) and len(v) <= 2000 for v in tc.values()):
            raise UsageError(f"{w}: 'target_checks' must map {', '.join(C.TARGETS)} to a text; found {str(tc)[:80]}")
        if "targets" in a and sorted(a["targets"]) != sorted(k for k, v in tc.items() if v == "ok"):
            raise UsageError(f"{w}: 'targets' {a['targets']} disagree with 'target_checks'; they must agree")
    if "arena_bytes" in a:
        _int_in(a, "arena_bytes", 1, MAX_ARENA_BYTES, w)
    if a["format"] == "mediapipe" and a.get("outputs", list(C.MEDIAPIPE_OUTPUTS)) != list(C.MEDIAPIPE_OUTPUTS):
        raise UsageError(f"{w}: a mediapipe file has outputs {list(C.MEDIAPIPE_OUTPUTS)}; found {a['outputs']!r}")


def _files(m, contents, covered, where) -> set:
    """``files``: labels.txt, vocab.txt (their line counts the manifest's) and the C sources;
    returns the paths it claims."""
    files = m.get("files")
    if files is None:
        return set()
    if not isinstance(files, dict) or not set(files) <= set(PLAIN_FILES) | {"c_array"}:
        raise UsageError(f"{where}: 'files' may hold {', '.join(list(PLAIN_FILES) + ['c_array'])}; found "
                         f"{sorted(files) if isinstance(files, dict) else type(files).__name__}")
    claimed = set()
    for key, name in PLAIN_FILES.items():
        f = files.get(key)
        if f is None:
            continue
        if not isinstance(f, dict) or f.get("path") != name:
            raise UsageError(f"{where}: files.{key} must be an object with path '{name}'; found {str(f)[:80]}")
        _sha(f.get("sha256"), f"the sha256 of {name}", where)
        if name not in contents:
            raise UsageError(f"{where}: {name} is not listed in contents")
        covered(name, f["sha256"], f"files.{key}")
        if "entries" in f:  # labels: one per label; vocabulary: the tokenizer's ids, within the embedding
            n = f["entries"]
            if key == "labels" and (type(n) is not int or n != len(m["labels"])):
                raise UsageError(f"{where}: {name} has {n!r} entries; the manifest has {len(m['labels']):,} "
                                 "labels; they must agree")
            if key == "vocabulary" and (type(n) is not int or not 3 <= n <= m["vocab_size"]):
                raise UsageError(f"{where}: {name} has {n!r} entries; allowed: 3 to the manifest's vocab_size "
                                 f"({m['vocab_size']:,})")
        claimed.add(name)
    ca = files.get("c_array")
    if ca is not None:
        model = C.artifact_filename("tflite-fixed", "int8")
        if not isinstance(ca, dict) or ca.get("dir") != C.C_ARRAY_DIR or ca.get("model") != model \
                or not isinstance(ca.get("files"), list) or not ca["files"]:
            raise UsageError(f"{where}: files.c_array must be {{dir: '{C.C_ARRAY_DIR}', model: '{model}', files: "
                             f"[...]}}; found {str(ca)[:120]}")
        if not any(a.get("path") == model for a in m["artifacts"] if isinstance(a, dict)):
            raise UsageError(f"{where}: files.c_array embeds {model}, which is not an artifact of the bundle")
        for f in ca["files"]:
            rel = f.get("path") if isinstance(f, dict) else None
            if not isinstance(rel, str) or rel.count("/") != 1 or rel.split("/") [0] != C.C_ARRAY_DIR \
                    or rel.split("/")[1] not in C_ARRAY_FILES:
                raise UsageError(f"{where}: files.c_array lists {str(rel)[:80]!r}; allowed: "
                                 f"{C.C_ARRAY_DIR}/ + one of {', '.join(C_ARRAY_FILES)}")
            if rel in claimed:
                raise UsageError(f"{where}: files.c_array lists {rel} twice")
            _sha(f.get("sha256"), f"the sha256 of {rel}", where)
            if rel not in contents:
                raise UsageError(f"{where}: {rel} is not listed in contents")
            covered(rel, f["sha256"], "C source")
            claimed.add(rel)
    return claimed


def validate_manifest(m, where: str = MANIFEST) -> dict:
    """Check every field ``manifest.json`` may hold and their consistency; return it."""
    if not isinstance(m, dict):
        raise UsageError(f"{where}: expected a JSON object, received {type(m).__name__}")
    version = m.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise UsageError(f"{where}: missing or non-integer schema_version ({version!r})")
    if version > SCHEMA_VERSION:
        raise UsageError(f"{where} has schema_version {version}; this probattn reads up to {SCHEMA_VERSION} "
                         "(upgrade probattn)")
    if version < SCHEMA_VERSION:
        raise UsageError(f"{where} has schema_version {version}, from an earlier probattn that did not hash every "
                         f"file of a bundle; this probattn reads {SCHEMA_VERSION}: export the bundle again")
    for key in ("artifacts", "signature", "labels", "vocab_size", "max_length", "tokenizer", "contents"):
        if key not in m:
            raise UsageError(f"{where}: missing field '{key}'")

    labels = m["labels"]
    if not isinstance(labels, list) or not 2 <= len(labels) <= MAX_LABELS:
        raise UsageError(f"{where}: 'labels' must be a list of 2 to {MAX_LABELS:,} names; found "
                         f"{labels if not isinstance(labels, list) else f'{len(labels)} entries'!r}")
    for lab in labels:
        if not isinstance(lab, str) or not 0 < len(lab) <= MAX_LABEL_CHARS \
                or any(ord(c) < 32 or c in "\x7f\x85\u2028\u2029" for c in lab):
            raise UsageError(f"{where}: each label must be a name of 1 to {MAX_LABEL_CHARS} printable characters; "
                             f"found {str(lab)[:60]!r}")
    if len(set(labels)) != len(labels):
        raise UsageError(f"{where}: 'labels' must be a list of at least 2 distinct names; found {labels[:10]!r}")
    _int_in(m, "vocab_size", 3, MAX_VOCAB, where)
    _int_in(m, "max_length", 1, MAX_LENGTH_LIMIT, where)
    for key, want in (("pad_id", PAD_ID), ("unk_id", UNK_ID)):
        if key in m and (isinstance(m[key], bool) or m[key] != want):
            raise UsageError(f"{where}: '{key}' must be {want}; found {m[key]!r}")

    sig = m["signature"]
    if not isinstance(sig, dict) or not isinstance(sig.get("inputs"), list) or not isinstance(sig.get("outputs"), list):
        raise UsageError(f"{where}: 'signature' must be an object with 'inputs' and 'outputs' lists")
    ins = sig["inputs"]
    if len(ins) != 1 or not isinstance(ins[0], dict) or ins[0].get("name") != C.INPUT or ins[0].get("dtype") != C.INPUT_DTYPE:
        raise UsageError(f"{where}: the signature must have one input '{C.INPUT}' of dtype {C.INPUT_DTYPE}; found "
                         f"{json.dumps(ins)[:160]}")
    _dims(ins[0].get("shape"), f"input '{C.INPUT}'", where)
    outs = sig["outputs"]
    names = [o.get("name") if isinstance(o, dict) else None for o in outs]
    if not 1 <= len(outs) <= 16 or not all(_output_name_ok(n) for n in names) or len(set(names)) != len(names) \
            or C.PROBABILITIES not in names:
        raise UsageError(f"{where}: the signature's outputs must be '{C.PROBABILITIES}' and optionally "
                         f"'{C.ATTENTION}', each once; found {names!r}")
    for o in outs:
        if o.get("dtype") != C.OUTPUT_DTYPE:
            raise UsageError(f"{where}: output '{o['name']}' must be {C.OUTPUT_DTYPE}; found {o.get('dtype')!r}")
        _dims(o.get("shape"), f"output '{o['name']}'", where)
    classes = next(o for o in outs if o["name"] == C.PROBABILITIES)["shape"][1]
    _heads(m, names, where)
    binary = classes == 1 and len(labels) == 2 and output_units(m) == 1 \
        and (m.get("heads") or [{}])[0].get("kind") in ("sigmoid", "logit")
    if classes != len(labels) and not binary:
        raise UsageError(f"{where}: output '{C.PROBABILITIES}' has {classes!r} classes but there are {len(labels)} "
                         "labels; they must agree")

    contents = m["contents"]
    if not isinstance(contents, dict) or not 1 <= len(contents) <= MAX_FILES:
        raise UsageError(f"{where}: 'contents' must map 1 to {MAX_FILES} file paths to their SHA-256")
    for rel, digest in contents.items():
        safe_relpath(rel, f"{where}: contents path")
        if rel.split("/")[0] in OWN_ENTRIES:
            raise UsageError(f"{where}: contents path '{rel}' is one probattn writes itself; it cannot be an input")
        _sha(digest, f"the hash of '{rel}'", where)

    def covered(rel, digest, what):
        """A file: in contents with the same hash. A directory: its files in contents, same tree hash."""
        if rel in contents:
            if contents[rel] != digest:
                raise UsageError(f"{where}: {what} '{rel}' has sha256 {digest[:12]}... but contents lists "
                                 f"{contents[rel][:12]}...; they must agree")
            return
        inner = {k[len(rel) + 1:]: v for k, v in contents.items() if k.startswith(rel + "/")}
        if not inner:
            raise UsageError(f"{where}: {what} '{rel}' is not listed in contents")
        if tree_digest(inner) != digest:
            raise UsageError(f"{where}: {what} '{rel}' has sha256 {digest[:12]}... but its files in contents hash to "
                             f"{tree_digest(inner)[:12]}...; they must agree")

    tok = m["tokenizer"]
    if not isinstance(tok, dict):
        raise UsageError(f"{where}: field 'tokenizer' must be an object with a 'path' and a 'sha256'")
    safe_relpath(tok.get("path"), f"{where}: tokenizer path")
    _sha(tok.get("sha256"), "the tokenizer's sha256", where)
    covered(tok["path"], tok["sha256"], "tokenizer")
    tok_config = tok.get("config")  # tokenizer_config.json, for JavaScript clients (portable kind)
    if tok_config is not None:
        if not isinstance(tok_config, dict) or tok_config.get("path") != C.TOKENIZER_CONFIG_FILE:
            raise UsageError(f"{where}: tokenizer.config must be an object with path '{C.TOKENIZER_CONFIG_FILE}'; "
                             f"found {str(tok_config)[:80]}")
        _sha(tok_config.get("sha256"), f"the sha256 of {C.TOKENIZER_CONFIG_FILE}", where)
        covered(tok_config["path"], tok_config["sha256"], "tokenizer.config")
    test = m.get("test_data")
    if test is not None:
        safe_relpath(test, f"{where}: test_data path")
        if test not in contents:
            raise UsageError(f"{where}: test_data '{test}' is not listed in contents")

    arts = m["artifacts"]
    if not isinstance(arts, list) or not 1 <= len(arts) <= MAX_ARTIFACTS:
        raise UsageError(f"{where}: 'artifacts' must be a list of 1 to {MAX_ARTIFACTS} entries")
    paths, keys = set(), set()
    for i, a in enumerate(arts):
        if not isinstance(a, dict) or not all(isinstance(a.get(k), str) for k in ("path", "format", "precision", "sha256")):
            raise UsageError(f"{where}: artifact #{i} needs string fields path, format, precision and sha256")
        if a["format"] not in C.FORMATS or a["precision"] not in C.SUPPORTED[a["format"]]:
            raise UsageError(f"{where}: artifact {a['path']} has format '{a['format']}' / precision "
                             f"'{a['precision']}'; allowed formats {', '.join(C.FORMATS)}, precisions "
                             f"{', '.join(C.PRECISIONS)}")
        if C.input_dtype_of(a) not in C.INPUT_DTYPES:
            raise UsageError(f"{where}: artifact {a['path']} has input_dtype {str(a.get('input_dtype'))[:40]!r}; "
                             f"allowed: {', '.join(C.INPUT_DTYPES)}")
        safe_relpath(a["path"], f"{where}: artifact path")
        expected = _expected_path(a)
        if expected is not None and a["path"] != expected:
            raise UsageError(f"{where}: artifact {a['path']} is listed as {a['format']} {a['precision']}, which lives "
                             f"at {expected}; a file cannot be served as another precision")
        key = C.artifact_key(a)
        if a["path"] in paths or key in keys:
            raise UsageError(f"{where}: artifact {a['path']} ({' / '.join(key)}) is listed twice; more than one "
                             "entry with the same path or format / precision / output dtype / input dtype; entries must be unique")
        paths.add(a["path"])
        keys.add(key)
        _sha(a["sha256"], f"the sha256 of {a['path']}", where)
        covered(a["path"], a["sha256"], "artifact")
        if "bytes" in a:
            _int_in(a, "bytes", 0, 1 << 40, f"{where}: artifact {a['path']}")
        _device_fields(a, MAX_LENGTH_LIMIT, where)

    # every file the bundle holds must be one the schema knows: an artifact (a file, or a file
    # of its directory), the tokenizer, the test split, labels.txt, vocab.txt or a C source
    custom = (m.get("source") or {}).get("custom_objects") if isinstance(m.get("source"), dict) else None
    if custom is not None:  # the user's --custom-objects file, kept for verify and bench
        if not isinstance(custom, dict) or not isinstance(custom.get("path"), str) \
                or not custom["path"].startswith(C.CUSTOM_OBJECTS_DIR + "/") or custom["path"].count("/") != 1:
            raise UsageError(f"{where}: source.custom_objects must name a file in {C.CUSTOM_OBJECTS_DIR}/; found "
                             f"{str(custom)[:120]}")
        safe_relpath(custom["path"], f"{where}: custom objects path")
        _sha(custom.get("sha256"), "the sha256 of the custom objects file", where)
        covered(custom["path"], custom["sha256"], "source.custom_objects")
    claimed = {tok["path"]} | ({custom["path"]} if custom else set()) | ({tok_config["path"]} if tok_config else set()) | ({test} if test else set()) | _files(m, contents, covered, where)
    unknown = sorted(rel for rel in contents if rel not in claimed and rel not in paths
                     and not any(rel.startswith(p + "/") for p in paths))
    if unknown:
        raise UsageError(f"{where}: contents lists {unknown[0]!r}, which is no artifact, tokenizer, test split, "
                         f"{C.LABELS_FILE}, {C.VOCAB_FILE} or C source of the manifest; refusing a file the "
                         "schema does not know")
    kind = tok.get("kind")
    if kind is not None:
        from probattn.models.text.tokenizer import KIND_CUSTOM, TOKENIZER_KINDS

        if kind not in TOKENIZER_KINDS + (KIND_CUSTOM,):
            raise UsageError(f"{where}: tokenizer kind {str(kind)[:40]!r} is not allowed; allowed: "
                             f"{', '.join(TOKENIZER_KINDS + (KIND_CUSTOM,))}")
    return m


# ------------------------------------------------------------------ reading

def read_manifest(d: LockedDirectory) -> dict:
    raw = d.read(MANIFEST, MAX_MANIFEST_BYTES, "manifest")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UsageError(f"{d.path / MANIFEST} is not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    return validate_manifest(manifest, str(d.path / MANIFEST))


def _open(bundle) -> LockedDirectory:
    bundle = Path(bundle)
    d = LockedDirectory(bundle, "bundle")
    try:
        d.__enter__()
    except UsageError as e:
        if "not found" in str(e):
            raise UsageError(f"bundle not found: {bundle}") from None
        if "received a file" in str(e):
            raise UsageError(f"expected a bundle directory (from 'probattn export'), received a file: {bundle}") from None
        raise
    st = d.lstat(MANIFEST)
    if st is None:
        d.close()
        raise UsageError(f"{bundle} is not a bundle: no {MANIFEST} (make one with 'probattn export')")
    return d


def load_manifest(bundle) -> dict:
    """The validated manifest of ``bundle`` (read once, under the bundle's shared lock)."""
    d = _open(bundle)
    try:
        return read_manifest(d)
    finally:
        d.close()


class Bundle:
    """A bundle opened for reading: one directory descriptor under a shared lock for its whole
    life (``with Bundle(path) as b``), the manifest validated, and every file handed out only
    after its SHA-256 matched ``contents``.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.dir = None
        self.manifest = None

    def __enter__(self):
        self.dir = _open(self.path)
        try:
            self.manifest = read_manifest(self.dir)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.dir is not None:
            self.dir.close()
            self.dir = None

    @property
    def contents(self) -> dict:
        return self.manifest["contents"]

    def read(self, rel: str, max_bytes: int, what: str = "file") -> bytes:
        """The bytes of a file listed in ``contents``, after its hash matched."""
        import hashlib

        data = self._read_listed(rel, max_bytes, what)
        self._confirm(rel, what, hashlib.sha256(data).hexdigest())
        return data

    def _read_listed(self, rel: str, max_bytes: int, what: str) -> bytes:
        if rel not in self.contents:
            raise UsageError(f"{what} '{rel}' is not listed in the manifest's contents; refusing to read it")
        return self.dir.read(rel, max_bytes, what)

    def _confirm(self, rel: str, what: str, digest: str) -> None:
        if digest != self.contents[rel]:
            raise UsageError(f"{what} {rel} does not match its manifest hash (sha256 {digest[:12]}…, manifest "
                             f"{self.contents[rel][:12]}…); it was modified or damaged, refusing to load it")

    def read_hashing_aside(self, rel: str, max_bytes: int, what: str = "file"):
        """``read`` with the hash computed on another thread while the caller goes on (hashlib
        releases the GIL): ``(data, confirm)``. ``confirm()`` waits for the hash and raises
        like ``read``; nothing may use ``data`` for more than reading before it returned."""
        import hashlib
        import threading

        data = self._read_listed(rel, max_bytes, what)
        digest = []
        worker = threading.Thread(target=lambda: digest.append(hashlib.sha256(data).hexdigest()),
                                  name="probattn-hash", daemon=True)
        worker.start()

        def confirm():
            worker.join()
            self._confirm(rel, what, digest[0] if digest else hashlib.sha256(data).hexdigest())

        return data, confirm

    def check_file(self, rel: str, what: str = "file") -> None:
        """Hash a listed file in place (no copy in memory)."""
        if rel not in self.contents:
            raise UsageError(f"{what} '{rel}' is not listed in the manifest's contents; refusing to read it")
        digest = self.dir.sha256(rel, what)
        if digest != self.contents[rel]:
            raise UsageError(f"{what} {rel} does not match its manifest hash (sha256 {digest[:12]}…, manifest "
                             f"{self.contents[rel][:12]}…); it was modified or damaged, refusing to load it")

    def check_entry(self, entry: dict) -> str:
        """Check an artifact (a file, or every file of a directory) against the manifest and
        return a path that reads this generation of it (``/proc/self/fd/N/...``)."""
        rel = entry["path"]
        st = self.dir.lstat(rel)
        if st is None:
            raise UsageError(f"artifact missing from bundle: {rel} (listed in {MANIFEST})")
        import stat as _stat

        if _stat.S_ISDIR(st.st_mode):
            on_disk = self.dir.hash_tree(rel)
            listed = {k: v for k, v in self.contents.items() if k.startswith(rel + "/")}
            extra = sorted(set(on_disk) - set(listed))
            if extra:
                raise UsageError(f"artifact {rel} holds {extra[0]}, which the manifest does not list; refusing it")
            for k, v in listed.items():
                if on_disk.get(k) != v:
                    if k not in on_disk:
                        raise UsageError(f"artifact missing from bundle: {k} (listed in {MANIFEST})")
                    raise UsageError(f"artifact {k} does not match its manifest hash (sha256 {on_disk[k][:12]}…, "
                                     f"manifest {v[:12]}…); it was modified or damaged, refusing to load it")
        else:
            self.check_file(rel, "artifact")
        return self.dir.fd_path(rel)

    def artifact_bytes(self, entry: dict) -> bytes:
        return self.read(entry["path"], MAX_ARTIFACT_BYTES, "artifact")

    def artifact_bytes_hashing_aside(self, entry: dict):
        """``artifact_bytes`` as ``(data, confirm)`` (``read_hashing_aside``)."""
        return self.read_hashing_aside(entry["path"], MAX_ARTIFACT_BYTES, "artifact")

    def check_all(self, strict_tree: bool = False) -> None:
        """Every artifact, the tokenizer and the test split against their hashes.
        ``strict_tree``: also refuse any file the manifest does not list (links, FIFOs and
        devices anywhere are refused while walking)."""
        for a in self.manifest["artifacts"]:
            self.check_entry(a)
        self.check_file(self.manifest["tokenizer"]["path"], "tokenizer")
        if self.manifest.get("test_data"):
            self.check_file(self.manifest["test_data"], "test data")
        files = self.manifest.get("files") or {}
        for key in PLAIN_FILES:
            if key in files:
                self.check_file(files[key]["path"], PLAIN_FILES[key])
        for f in (files.get("c_array") or {}).get("files", []):
            self.check_file(f["path"], "C source")
        if strict_tree:
            on_disk = self.dir.hash_tree("", skip=OWN_ENTRIES)
            extra = sorted(set(on_disk) - set(self.contents))
            if extra:
                raise UsageError(f"bundle holds {extra[0]}, which the manifest's contents do not list; a bundle holds "
                                 "only what its manifest hashes")
            for k, v in self.contents.items():
                if on_disk.get(k) != v:
                    raise UsageError(f"{k} does not match its manifest hash; it was modified or damaged")

    def tokenizer(self, notes: list | None = None):
        """The bundle's tokenizer, hash-checked, with padding off and truncation at the
        manifest's ``max_length`` (``tokenizer_guard``)."""
        from probattn.models.text.tokenizer import tokenizer_from_spec

        return tokenizer_from_spec(self.tokenizer_spec(notes))

    def tokenizer_spec(self, notes: list | None = None) -> dict:
        """``tokenizer()`` as the sanitized spec dict (no ``tokenizers`` import)."""
        from probattn.models.text.tokenizer import load_tokenizer_spec

        data = self.read(self.manifest["tokenizer"]["path"], MAX_TOKENIZER_BYTES, "tokenizer")
        return load_tokenizer_spec(data, max_length=self.manifest["max_length"],
                                   vocab_size=self.manifest["vocab_size"], notes=notes)

    def plain_lines(self, key: str) -> list | None:
        """The lines of ``labels.txt`` / ``vocab.txt`` (``files.labels`` / ``files.vocabulary``),
        hash-checked; None when the bundle has none."""
        f = (self.manifest.get("files") or {}).get(key)
        if f is None:
            return None
        data = self.read(f["path"], MAX_TOKENIZER_BYTES, key)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{f['path']} is not valid UTF-8") from None
        if not text.endswith("\n") or "\r" in text:
            raise UsageError(f"{f['path']} must hold one entry per line, each ended by \\n")
        return text[:-1].split("\n")

    def check_plain_files(self, tokenizer) -> None:
        """``labels.txt`` must list the manifest's labels and ``vocab.txt`` the tokenizer's
        tokens, in order (raw clients read these, not the manifest); the C sources are
        hash-checked (they are never run here). ``tokenizer``: a ``tokenizers.Tokenizer`` or
        its sanitized spec dict."""
        from probattn.models.text.tokenizer import vocabulary

        for key, want, what in (("labels", lambda: list(self.manifest["labels"]), "the manifest's labels"),
                                ("vocabulary", lambda: vocabulary(tokenizer), "tokenizer.json's vocabulary")):
            got = self.plain_lines(key)
            if got is not None and got != want():
                w = want()
                first = next((i for i, (a, b) in enumerate(zip(got, w)) if a != b), min(len(got), len(w)))
                raise UsageError(f"{PLAIN_FILES[key]} differs from {what} at line {first + 1} ({len(got):,} lines, "
                                 f"expected {len(w):,}); refusing the bundle")
        for f in ((self.manifest.get("files") or {}).get("c_array") or {}).get("files", []):
            self.check_file(f["path"], "C source")

    def audit_artifact(self, entry: dict, content: bytes, tokenizer=None) -> None:
        """The byte-level audit of a TFLite-family file (``audit.tflite``): I/O, ops, sizes,
        and a mediapipe file's metadata against labels and the vocabulary."""
        if entry["format"] not in C.TFLITE_FORMATS:
            return
        from probattn.models.text.tokenizer import vocabulary

        from .audit import tflite as tflite_audit

        vocab = None
        if entry["format"] == "mediapipe":  # only a mediapipe file carries a vocabulary to compare
            vocab = self.plain_lines("vocabulary")
            if vocab is None and tokenizer is not None:
                vocab = vocabulary(tokenizer)
        tflite_audit.audit(content, entry, labels=self.manifest["labels"], vocabulary=vocab)

    def test_data_bytes(self) -> bytes | None:
        name = self.manifest.get("test_data")
        return None if not name else self.read(name, MAX_TEST_DATA_BYTES, "test data")


def write_manifest(bundle, manifest: dict, dir_fd: int | None = None) -> None:
    """Write ``manifest.json`` (through ``dir_fd`` when given: no link followed)."""
    import os

    data = json.dumps(manifest, indent=1)
    if dir_fd is not None:
        write_file_at(dir_fd, MANIFEST, data)
        return
    fd = os.open(bundle, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        write_file_at(fd, MANIFEST, data)
    finally:
        os.close(fd)


def find_artifact(manifest: dict, fmt: str, precision: str = "fp32", output_dtype: str = C.OUTPUT_DTYPE,
                  input_dtype: str = C.INPUT_DTYPE) -> dict | None:
    """The entry of ``fmt`` / ``precision`` / ``output_dtype`` / ``input_dtype`` (entries are
    unique on these four: the dynamic ``tflite`` and fixed-shape ``tflite-fixed`` files never
    mix, and an int64-input ONNX twin is found only when asked for)."""
    for a in manifest["artifacts"]:
        if C.artifact_key(a) == (fmt, precision, output_dtype, input_dtype):
            return a
    return None


def inside(bundle, rel) -> Path:
    """``bundle / rel`` after checking that ``rel`` is a plain relative path (no absolute
    path, no ``..``) and that no component of it inside the bundle is a symbolic link."""
    safe_relpath(rel, "manifest path")
    with LockedDirectory(bundle, "bundle", wait=0) as d:
        st = d.lstat(rel)
    import stat as _stat

    if st is not None and _stat.S_ISLNK(st.st_mode):
        raise UsageError(f"manifest path '{rel}' is a symbolic link; refusing it")
    return Path(bundle) / rel


def verified_path(bundle, entry: dict) -> Path:
    """The artifact's path after checking it exists, stays inside the bundle (no link
    anywhere on the way) and matches its manifest hash."""
    safe_relpath(entry.get("path"), "manifest path")
    with LockedDirectory(bundle, "bundle") as d:
        rel = entry["path"]
        st = d.lstat(rel)
        if st is None:
            raise UsageError(f"artifact missing from bundle: {rel} (listed in {MANIFEST})")
        import stat as _stat

        if _stat.S_ISDIR(st.st_mode):
            digest = tree_digest({k[len(rel) + 1:]: v for k, v in d.hash_tree(rel).items()})
        else:
            digest = d.sha256(rel, "artifact")
    if digest != entry.get("sha256"):
        raise UsageError(f"artifact {rel} does not match its manifest hash (sha256 {digest[:12]}…, manifest "
                         f"{str(entry.get('sha256'))[:12]}…); it was modified or damaged, refusing to load it")
    return Path(bundle) / rel

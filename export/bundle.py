"""Bundle manifest: what is in a bundle, with hashes, versions and the signature (TF-free)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from probattn.models.errors import UsageError
from probattn.models.fsutil import sha256_path  # noqa: F401  (re-exported: bundles are hashed with it)

from .contract import FORMATS, OUTPUT_DTYPES, PRECISIONS, SUPPORTED, artifact_key

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def size_of(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def load_manifest(bundle) -> dict:
    bundle = Path(bundle)
    if not bundle.exists():
        raise UsageError(f"bundle not found: {bundle}")
    if not bundle.is_dir():
        raise UsageError(f"expected a bundle directory (from 'probattn export'), received a file: {bundle}")
    path = bundle / MANIFEST
    if not path.is_file():
        raise UsageError(f"{bundle} is not a bundle: no {MANIFEST} (make one with 'probattn export')")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise UsageError(f"{path}: expected a JSON object, received {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise UsageError(f"{path}: missing or non-integer schema_version ({version!r})")
    if version > SCHEMA_VERSION:
        raise UsageError(f"{path} has schema_version {version}; this probattn reads up to "
                         f"{SCHEMA_VERSION} (upgrade probattn)")
    for key in ("artifacts", "signature", "labels", "vocab_size", "tokenizer"):
        if key not in manifest:
            raise UsageError(f"{path}: missing field '{key}'")
    tok = manifest["tokenizer"]
    if not isinstance(tok, dict) or not isinstance(tok.get("path"), str):
        raise UsageError(f"{path}: field 'tokenizer' must be an object with a 'path'")
    labels = manifest["labels"]
    if not isinstance(labels, list) or len(labels) < 2 or len(set(map(str, labels))) != len(labels):
        raise UsageError(f"{path}: 'labels' must be a list of at least 2 distinct names; found {labels!r}")
    if not isinstance(manifest["vocab_size"], int) or manifest["vocab_size"] < 3:
        raise UsageError(f"{path}: 'vocab_size' must be an integer >= 3; found {manifest['vocab_size']!r}")
    if not isinstance(manifest["artifacts"], list):
        raise UsageError(f"{path}: 'artifacts' must be a list")
    for i, a in enumerate(manifest["artifacts"]):
        if not isinstance(a, dict) or not all(isinstance(a.get(k), str) for k in ("path", "format", "precision", "sha256")):
            raise UsageError(f"{path}: artifact #{i} needs string fields path, format, precision and sha256")
        if a["format"] not in FORMATS or a["precision"] not in SUPPORTED[a["format"]]:
            raise UsageError(f"{path}: artifact {a['path']} has format '{a['format']}' / precision "
                             f"'{a['precision']}'; allowed formats {', '.join(FORMATS)}, precisions {', '.join(PRECISIONS)}")
        if a.get("output_dtype", "float32") not in OUTPUT_DTYPES:
            raise UsageError(f"{path}: artifact {a['path']} has output_dtype {a.get('output_dtype')!r}; "
                             f"allowed: {', '.join(OUTPUT_DTYPES)}")
    keys = [artifact_key(a) for a in manifest["artifacts"]]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise UsageError(f"{path}: more than one artifact is {' / '.join(dupes[0])}; entries must be unique")
    return manifest


def write_manifest(bundle, manifest: dict) -> None:
    path = Path(bundle) / MANIFEST
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=1))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def find_artifact(manifest: dict, fmt: str, precision: str = "fp32", output_dtype: str = "float32") -> dict | None:
    """The entry of ``fmt`` / ``precision`` / ``output_dtype`` (entries are unique on these
    three: the dynamic ``tflite`` and fixed-shape ``tflite-fixed`` files never mix)."""
    for a in manifest["artifacts"]:
        if artifact_key(a) == (fmt, precision, output_dtype):
            return a
    return None


def inside(bundle, rel) -> Path:
    """``bundle / rel`` after checking that ``rel`` is a relative path that stays inside the
    bundle (no absolute path, no ``..``, no symlink out of it)."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise UsageError(f"manifest path {rel!r} is not a file name inside the bundle; refusing it")
    root = Path(bundle).resolve()
    path = (root / rel).resolve()
    if Path(rel).is_absolute() or root not in path.parents:
        raise UsageError(f"manifest path '{rel}' points outside the bundle; refusing it")
    return path


def verified_path(bundle, entry: dict) -> Path:
    """The artifact's path after checking it exists, stays inside the bundle and matches
    its manifest hash. Refuses anything else with a UsageError."""
    bundle = Path(bundle).resolve()
    path = (bundle / entry["path"]).resolve()
    if bundle not in path.parents:
        raise UsageError(f"manifest path '{entry['path']}' points outside the bundle; refusing it")
    if not path.exists():
        raise UsageError(f"artifact missing from bundle: {entry['path']} (listed in {MANIFEST})")
    digest = sha256_path(path)
    if digest != entry.get("sha256"):
        raise UsageError(f"artifact {entry['path']} does not match its manifest hash "
                         f"(sha256 {digest[:12]}…, manifest {str(entry.get('sha256'))[:12]}…); "
                         "it was modified or damaged, refusing to load it")
    return path

"""The Node.js client (clients/node) on the session bundle: tokenizers.js and transformers.js
give the ids Python gives, and onnxruntime-node the probabilities Python's onnxruntime gives
(within the fp32 bound), through the int32 model and the int64 twin.

The packages come from the npm registry with ``npm ci`` (the committed package-lock.json,
``--ignore-scripts`` and ``ONNXRUNTIME_NODE_INSTALL=skip``: nothing is downloaded beyond
the registry) into ``$PROBATTN_CACHE_DIR/node-client/<hash of the lock file>``, installed
once and reused. Skipped only when node or npm is not installed."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from probattn.export.parity.tolerances import FP32_MAX_ABS
from tokenizer_battery import BATTERY

REPO = Path(__file__).resolve().parents[1]
CLIENT = REPO / "clients" / "node"
MIN_NODE = 20


def _tail(text, n=8):
    return " | ".join(l for l in (text or "").strip().splitlines()[-n:])


def _install(npm) -> Path:
    """node_modules for the committed lock file, from the cache or a fresh ``npm ci``."""
    from probattn.models.text.data import cache_dir

    lock = (CLIENT / "package.json").read_bytes() + (CLIENT / "package-lock.json").read_bytes()
    target = cache_dir() / "node-client" / hashlib.sha256(lock).hexdigest()[:16]
    if (target / ".installed").is_file():
        return target / "node_modules"
    work = target.parent / f".{target.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(CLIENT / name, work / name)
    env = dict(os.environ, ONNXRUNTIME_NODE_INSTALL="skip", npm_config_update_notifier="false")
    proc = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        pytest.fail(f"npm ci of clients/node failed (exit {proc.returncode}): {_tail(proc.stderr)}")
    (work / ".installed").write_text("ok\n")
    try:
        os.rename(work, target)
    except OSError:  # another session installed it meanwhile
        shutil.rmtree(work, ignore_errors=True)
    return target / "node_modules"


@pytest.fixture(scope="session")
def node_client(tmp_path_factory):
    """A folder with the client's scripts and the installed node_modules; returns (node, folder)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("Node.js and npm are not installed: the Node client test needs node >= 20 and npm")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    major = int(version.lstrip("v").split(".")[0]) if version.startswith("v") else 0
    if major < MIN_NODE:
        pytest.fail(f"the Node client needs Node.js >= {MIN_NODE}; {node} is {version or 'unknown'}")
    modules = _install(npm)
    work = tmp_path_factory.mktemp("node-client")
    for f in list(CLIENT.glob("*.mjs")) + [CLIENT / "package.json"]:
        shutil.copyfile(f, work / f.name)
    (work / "node_modules").symlink_to(modules, target_is_directory=True)
    return node, work


def _node(node_client, *args, timeout=300):
    node, work = node_client
    return subprocess.run([node, *map(str, args)], cwd=work, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def parity(node_client, bundle_dir, tmp_path_factory):
    """Held-out texts plus hard inputs through parity.mjs; returns (texts, report)."""
    texts = [json.loads(l)["text"] for l in (bundle_dir / "test.jsonl").read_text().splitlines()]
    texts += BATTERY
    tmp = tmp_path_factory.mktemp("node-parity")
    (tmp / "texts.json").write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    proc = _node(node_client, "parity.mjs", bundle_dir, tmp / "texts.json", tmp / "out.json")
    assert proc.returncode == 0, f"parity.mjs failed: {_tail(proc.stderr)}"
    return texts, json.loads((tmp / "out.json").read_text())


@pytest.fixture(scope="module")
def python_side(bundle_dir, parity):
    from probattn.export.predict import Predictor
    from probattn.models.text.tokenizer import encode

    texts, _ = parity
    p = Predictor(bundle_dir, runtime="onnxruntime", precision="fp32")
    ids = p.encode(texts)
    np.testing.assert_array_equal(ids, encode(p.tokenizer, texts, p.max_length))  # fast path == tokenizers
    rows = [list(map(int, r[r != 0])) if r.any() else [] for r in ids]
    # a pad (0) can only be padding: the tokenizer never emits id 0 for a text
    lengths = [len(p.tokenizer.encode(t).ids[: p.max_length]) for t in texts]
    assert [len(r) for r in rows] == lengths
    return p, ids, rows


def test_node_ids_equal_python(parity, python_side):
    texts, report = parity
    _, _, rows = python_side
    assert report["max_length"] == python_side[0].max_length
    for lib in ("tokenizers_js_ids", "transformers_js_ids"):
        bad = [i for i, (a, b) in enumerate(zip(rows, report[lib])) if a != b]
        assert len(report[lib]) == len(texts) and not bad, (
            f"{lib}: {len(bad)} of {len(texts)} texts differ; first {texts[bad[0]][:60]!r}: "
            f"Python {rows[bad[0]][:10]} vs Node {report[lib][bad[0]][:10]}")
        print(f"{lib}: the same ids as Python for all {len(texts)} texts ({sum(map(len, rows))} tokens)")


def test_node_probabilities_equal_python(parity, python_side):
    """Same ids, same batch ([texts, longest]): onnxruntime-node vs Python onnxruntime within
    the fp32 parity bound (1e-5, the bound every fp32 artifact meets against Keras)."""
    texts, report = parity
    p, ids, _ = python_side
    assert report["dims"] == list(ids.shape) and report["transformers_js_batch"]["dims"] == list(ids.shape)
    assert report["transformers_js_batch"]["dtype"] == "int64"  # why the int64 twin exists
    want = p.predict_ids(ids)
    for key in ("probabilities_int32", "probabilities_int64_twin", "probabilities_int64_converted"):
        got = np.asarray(report[key], np.float32).reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=0, atol=FP32_MAX_ABS, err_msg=f"Node {key} vs Python")
        print(f"{key}: max |Node - Python| = {float(np.abs(got - want).max()):g} over {want.shape} "
              f"(onnxruntime-node {report['versions']['onnxruntime']})")
    # int64 ids into the int32 file fail loudly, never silently
    assert "int64" in report["int64_into_int32_model"] and "int32" in report["int64_into_int32_model"]


def test_node_classify_cli(node_client, bundle_dir):
    from probattn.export.predict import Predictor

    texts = ["A gorgeous, funny, heartfelt film.", "naïve, clichéd and dull"]
    proc = _node(node_client, "classify.mjs", bundle_dir, *texts)
    assert proc.returncode == 0, _tail(proc.stderr)
    rows = [json.loads(l) for l in proc.stdout.splitlines()]
    want = Predictor(bundle_dir).probabilities(texts)
    assert [r["text"] for r in rows] == texts
    for r, w in zip(rows, want):
        np.testing.assert_allclose(list(r["probabilities"].values()), w, rtol=0, atol=FP32_MAX_ABS)


def test_node_client_refuses_tampered_and_old_bundles(node_client, bundle_dir, tmp_path):
    from probattn.export import bundle as B

    bad = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bad)
    (bad / "tokenizer_config.json").write_text("{}")
    proc = _node(node_client, "classify.mjs", bad, "text")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "probattn-classify: error: tokenizer_config.json does not match its manifest hash (it was modified or damaged)"]
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["tokenizer"] = {"path": "tokenizer.json", "sha256": manifest["tokenizer"]["sha256"]}  # an older bundle
    B.write_manifest(bad, manifest)
    proc = _node(node_client, "classify.mjs", bad, "text")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "kind 'unknown (an older bundle)'" in proc.stderr and "portable" in proc.stderr, proc.stderr

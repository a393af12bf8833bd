"""Every Unicode code point through a bundle's portable tokenizer: Hugging Face tokenizers
(Rust) vs probattn's pure-Python fast path, and with --node vs tokenizers.js too.

usage: python scripts/tokenizer_codepoints.py BUNDLE [--node] [--stride N]

Each code point is put in five positions (``a{c}b {c}. {c}{c}``) and the normalized,
pre-tokenized strings are compared (so a difference shows even where the vocabulary would
map both sides to [UNK]). ``--stride N`` checks a sample (every N-th code point and every
place where the General_Category changes, as tests/test_tokenizer.py does) instead of all
1,112,064. ``--node`` needs clients/node installed: ``npm ci --ignore-scripts`` in
clients/node, or the cache tests/test_node_client.py fills. Exit 1 on any difference.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from tokenizer_battery import code_points, pre_tokenized  # noqa: E402

CHUNK = 2048


def node_modules() -> Path | None:
    client = REPO / "clients" / "node"
    if (client / "node_modules").is_dir():
        return client / "node_modules"
    from probattn.models.text.data import cache_dir

    lock = (client / "package.json").read_bytes() + (client / "package-lock.json").read_bytes()
    cached = cache_dir() / "node-client" / hashlib.sha256(lock).hexdigest()[:16] / "node_modules"
    return cached if cached.is_dir() else None


def run_node(bundle: Path, strings: list) -> list:
    modules = node_modules()
    if modules is None or not shutil.which("node"):
        sys.exit("--node: no node, or clients/node is not installed (npm ci --ignore-scripts in clients/node)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for f in (REPO / "clients" / "node").glob("*.mjs"):
            shutil.copyfile(f, tmp / f.name)
        shutil.copyfile(REPO / "clients" / "node" / "package.json", tmp / "package.json")
        (tmp / "node_modules").symlink_to(modules, target_is_directory=True)
        (tmp / "in.json").write_text(json.dumps(strings), encoding="utf-8")
        subprocess.run(["node", "codepoints.mjs", str(bundle.resolve()), "in.json", "out.json"], cwd=tmp, check=True)
        return json.loads((tmp / "out.json").read_text(encoding="utf-8"))


def main(argv=None) -> int:
    from probattn.export import bundle as B
    from probattn.models.text.fast import FastTokenizer
    from probattn.models.text.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--node", action="store_true", help="compare tokenizers.js too")
    ap.add_argument("--stride", type=int, default=0, help="check a sample: every N-th code point (0: all)")
    a = ap.parse_args(argv)
    manifest = B.load_manifest(a.bundle)
    path = B.verified_path(a.bundle, manifest["tokenizer"])
    tok = load_tokenizer(path)
    fast = FastTokenizer.from_file(path)
    cps = code_points(a.stride)
    print(f"{len(cps):,} code points, chunks of {CHUNK}")
    norm, pre = tok.normalizer, tok.pre_tokenizer
    t = time.perf_counter()
    want = pre_tokenized(lambda s: [p for p, _ in pre.pre_tokenize_str(norm.normalize_str(s))], cps, CHUNK)
    print(f"tokenizers (Rust): {time.perf_counter() - t:.1f} s")
    engines = {}
    t = time.perf_counter()
    engines["fast path"] = pre_tokenized(lambda s: fast.pre_tokenize(fast.normalize(s)), cps, CHUNK)
    print(f"fast path (Python): {time.perf_counter() - t:.1f} s")
    if a.node:
        strings = []
        pre_tokenized(lambda s: strings.append(s) or [], cps, CHUNK)
        t = time.perf_counter()
        engines["tokenizers.js"] = run_node(a.bundle, strings)
        print(f"tokenizers.js (node): {time.perf_counter() - t:.1f} s")
    failed = False
    for name, got in engines.items():
        bad = [i for i, (x, y) in enumerate(zip(want, got)) if x != y]
        if bad or len(got) != len(want):
            failed = True
            i = bad[0] if bad else 0
            first = cps[i * CHUNK]
            print(f"{name}: {len(bad)} of {len(want)} chunks differ from tokenizers; first chunk from U+{first:04X}")
        else:
            print(f"{name}: identical to tokenizers on all {len(cps):,} code points")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

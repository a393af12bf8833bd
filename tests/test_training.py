"""Training: the RUN_DIR contents, accuracy on real data, determinism, atomic output."""
from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from probattn.models.errors import UsageError
from probattn.models.fsutil import OUTPUT_MARKER, TMP_PREFIX, atomic_directory
from probattn.models.metrics import classification_report
from probattn.models.text.tokenizer import encode_fixed, load_tokenizer
from probattn.models.train import CALIBRATION_MAX_TEXTS as CALIBRATION_TEXTS
from probattn.models.train import TrainConfig, train

RUN_FILES = ["model.keras", "tokenizer.json", "labels.json", "metrics.json", "config.json",
             "test.jsonl", "calibration.jsonl"]


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _leftovers(parent, name):
    """Temporary directories of an atomic write of ``parent/name`` (the lock file is allowed)."""
    return sorted(p.name for p in parent.iterdir()
                  if p.name.startswith(TMP_PREFIX) and p.name != f"{TMP_PREFIX}{name}.lock")


# ------------------------------------------------------------ the real run (session)

def test_run_dir_has_every_file(run_dir):
    missing = [f for f in RUN_FILES if not (run_dir / f).is_file()]
    assert not missing, f"RUN_DIR lacks {missing}"
    assert not _leftovers(run_dir.parent, run_dir.name), "temporary directories left behind"


def test_run_metrics_structure(run_metrics, run_dir):
    test = run_metrics["test"]
    labels = json.loads((run_dir / "labels.json").read_text())
    assert labels == ["fresh", "rotten"]
    assert set(test) >= {"accuracy", "macro_f1", "per_class", "n"}
    assert sorted(test["per_class"]) == labels
    for name, row in test["per_class"].items():
        assert set(row) == {"precision", "recall", "f1", "support"}, name
        assert 0.0 <= row["f1"] <= 1.0 and row["support"] > 0, (name, row)
    sizes = run_metrics["sizes"]
    assert sum(r["support"] for r in test["per_class"].values()) == test["n"] == sizes["test"]
    assert sizes["train"] + sizes["validation"] + sizes["test"] == 12_808
    assert 1 <= run_metrics["epochs_run"] <= 2
    assert len(run_metrics["validation_accuracy"]) == run_metrics["epochs_run"]
    assert run_metrics["dataset"] == "rotten_tomatoes"


def test_run_accuracy_meets_the_bar(run_metrics):
    """The issue's bar on real data: >= 0.75 test accuracy on Rotten Tomatoes."""
    acc, f1 = run_metrics["test"]["accuracy"], run_metrics["test"]["macro_f1"]
    assert acc >= 0.75, f"test accuracy {acc} < 0.75"
    assert f1 >= 0.70, f"macro F1 {f1} < 0.70 (one class ignored?)"


def test_run_config_and_jsonl_files(run_dir, run_metrics):
    config = json.loads((run_dir / "config.json").read_text())
    expected = asdict(TrainConfig(epochs=2, seed=0))
    expected["max_length"] = 64  # resolved: the Rotten Tomatoes default
    for key, value in expected.items():
        assert config[key] == value, f"config.json {key}={config[key]!r}, expected {value!r}"
    assert config["vocab_size_actual"] == run_metrics["vocab_size"] <= 20_000

    test = _jsonl(run_dir / "test.jsonl")
    assert len(test) == run_metrics["sizes"]["test"]
    assert all(set(r) == {"text", "label"} and r["label"] in ("fresh", "rotten") for r in test)
    calibration = _jsonl(run_dir / "calibration.jsonl")
    assert len(calibration) == min(CALIBRATION_TEXTS, run_metrics["sizes"]["train"])
    test_texts = {r["text"] for r in test}
    overlap = sum(r["text"] in test_texts for r in calibration)
    assert overlap <= 2, f"{overlap} calibration texts are test texts (training split leaked?)"


def test_saved_run_reproduces_its_metrics(run_dir, run_metrics):
    """model.keras + tokenizer.json + test.jsonl give back exactly the reported test metrics."""
    from probattn.export.loading import load_keras_model

    labels = json.loads((run_dir / "labels.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    tok = load_tokenizer(run_dir / "tokenizer.json")
    rows = _jsonl(run_dir / "test.jsonl")
    ids = encode_fixed(tok, [r["text"] for r in rows], config["max_length"])
    y = np.array([labels.index(r["label"]) for r in rows])
    model = load_keras_model(run_dir / "model.keras")  # with the Keras that wrote it
    probs = model.predict(ids, batch_size=256, verbose=0)
    report = classification_report(y, probs.argmax(-1), labels)
    assert report == run_metrics["test"], "the saved run does not reproduce metrics.json"


# ------------------------------------------------------------------- tiny runs

POS = "good great excellent wonderful superb delightful brilliant lovely".split()
NEG = "bad awful terrible dreadful boring dull horrible poor".split()
NEUTRAL = "the a film movie plot acting story it was and".split()


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    """200 rows, two clearly separable classes (each text uses its class's words)."""
    rng = np.random.default_rng(0)
    lines = ["text,label"]
    for i in range(200):
        label = "pos" if i % 2 == 0 else "neg"
        words = list(rng.choice(POS if label == "pos" else NEG, rng.integers(2, 5)))
        words += list(rng.choice(NEUTRAL, rng.integers(1, 6)))
        rng.shuffle(words)
        lines.append(f"{' '.join(words)},{label}")
    path = tmp_path_factory.mktemp("tiny") / "tiny.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_config(csv_path, seed=0):
    return TrainConfig(dataset=str(csv_path), limit=0, epochs=1, vocab_size=200, max_length=16,
                       embedding_dim=8, hidden_units=8, batch_size=16, seed=seed)


@pytest.fixture(scope="module")
def tiny_runs(tiny_csv, tmp_path_factory):
    """Two runs with seed 0 and one with seed 1, on the same CSV."""
    root = tmp_path_factory.mktemp("tiny_runs")
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = root / name
        metrics = train(tiny_config(tiny_csv, seed), out, verbose=0)
        runs[name] = (out, metrics)
    return runs


def _predict(run, ids):
    from probattn.export.loading import load_keras_model

    return load_keras_model(run / "model.keras").predict(ids, verbose=0)


def _probe_ids(run):
    tok = load_tokenizer(run / "tokenizer.json")
    texts = [r["text"] for r in _jsonl(run / "test.jsonl")] + ["good film", "dull plot", ""]
    return encode_fixed(tok, texts, 16)


def test_same_seed_gives_identical_metrics(tiny_runs):
    (_, ma), (_, mb) = tiny_runs["a"], tiny_runs["b"]
    ma, mb = dict(ma), dict(mb)
    ma.pop("train_seconds"), mb.pop("train_seconds")
    assert ma == mb, "two runs with seed 0 reported different metrics"


def test_same_seed_gives_identical_files_and_predictions(tiny_runs):
    (a, _), (b, _) = tiny_runs["a"], tiny_runs["b"]
    for name in ("tokenizer.json", "labels.json", "test.jsonl", "calibration.jsonl", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between runs"
    ids = _probe_ids(a)
    np.testing.assert_array_equal(_predict(a, ids), _predict(b, ids),
                                  err_msg="two runs with seed 0 predict differently")


def test_different_seed_gives_a_different_model(tiny_runs):
    """The determinism check can fail: seed 1 changes the split and the weights."""
    (a, _), (c, _) = tiny_runs["a"], tiny_runs["c"]
    assert (a / "test.jsonl").read_bytes() != (c / "test.jsonl").read_bytes()
    ids = _probe_ids(a)
    pa, pc = _predict(a, ids), _predict(c, ids)
    assert np.max(np.abs(pa - pc)) > 1e-4, "seed 1 gave the same predictions as seed 0"


def test_tiny_run_writes_every_file(tiny_runs):
    out, metrics = tiny_runs["a"]
    from probattn.models.text.tokenizer import TOKENIZER_CONFIG_FILE

    # the default (portable) tokenizer also writes the config JavaScript clients read
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES + [OUTPUT_MARKER, TOKENIZER_CONFIG_FILE])
    assert json.loads((out / "labels.json").read_text()) == ["neg", "pos"]
    assert metrics["sizes"] == {"train": 150, "validation": 20, "test": 30}


# --------------------------------------------------------------- atomic RUN_DIR

def test_interrupted_training_leaves_no_run_dir(tiny_csv, tmp_path, monkeypatch):
    """Ctrl-C while RUN_DIR is being written (model.keras already saved in the temp dir)."""
    import probattn.models.train as train_mod

    seen = []

    def interrupt(path, texts, labels):
        seen.append(sorted(p.name for p in path.parent.iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_write_jsonl", interrupt)
    out = tmp_path / "runs" / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_csv), out, verbose=0)
    assert seen and "model.keras" in seen[0], "the interrupt did not happen mid-write"
    assert not out.exists(), "an interrupted run left RUN_DIR behind"
    assert _leftovers(out.parent, out.name) == [], "temporary directory left behind"
    assert sorted(p.name for p in out.parent.iterdir()) == [f"{TMP_PREFIX}run.lock"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError], ids=["ctrl-c", "exception"])
def test_interrupted_overwrite_keeps_the_old_dir(tmp_path, error):
    target = tmp_path / "run"
    with atomic_directory(target) as tmp:  # an earlier run (it carries the output marker)
        (tmp / "old.txt").write_text("previous run")
    with pytest.raises(error):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "model.keras").write_text("half written")
            assert tmp.parent == tmp_path and tmp.name.startswith(f"{TMP_PREFIX}run-")
            raise error()
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "old.txt"], "old RUN_DIR was touched"
    assert _leftovers(tmp_path, "run") == []


def test_atomic_directory_replaces_and_cleans_stale_temp(tmp_path):
    target = tmp_path / "run"
    stale = tmp_path / f"{TMP_PREFIX}run-k1lled_x"  # mkdtemp-style, as left by a SIGKILLed run
    stale.mkdir()
    (stale / "model.keras").write_text("partial")
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "a.txt"]
    assert _leftovers(tmp_path, "run") == [], "stale temporary directory not removed"
    with pytest.raises(UsageError, match="--overwrite"):
        with atomic_directory(target):
            pass
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("newer")
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "b.txt"]
    assert _leftovers(tmp_path, "run") == []


# ------------------------------------------------------------------ bad settings

@pytest.mark.parametrize("field,value,needle", [
    ("epochs", 0, "--epochs must be a positive integer; received 0"),
    ("max_length", -3, "--max-length must be a positive integer; received -3"),
    ("vocab_size", 2, "--vocab-size must be at least 3; received 2"),
    ("dropout", 1.0, "--dropout must be in [0, 1); received 1.0"),
    ("learning_rate", 0.0, "--learning-rate must be positive; received 0.0"),
    ("limit", -1, "--limit must be >= 0; received -1"),
], ids=["epochs=0", "max_length=-3", "vocab_size=2", "dropout=1.0", "learning_rate=0",
        "limit=-1"])
def test_bad_train_config_raises_usage_error(tmp_path, field, value, needle):
    out = tmp_path / "run"
    with pytest.raises(UsageError) as err:
        train(TrainConfig(**{field: value}), out, verbose=0)
    assert needle in str(err.value), str(err.value)
    assert not out.exists()


def test_limit_draws_every_class_of_a_sorted_dataset():
    """Bundled datasets are stored sorted by class: --limit must not keep only the first."""
    from probattn.models.text.data import TextDataset, subsample

    data = TextDataset("sorted", [f"t{i}" for i in range(100)], ["a"] * 70 + ["b"] * 20 + ["c"] * 10)
    small = subsample(data, 10, seed=0)
    assert len(small.texts) == 10
    assert {l: small.labels.count(l) for l in "abc"} == {"a": 7, "b": 2, "c": 1}
    assert subsample(data, 10, seed=0) == small and subsample(data, 10, seed=1) != small
    assert all(t in data.texts for t in small.texts)

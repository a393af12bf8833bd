"""Shared, session-scoped artifacts: one small real training run and one full bundle.

Everything expensive (dataset download, training, export, verify) happens once per
test session, also when pytest-xdist runs the suite in several worker processes: the
first worker to need an artifact builds it in the session's shared temporary folder under
a file lock, the others wait for it and reuse it (``shared``). Tests never modify these
artifacts (a test that tampers copies first). Tests that need their own model build a
tiny one in-process.
"""
from __future__ import annotations

import fcntl
import os
import pickle
from pathlib import Path

import pytest

from helpers import run_cli

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]


def shared(tmp_path_factory, name: str, build):
    """``build(folder)`` once per test session across xdist workers; returns its result
    (pickled beside the folder). Without xdist the base folder is the session's own."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the folder every worker of this session shares
    folder = base / f"shared-{name}"
    done = base / f"shared-{name}.pickle"
    with open(base / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            folder.mkdir(exist_ok=True)
            result = build(folder)
            done.write_bytes(pickle.dumps(result))
        return pickle.loads(done.read_bytes())


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A real run: Rotten Tomatoes, 2 epochs, the default architecture."""
    def build(folder):
        from probattn.models.train import TrainConfig, train

        out = folder / "run"
        train(TrainConfig(epochs=2, seed=0), out, verbose=0)
        assert (out / "model.keras").is_file()
        return out

    return shared(tmp_path_factory, "run", build)


@pytest.fixture(scope="session")
def run_metrics(run_dir):
    import json

    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="session")
def bundle_dir(run_dir, tmp_path_factory):
    """Every format and precision exported from ``run_dir``."""
    def build(folder):
        from probattn.export.exporter import export

        out = folder / "bundle"
        export(run_dir, out)
        return out

    return shared(tmp_path_factory, "bundle", build)


@pytest.fixture(scope="session")
def manifest(bundle_dir):
    import json

    return json.loads((bundle_dir / "manifest.json").read_text())


@pytest.fixture(scope="session")
def parity_report(bundle_dir, tmp_path_factory):
    def build(folder):
        from probattn.export.parity import verify

        return verify(bundle_dir, report_dir=folder / "report", quiet=True)

    return shared(tmp_path_factory, "report", build)


@pytest.fixture(scope="session")
def cli():
    return run_cli


def tiny_classifier(vocab_size=50, num_classes=3, embedding_dim=8, seed=0, masking_layer=False, flavour=None):
    """A small untrained classifier, deterministic for a seed (weights drawn, not trained), in
    Keras flavour ``flavour`` ("3" Keras 3, "2" tf_keras; default: probattn's default)."""
    from probattn.models import build_classifier
    from probattn.models.keras_compat import get_keras
    from probattn.models.layers import layer_classes

    keras = get_keras(flavour)
    ProbAttention = layer_classes(flavour).ProbAttention
    keras.utils.set_random_seed(seed)
    if not masking_layer:
        model = build_classifier(vocab_size, num_classes, embedding_dim, hidden_units=16, flavour=flavour)
    else:  # the seed page's way: Masking() recomputes the mask and turns it off
        inputs = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        x = keras.layers.Embedding(vocab_size, embedding_dim, mask_zero=True)(inputs)
        x = keras.layers.Masking()(x)
        x = ProbAttention()(x)
        x = keras.layers.Dense(16, activation="relu")(x)
        outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
        model = keras.Model(inputs, outputs)
    # spread the scoring kernel so attention is far from uniform (untrained 'uniform' is tiny)
    att = [l for l in model.layers if isinstance(l, ProbAttention)][0]
    rng = __import__("numpy").random.default_rng(seed)
    att.kernel.assign(rng.normal(0, 2.0, att.kernel.shape).astype("float32"))
    return model

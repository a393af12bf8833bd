"""``probattn predict --engine ray``: Ray Data over an actor pool gives the single-process
output exactly (both run the batches of ``batch_plan``), in input order: on a local
cluster predict starts itself, and on a cluster RAY_ADDRESS names. Each starts a Ray
cluster (about 10 s on an idle machine); scripts/ray_bench.py measures the speed."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import assert_one_error_line, run_cli
from probattn.export.predict import SORT_WINDOW_BATCHES, batch_plan
from tokenizer_battery import BATTERY


def test_batch_plan_covers_each_text_once_sorted_within_windows():
    rng = np.random.default_rng(0)
    texts = ["x" * int(n) for n in rng.integers(0, 300, size=5000)]
    for batch_size in (1, 7, 64):
        plan = batch_plan(texts, batch_size)
        flat = [i for b in plan for i in b]
        assert sorted(flat) == list(range(len(texts)))
        assert all(1 <= len(b) <= batch_size for b in plan)
        window = batch_size * SORT_WINDOW_BATCHES
        for start in range(0, len(texts), window):  # a window's texts stay in it, by length
            part = [i for i in flat if start <= i < start + window]
            assert flat[start:start + len(part)] == part
            assert [len(texts[i]) for i in part] == sorted(len(texts[i]) for i in part)
    assert batch_plan(texts, 64) == batch_plan(list(texts), 64)  # deterministic
    assert batch_plan([], 8) == []


@pytest.fixture(scope="module")
def input_file(bundle_dir, tmp_path_factory):
    texts = [json.loads(l)["text"] for l in (bundle_dir / "test.jsonl").read_text().splitlines()]
    texts += [" ".join(t.split()) for t in BATTERY]  # non-ASCII, empty and very long lines
    path = tmp_path_factory.mktemp("ray") / "texts.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path, len(path.read_text(encoding="utf-8").splitlines())


@pytest.fixture(scope="module")
def local_output(bundle_dir, input_file):
    path, n = input_file
    local = run_cli("predict", bundle_dir, "--input-file", path, "--json")
    assert local.returncode == 0, local.stderr[-2000:]
    assert len(local.stdout.splitlines()) == n > 2000
    return local.stdout


def test_ray_engine_output_is_identical_to_local(bundle_dir, input_file, local_output):
    ray = run_cli("predict", bundle_dir, "--input-file", input_file[0], "--json", "--engine", "ray", "--workers", "2")
    assert ray.returncode == 0, ray.stderr[-3000:]
    assert ray.stdout == local_output, "ray and local outputs differ"
    assert "Traceback" not in ray.stderr


def test_ray_engine_joins_the_cluster_ray_address_names(bundle_dir, input_file, local_output):
    """With RAY_ADDRESS set, predict joins that cluster (here one this test starts), gives
    the same output and leaves the cluster running: it is not predict's to stop."""
    import ray

    path, _ = input_file
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    try:
        address = ray.get_runtime_context().gcs_address
        joined = run_cli("predict", bundle_dir, "--input-file", path, "--json", "--engine", "ray",
                         env={"RAY_ADDRESS": address})
        assert joined.returncode == 0, joined.stderr[-3000:]
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2, "the cluster went away"
    finally:
        ray.shutdown()
    assert joined.stdout == local_output, "ray (joined cluster) and local outputs differ"


@pytest.mark.parametrize("args,needle", [
    (["--engine", "spark"], "unknown engine 'spark'; allowed: local, ray"),
    (["--workers", "2"], "--workers 2 is for --engine ray"),
], ids=["engine", "workers"])
def test_predict_engine_options_refused(bundle_dir, args, needle):
    line = assert_one_error_line(run_cli("predict", bundle_dir, "a text", *args), "predict", stdout_empty=True)
    assert needle in line, line

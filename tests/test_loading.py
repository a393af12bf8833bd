"""Honest loading: the flavour from the file, every class resolved the way Keras resolves
it, never a class substituted by name, the user's own classes only from the file they name
(``--custom-objects``), recorded and required again to judge the bundle."""
from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest

import user_models as U
from helpers import assert_one_error_line, run_cli
from probattn.models.errors import UsageError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    built = {name: U.build(U.by_name(name), root / name)
             for name in ("k3_user_probattn", "k3_custom_layers", "k3_probattn", "tk_user_probattn_h5",
                          "tk_probattn", "k3_probattn_h5", "tk_probattn_h5")}
    return root, built


# ------------------------------------------------------------------ flavour from the file

@pytest.mark.parametrize("name,kind,flavour", [
    ("k3_probattn", "keras", "3"), ("k3_probattn_h5", "h5", "3"),
    ("tk_probattn", "keras", "2"), ("tk_probattn_h5", "h5", "2")])
def test_flavour_is_told_from_the_file(files, name, kind, flavour):
    from probattn.export.flavour import detect

    info = detect(files[1][name].path)
    assert (info.kind, info.flavour) == (kind, flavour), info
    assert info.keras_version.startswith("3." if flavour == "3" else "2."), info


def test_savedmodel_kinds_are_told_apart(tmp_path):
    from probattn.export import flavour as F

    for case in ("k3_model_export", "k3_tf_saved_model", "tk_savedmodel"):
        built = U.build(U.by_name(case), tmp_path / case)
        info = F.detect(built.path)
        want = {"k3_model_export": F.SM_KERAS3_EXPORT, "k3_tf_saved_model": F.SM_PLAIN,
                "tk_savedmodel": F.SM_TF_KERAS}[case]
        assert info.savedmodel_kind == want, (case, info)
        assert info.flavour == ("2" if case == "tk_savedmodel" else None)


@pytest.mark.parametrize("name", ["k3_probattn", "k3_probattn_h5", "tk_probattn", "tk_probattn_h5"])
def test_our_layer_loads_as_ours_in_its_flavour(files, name):
    from probattn.export.loading import load_model
    from probattn.models.layers import layer_classes

    built = files[1][name]
    loaded = load_model(built.path)
    ours = layer_classes(built.case.flavour).ProbAttention
    assert any(type(l) is ours for l in loaded.keras_model.layers)
    ids = np.array([[5, 6, 7, 0], [9, 0, 0, 0]], np.int32)
    np.testing.assert_allclose(np.asarray(loaded.keras_model(ids)), np.asarray(built.model(ids)), rtol=0, atol=0)


# ------------------------------------------------------------------ no substitution

def test_users_own_probattention_is_refused_without_its_file(files, tmp_path):
    """A user's class named ProbAttention (tanh scores) is not ours: without the user's file
    the load fails, naming the class and the flag, and nothing is written."""
    built = files[1]["k3_user_probattn"]
    out = tmp_path / "out"
    proc = run_cli("export", built.path, "--tokenizer", built.tokenizer, "--out", out)
    line = assert_one_error_line(proc, "export")
    assert "ProbAttention" in line and "--custom-objects" in line, line
    assert not out.exists()


def test_every_unresolved_class_is_named(files):
    from probattn.export.loading import load_model

    with pytest.raises(UsageError) as err:
        load_model(files[1]["k3_custom_layers"].path)
    msg = str(err.value)
    for name in ("ProbAttention", "Gate", "swishish"):
        assert name in msg, msg
    assert "--custom-objects" in msg


def test_tf_keras_h5_with_users_class_is_refused_too(files):
    from probattn.export.loading import load_model

    with pytest.raises(UsageError, match=r"ProbAttention.*--custom-objects"):
        load_model(files[1]["tk_user_probattn_h5"].path)


@pytest.mark.parametrize("name", ["k3_user_probattn", "tk_user_probattn_h5"])
def test_users_class_from_their_file_is_what_runs(files, name):
    """With --custom-objects the user's own class runs: its outputs, not ours."""
    from probattn.export.loading import load_model
    from probattn.models.layers import layer_classes

    built = files[1][name]
    loaded = load_model(built.path, custom_objects=built.case.custom_path)
    pool = loaded.keras_model.get_layer("prob_attention")
    assert type(pool).__module__.startswith("probattn_custom_objects_"), type(pool)
    assert type(pool) is not layer_classes(built.case.flavour).ProbAttention
    ids = np.array([[5, 6, 7, 8, 0, 0], [9, 3, 0, 0, 0, 0]], np.int32)
    users = np.asarray(built.model(ids))
    np.testing.assert_allclose(np.asarray(loaded.keras_model(ids)), users, rtol=0, atol=1e-6)
    # the check can fail: our layer with the same weights computes something else
    ours = layer_classes(built.case.flavour).ProbAttention(name="ours")
    x = loaded.keras_model.get_layer("embedding")(ids)
    ours.build(x.shape)
    ours.kernel.assign(pool.get_weights()[0])
    assert np.max(np.abs(np.asarray(ours(x)) - np.asarray(pool(x)))) > 1e-3


def test_our_registered_name_with_another_config_is_refused(files, tmp_path):
    """A config that names probattn>ProbAttention but carries keys our layer does not have was
    written by another class registered under our name: refused, not loaded as ours."""
    from probattn.export.loading import load_model

    src = zipfile.ZipFile(files[1]["k3_probattn"].path)
    config = json.loads(src.read("config.json"))
    for layer in config["config"]["layers"]:
        if layer.get("registered_name") == "probattn>ProbAttention":
            layer["config"]["temperature"] = 2.0
    forged = tmp_path / "forged.keras"
    with zipfile.ZipFile(forged, "w") as z:
        for n in src.namelist():
            z.writestr(n, json.dumps(config) if n == "config.json" else src.read(n))
    with pytest.raises(UsageError, match=r"probattn>ProbAttention.*temperature.*--custom-objects"):
        load_model(forged)


# ------------------------------------------------------------------ the user's file

def test_custom_objects_of_the_other_flavour_are_refused(files):
    from probattn.export.loading import load_model

    built = files[1]["k3_user_probattn"]
    with pytest.raises(UsageError, match=r"subclass the other Keras"):
        load_model(built.path, custom_objects=U.OBJECTS / "tf_keras_objects.py")


@pytest.mark.parametrize("content,suffix,match", [
    (None, ".py", "not found"),
    ("x = 1\n", ".txt", "expects a Python file"),
    ("raise RuntimeError('boom')\n", ".py", "failed to run: RuntimeError: boom"),
    ("x = 1\n", ".py", "defines no class or function"),
], ids=["missing", "not-python", "raises", "empty"])
def test_bad_custom_objects_files(files, tmp_path, content, suffix, match):
    from probattn.export.loading import load_model

    path = tmp_path / f"objects{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError, match=match):
        load_model(files[1]["k3_user_probattn"].path, custom_objects=path)


def test_custom_objects_are_recorded_and_required_to_verify(files, tmp_path):
    """The file goes into the bundle with its SHA-256; judging the bundle loads the Keras
    reference, which runs the user's code, so verify needs the user to name the file again,
    and the same bytes."""
    built = files[1]["k3_user_probattn"]
    objects = built.case.custom_path
    out = tmp_path / "bundle"
    proc = run_cli("export", built.path, "--tokenizer", built.tokenizer, "--out", out, "--formats", "onnx",
                   "--precisions", "fp32", "--custom-objects", objects, "--labels", built.labels_file)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    rec = manifest["source"]["custom_objects"]
    from probattn.export.loading import file_sha256

    assert rec["file"] == objects.name and rec["sha256"] == file_sha256(objects)
    assert (out / rec["path"]).read_bytes() == objects.read_bytes()
    assert "ProbAttention" in rec["names"]

    proc = run_cli("verify", out, "--data", built.data)
    line = assert_one_error_line(proc, "verify")
    assert "--custom-objects" in line and objects.name in line, line

    changed = tmp_path / objects.name
    changed.write_text(objects.read_text() + "\n# edited\n")
    proc = run_cli("verify", out, "--data", built.data, "--custom-objects", changed)
    line = assert_one_error_line(proc, "verify")
    assert "sha256" in line and "same file" in line, line

    proc = run_cli("verify", out, "--data", built.data, "--custom-objects", objects)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_custom_objects_for_a_bundle_without_them_is_refused(files, tmp_path):
    from probattn.export.exporter import ExportOptions, export
    from probattn.export.parity import verify

    built = files[1]["k3_probattn"]
    out = tmp_path / "bundle"
    export(built.path, out, ExportOptions(formats=("onnx",), precisions=("fp32",), tokenizer=str(built.tokenizer)))
    with pytest.raises(UsageError, match="needs no custom objects"):
        verify(out, data=str(built.data), custom_objects=U.OBJECTS / "keras3_objects.py", quiet=True)


def test_module_allow_list_still_guards_tf_keras_files(files, tmp_path):
    """tf_keras imports a module a .keras config names; such a module is refused unless it is
    resolved from the user's own --custom-objects file."""
    from probattn.export.loading import load_model

    src = zipfile.ZipFile(files[1]["tk_probattn"].path)
    config = json.loads(src.read("config.json"))
    config["config"]["layers"][-1]["config"]["activation"] = {
        "module": "subprocess", "class_name": "function", "config": "getoutput", "registered_name": "function"}
    evil = tmp_path / "evil.keras"
    with zipfile.ZipFile(evil, "w") as z:
        for n in src.namelist():
            z.writestr(n, json.dumps(config) if n == "config.json" else src.read(n))
    with pytest.raises(UsageError, match=r"module\(s\) subprocess"):
        load_model(evil)
    shutil.rmtree(tmp_path, ignore_errors=True)

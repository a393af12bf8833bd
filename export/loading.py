"""Loading the user's Keras model safely: clear errors, safe mode on by default."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from probattn.models.errors import UsageError, one_line

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


def _h5_lambda_layers(path: Path) -> list:
    """Names of Lambda layers in a legacy .h5 model (its config is JSON in the root attrs)."""
    try:
        import h5py
    except ImportError:  # pragma: no cover - tf-keras needs h5py
        return []
    with h5py.File(path, "r") as f:
        raw = f.attrs.get("model_config")
    if raw is None:
        return []
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    return [d.get("config", {}).get("name", "lambda") for d in _dicts(json.loads(raw))
            if d.get("class_name") == "Lambda"]


def _dicts(obj):
    """Every dict nested anywhere in a JSON value (a Keras config), depth first."""
    stack = [obj]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            yield cur
            stack.extend(reversed(list(cur.values())))
        elif isinstance(cur, list):
            stack.extend(reversed(cur))


def _keras_config(path: Path):
    """The parsed ``config.json`` of a .keras archive (read with a size cap), or None when it
    cannot be read (Keras then reports what is wrong with the archive)."""
    from .audit.archive import MAX_CONFIG_BYTES, read_member

    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(read_member(z, "config.json", MAX_CONFIG_BYTES))
    except Exception:
        return None


def check_model_file(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"model not found: {path}")
    if path.is_dir():
        if not (path / "saved_model.pb").exists():
            raise UsageError(f"{path} is a directory but not a SavedModel (no saved_model.pb); "
                             f"expected a run directory, a SavedModel, or a {'/'.join(MODEL_SUFFIXES)} file")
        return path
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise UsageError(f"unsupported model file '{path.name}'; allowed: {', '.join(MODEL_SUFFIXES)} or a SavedModel directory")
    if not path.is_file():  # a FIFO or a device: opening it could block forever
        raise UsageError(f"model file {path} is not a regular file")
    if path.stat().st_size == 0:
        raise UsageError(f"model file is empty: {path}")
    if path.suffix.lower() == ".keras" and not zipfile.is_zipfile(path):
        raise UsageError(f"{path} is not a valid .keras file (not a zip archive; truncated or not a Keras model)")
    if path.suffix.lower() in (".h5", ".hdf5"):
        with open(path, "rb") as f:
            if f.read(8) != b"\x89HDF\r\n\x1a\n":
                raise UsageError(f"{path} is not a valid HDF5 file (bad signature; truncated or not a Keras model)")
    return path


def load_keras_model(path, unsafe: bool = False):
    """Load a .keras / .h5 / SavedModel with our layers registered.

    Keras safe mode stays on: a model with a ``Lambda`` layer (arbitrary Python code) is
    refused unless ``unsafe=True``. A model saved with the seed page's unregistered class
    name ``ProbAttention`` loads too.
    """
    path = check_model_file(path)
    _audit_file(path, unsafe)
    from probattn.models.keras_compat import get_keras
    from probattn.models.layers import layer_classes

    keras = get_keras()
    ours = layer_classes()  # registers probattn's layers (and the comparison layer of the demo)
    custom = {"ProbAttention": ours.ProbAttention}
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5") and not unsafe:
        try:
            lambdas = _h5_lambda_layers(path)
        except Exception as e:
            raise UsageError(f"{path} could not be read as an HDF5 Keras model ({one_line(e, 200)})") from None
        if lambdas:
            raise UsageError(_lambda_refusal(path, lambdas))
    if suffix == ".keras" and not unsafe:
        _check_keras_config(path, custom)
    try:
        if path.is_dir():
            model = keras.models.load_model(path, custom_objects=custom, compile=False)
        elif suffix == ".keras":
            model = keras.models.load_model(path, custom_objects=custom, compile=False,
                                            safe_mode=not unsafe)
        else:
            model = keras.models.load_model(path, custom_objects=custom, compile=False)
    except Exception as e:
        msg = str(e)
        if "safe_mode" in msg or "Lambda" in msg and "unsafe" in msg.lower():
            raise UsageError(_lambda_refusal(path, ["Lambda"])) from None
        unknown = _unregistered_classes(path, custom)
        if unknown:
            raise UsageError(f"{path} uses custom classes that are not registered in this process "
                             f"({', '.join(unknown)}); import the module that defines them first "
                             "(probattn's own layers register on 'import probattn.models')") from None
        raise UsageError(f"could not load Keras model {path}: {one_line(msg, 300)}") from None
    return model


def _audit_file(path: Path, unsafe: bool) -> None:
    """Sizes, names and links of the file checked before Keras reads it (``audit/``): a .keras
    zip's entries before extraction, an .h5 file's attributes and datasets before reading
    them, a SavedModel's files and (unless ``unsafe``) ops before TensorFlow loads it."""
    from .audit import archive

    path = Path(os.path.realpath(path))  # the user's own link to their file is fine; what it names is checked
    if path.is_dir():
        from .audit import savedmodel

        savedmodel.audit(path, unsafe=unsafe, what=f"SavedModel {path}")
    elif path.suffix.lower() == ".keras":
        archive.audit_zip(path)
    else:
        archive.audit_h5(path)


def _unregistered_classes(path: Path, custom: dict) -> list:
    """Registered names (``package>Class``) in a .keras config that Keras cannot resolve.
    tf-keras reports those as "'str' object is not callable"."""
    if path.suffix.lower() != ".keras":
        return []
    from probattn.models.keras_compat import get_keras

    keras = get_keras()

    config = _keras_config(path)
    if config is None:
        return []
    names = {d["registered_name"] for d in _dicts(config)
             if isinstance(d.get("registered_name"), str) and ">" in d["registered_name"]}
    return sorted(n for n in names if n.split(">")[-1] not in custom
                  and keras.saving.get_registered_object(n) is None)


#: Modules a .keras config may name in safe mode. Keras' safe mode refuses only lambdas:
#: any other ``"module"`` in config.json is imported, and a function from it (e.g. an
#: activation ``{"module": "subprocess", "class_name": "function", "config": "getoutput"}``)
#: is put into the model.
SAFE_CONFIG_MODULES = ("keras", "tf_keras", "probattn")


def _check_keras_config(path: Path, custom: dict) -> None:
    """Refuse lambdas and modules outside SAFE_CONFIG_MODULES (a class resolved through
    ``custom``, like the seed page's unregistered ``ProbAttention``, imports nothing)."""
    config = _keras_config(path)
    if config is None:
        return
    lambdas, modules = [], set()
    for obj in _dicts(config):
        if obj.get("class_name") in ("Lambda", "__lambda__"):
            cfg = obj.get("config")
            lambdas.append(cfg.get("name", "lambda") if isinstance(cfg, dict) else "lambda")
        mod = obj.get("module")
        name = obj.get("registered_name", obj.get("class_name"))  # how Keras looks classes up
        if obj.get("class_name") != "function" and isinstance(name, str) and name in custom:
            mod = None  # resolved from ``custom``: nothing is imported
        if isinstance(mod, str) and not any(mod == m or mod.startswith(m + ".") for m in SAFE_CONFIG_MODULES):
            modules.add(mod)
    if lambdas:
        raise UsageError(_lambda_refusal(path, sorted(set(lambdas))))
    if modules:
        raise UsageError(f"{path} names Python module(s) {', '.join(sorted(modules))} in its config; loading "
                         f"would import them (allowed in safe mode: {', '.join(SAFE_CONFIG_MODULES)}). "
                         "Pass --unsafe only if you trust the file")


def _lambda_refusal(path, names) -> str:
    return (f"{path} contains a Lambda layer ({', '.join(names)}), which runs arbitrary Python "
            "code when loaded; refused in safe mode. Pass --unsafe only if you trust the file")


def vocab_size_of(model) -> int | None:
    """Rows of the model's first Embedding layer (the id range it accepts), or None."""
    from probattn.models.keras_compat import keras_of

    embedding = keras_of(model).layers.Embedding

    def walk(layer):
        if isinstance(layer, embedding):
            return int(layer.input_dim)
        for sub in getattr(layer, "layers", []) or []:
            found = walk(sub)
            if found:
                return found
        return None

    return walk(model)

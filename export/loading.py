"""Loading the user's model honestly: with the Keras that wrote it, safe mode on, and never
with a class the user did not hand over.

* The flavour comes from the file (``probattn.export.flavour``): a Keras 3 file loads with
  Keras 3, a tf_keras file with tf_keras.
* Before Keras sees the file, every class and function its config names is resolved the
  way Keras resolves it: a Keras builtin, probattn's own registered layer
  (``probattn>ProbAttention``, and only when the saved config is exactly our layer's), or
  an object from the user's ``--custom-objects FILE.py``. Anything else is refused, naming
  every unresolved class and the flag. A class is never substituted by name: a user's own
  ``ProbAttention`` is not ours.
* ``--custom-objects FILE.py`` runs the user's file (it is their code, named explicitly);
  its SHA-256 goes into the manifest and the file into the bundle, and anything that later
  loads the Keras reference (verify, bench) needs the same file again.
* Safe mode: ``Lambda`` layers are refused unless ``--unsafe``. tf_keras imports any Python
  module a ``.keras`` config names, so for tf_keras files modules outside
  ``SAFE_CONFIG_MODULES`` are refused too (Keras 3 does not import them).
* SavedModels: a tf_keras SavedModel loads as a Keras model; Keras 3 ``model.export()`` and
  ``tf.saved_model.save`` directories have no Keras model and run through their
  ``serving_default`` signature (``SignatureModel``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from probattn.models.errors import UsageError, one_line

from . import flavour as F

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
#: the registered name of probattn's layer; the only class we ever supply ourselves
OUR_LAYER = "probattn>ProbAttention"
#: Modules a tf_keras ``.keras`` config may name in safe mode: tf_keras imports any other
#: ``"module"`` in config.json and puts a function from it into the model (e.g. an
#: activation ``{"module": "subprocess", "class_name": "function", "config": "getoutput"}``).
SAFE_CONFIG_MODULES = ("keras", "tf_keras", "probattn")
#: config entries that are not classes
_SPECIAL = {"__keras_tensor__", "__tensor__", "__numpy__", "__bytes__", "__typespec__", "__lambda__",
            "__ellipsis__", "__slice__", "__tuple__", "__dict__", "__list__"}
CUSTOM_OBJECTS_FLAG = "--custom-objects FILE.py"


# ---------------------------------------------------------------------------- the file

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
            if f.read(8) != F.H5_MAGIC:
                raise UsageError(f"{path} is not a valid HDF5 file (bad signature; truncated or not a Keras model)")
    return path


def read_config(path: Path):
    """The model config of a .keras archive or an .h5 file (both carry JSON)."""
    try:
        if path.suffix.lower() == ".keras":
            from .audit.archive import MAX_CONFIG_BYTES, read_member

            with zipfile.ZipFile(path) as z:  # read with a size cap (audited before: _audit_file)
                return json.loads(read_member(z, "config.json", MAX_CONFIG_BYTES))
        import h5py

        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
    except Exception as e:
        raise UsageError(f"could not read the model config of {path} ({one_line(e, 200)})") from None
    if raw is None:
        raise UsageError(f"{path} holds no model config (a weights-only file?)")
    return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)


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


@dataclass
class ConfigObject:
    class_name: str  # the function's name for functions
    kind: str  # "class" or "function"
    module: str | None
    registered_name: str | None
    config: object

    @property
    def key(self) -> str:
        """What Keras looks the object up by."""
        if self.kind == "function":
            return self.class_name
        return self.registered_name or self.class_name

    def label(self) -> str:
        extra = f" (module {self.module})" if self.module and self.module != "builtins" else ""
        return self.key + extra


def config_objects(config) -> list:
    """Every class and function a Keras config names (layers, models, initializers, dtype
    policies, ops such as Keras 3's ``NotEqual``, activation functions)."""
    out = []
    for d in _dicts(config):
        cn = d.get("class_name")
        if not isinstance(cn, str) or cn in _SPECIAL:
            continue
        if cn == "function":
            if isinstance(d.get("config"), str):
                out.append(ConfigObject(d["config"], "function", d.get("module"), None, None))
            continue
        out.append(ConfigObject(cn, "class", d.get("module"), d.get("registered_name"), d.get("config")))
    return out


# ---------------------------------------------------------------------------- custom objects

@dataclass
class CustomObjects:
    """The user's ``--custom-objects FILE.py``: its objects and its record for the manifest."""

    path: Path
    sha256: str
    objects: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"file": self.path.name, "sha256": self.sha256, "names": sorted(self.objects)}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_custom_objects(file, flavour: str) -> CustomObjects:
    """Import the user's FILE.py and collect the classes and functions it defines, keyed by
    name and by the registered name Keras knows them by. This runs the user's code: only
    ever for a file the user named."""
    from probattn.models.keras_compat import get_keras

    path = Path(file)
    if not path.is_file():
        raise UsageError(f"--custom-objects file not found: {path}")
    if path.suffix != ".py":
        raise UsageError(f"--custom-objects expects a Python file (.py); received {path.name}")
    keras = get_keras(flavour)
    digest = file_sha256(path)
    modname = f"probattn_custom_objects_{digest[:16]}"
    if modname in sys.modules:  # the same file (same bytes) in this process: reuse it
        module = sys.modules[modname]
    else:
        spec = importlib.util.spec_from_file_location(modname, path.resolve())
        if spec is None or spec.loader is None:
            raise UsageError(f"--custom-objects {path}: not an importable Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module
        folder = str(path.resolve().parent)
        sys.path.insert(0, folder)  # so the file can import its siblings
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(modname, None)
            raise UsageError(f"--custom-objects {path.name} failed to run: {type(e).__name__}: "
                             f"{one_line(e, 200)}") from None
        finally:
            if folder in sys.path:
                sys.path.remove(folder)
    other = _other_flavour_layer(flavour)
    objects, wrong = {}, []
    for name, obj in vars(module).items():
        if getattr(obj, "__module__", None) != modname:
            continue  # imported into the file, not defined there
        if inspect.isclass(obj):
            if other is not None and issubclass(obj, other) and not issubclass(obj, keras.layers.Layer):
                wrong.append(name)
                continue
        elif not inspect.isfunction(obj):
            continue
        objects[name] = obj
        try:
            registered = keras.saving.get_registered_name(obj)
        except Exception:
            registered = name
        if registered and registered != name:
            objects[registered] = obj
    if wrong:
        want = "Keras 3 (keras / tensorflow.keras)" if flavour == "3" else "tf_keras"
        raise UsageError(f"--custom-objects {path.name}: {', '.join(wrong)} subclass the other Keras; the model "
                         f"was written by {want}, so define them with {want}")
    if not objects:
        raise UsageError(f"--custom-objects {path.name} defines no class or function")
    return CustomObjects(path, digest, objects)


def _other_flavour_layer(flavour: str):
    other = "tf_keras" if flavour == "3" else "keras"
    mod = sys.modules.get(other)
    return getattr(getattr(mod, "layers", None), "Layer", None) if mod else None


def check_custom_objects_for_bundle(manifest: dict, custom_objects) -> str | None:
    """The ``--custom-objects`` file a bundle's Keras reference needs, checked against the
    manifest: None when the bundle needs none; refuses a missing or different file."""
    rec = (manifest.get("source") or {}).get("custom_objects")
    if not rec:
        if custom_objects:
            raise UsageError(f"--custom-objects {Path(custom_objects).name} given, but this bundle's model "
                             "needs no custom objects; drop the flag")
        return None
    if not custom_objects:
        raise UsageError(f"this bundle's Keras reference uses classes from {rec['file']} (sha256 "
                         f"{rec['sha256'][:12]}…); pass --custom-objects {rec['file']} (it runs that file's "
                         "code; the bundle keeps a copy under custom_objects/)")
    path = Path(custom_objects)
    if not path.is_file():
        raise UsageError(f"--custom-objects file not found: {path}")
    digest = file_sha256(path)
    if digest != rec["sha256"]:
        raise UsageError(f"--custom-objects {path.name} has sha256 {digest[:12]}…, but the bundle was exported "
                         f"with {rec['file']} sha256 {rec['sha256'][:12]}…; pass the same file")
    return str(path)


# ---------------------------------------------------------------------------- resolving classes

def _keras3_builtin(obj: ConfigObject):
    module = obj.module or ""
    if module == "keras" or module.startswith("keras."):
        try:
            mod = importlib.import_module(module)  # Keras' own modules only
        except ImportError:
            return None
        return getattr(mod, obj.class_name, None)
    if module == "builtins" and obj.kind == "function":  # "relu", "softmax", ...
        import keras

        for sub in (keras.activations, keras.initializers, keras.losses, keras.metrics):
            found = getattr(sub, obj.class_name, None)
            if found is not None:
                return found
    if not module:  # a legacy .h5 config names builtins without a module
        return _bare_builtin(sys.modules["keras"], obj.class_name)
    return None


def _bare_builtin(keras, name):
    if name in ("Functional", "Sequential", "Model"):
        return True
    for sub in ("layers", "initializers", "activations", "regularizers", "constraints", "losses",
                "metrics", "models", "mixed_precision"):
        found = getattr(getattr(keras, sub, None), name, None)
        if found is not None:
            return found
    if name in ("DTypePolicy", "FloatDTypePolicy", "Policy"):
        return True
    return None


def _tf_keras_builtin(obj: ConfigObject):
    import tf_keras

    module = obj.module or ""
    if module == "tf_keras" or module.startswith("tf_keras."):  # tf_keras' own modules only
        try:
            found = getattr(importlib.import_module(module), obj.class_name, None)
        except ImportError:
            found = None
        if found is not None:
            return found
    if module.startswith("tf_keras") or module in ("keras", "builtins") or module.startswith("keras.") or not module:
        found = _bare_builtin(tf_keras, obj.class_name)
        if found is None and not module:  # an .h5 names tf_keras' op layers (tf ops on Keras tensors) bare
            from tf_keras.src.layers.core import tf_op_layer

            found = getattr(tf_op_layer, obj.class_name, None)
        return found
    return None


def resolve(obj: ConfigObject, flavour: str, custom: dict):
    """How Keras would find this object: the custom objects first, then the global registry
    (probattn's own layer registers itself there), then Keras' builtins."""
    from probattn.models.keras_compat import get_keras

    if obj.key in custom or obj.class_name in custom and obj.kind == "function":
        return custom.get(obj.key, custom.get(obj.class_name))
    keras = get_keras(flavour)
    if obj.key and ">" in obj.key:
        return keras.saving.get_registered_object(obj.key)
    return _keras3_builtin(obj) if flavour == "3" else _tf_keras_builtin(obj)


def unresolved(config, flavour: str, custom: dict, imports_modules: bool = False) -> list:
    """Labels of every object in ``config`` this process cannot resolve (none imported).
    ``imports_modules``: Keras will import the modules the config names (tf_keras with
    ``--unsafe``), so an object with a module of its own counts as resolvable."""
    missing = []
    for obj in config_objects(config):
        if imports_modules and obj.module and obj.module not in ("builtins",) and not any(
                obj.module == m or obj.module.startswith(m + ".") for m in SAFE_CONFIG_MODULES):
            continue
        if resolve(obj, flavour, custom) is None and obj.label() not in missing:
            missing.append(obj.label())
    return missing


def _check_our_layer(config, flavour: str, path: Path) -> None:
    """A config entry naming ``probattn>ProbAttention`` loads as ours only when its config is
    our layer's (same keys): anything else was written by another class of that name."""
    from probattn.models.layers import layer_classes

    ours = set(layer_classes(flavour).ProbAttention().get_config())
    for obj in config_objects(config):
        if obj.key != OUR_LAYER or not isinstance(obj.config, dict):
            continue
        extra = sorted(set(obj.config) - ours)
        if extra:
            raise UsageError(f"{path.name} names {OUR_LAYER} but its config has keys our layer does not "
                             f"({', '.join(extra)}): another class wrote it. Pass {CUSTOM_OBJECTS_FLAG} "
                             "with that class (registered under its own name)")


def _refuse_unsafe(config, flavour: str, custom: dict, path: Path) -> None:
    lambdas, modules = [], set()
    for d in _dicts(config):
        if d.get("class_name") in ("Lambda", "__lambda__"):
            cfg = d.get("config")
            lambdas.append(cfg.get("name", "lambda") if isinstance(cfg, dict) else "lambda")
        if flavour != "2":
            continue  # Keras 3 does not import modules named in a config
        mod = d.get("module")
        name = d.get("registered_name") or d.get("class_name")
        if d.get("class_name") == "function":
            name = d.get("config")
        if isinstance(name, str) and name in custom:
            mod = None  # resolved from the custom objects: nothing is imported
        if isinstance(mod, str) and not any(mod == m or mod.startswith(m + ".") for m in SAFE_CONFIG_MODULES):
            modules.add(mod)
    if lambdas:
        raise UsageError(_lambda_refusal(path, sorted(set(lambdas))))
    if modules:
        raise UsageError(f"{path} names Python module(s) {', '.join(sorted(modules))} in its config; loading "
                         f"would import them (allowed in safe mode: {', '.join(SAFE_CONFIG_MODULES)}). "
                         f"Pass {CUSTOM_OBJECTS_FLAG} defining the classes, or --unsafe only if you trust the file")


def _lambda_refusal(path, names) -> str:
    return (f"{path} contains a Lambda layer ({', '.join(names)}), which runs arbitrary Python "
            "code when loaded; refused in safe mode. Pass --unsafe only if you trust the file")


# ---------------------------------------------------------------------------- loading

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


@dataclass
class Loaded:
    """A loaded model: a Keras model (``keras_model``) or a SavedModel signature
    (``signature``), the flavour and file facts, and the custom objects used."""

    path: Path
    info: F.FileInfo
    keras_model: object = None
    signature: object = None  # SignatureModel
    custom: CustomObjects | None = None

    @property
    def flavour(self):
        return self.info.flavour


def load_model(path, unsafe: bool = False, custom_objects=None) -> Loaded:
    """Load a ``.keras`` / ``.h5`` / SavedModel with the Keras that wrote it (see the module
    docstring). ``custom_objects``: the user's FILE.py (a path) or None."""
    path = check_model_file(path)
    _audit_file(path, unsafe)  # sizes, names, links and (unless unsafe) SavedModel ops, before anything reads it
    info = F.detect(path)
    if info.kind == F.KIND_SAVEDMODEL and info.flavour is None:
        if custom_objects:
            raise UsageError(f"{path.name} is a {info.savedmodel_kind} SavedModel: it runs its saved graph and "
                             "needs no --custom-objects; drop the flag")
        return Loaded(path, info, signature=SignatureModel(path))
    from probattn.models.keras_compat import get_keras
    from probattn.models.layers import layer_classes

    flavour = info.flavour
    keras = get_keras(flavour)
    layer_classes(flavour)  # registers probattn>ProbAttention (under that name only)
    custom = load_custom_objects(custom_objects, flavour) if custom_objects else None
    objects = dict(custom.objects) if custom else {}
    if info.kind == F.KIND_SAVEDMODEL:  # tf_keras SavedModel: its own graph functions back every layer
        try:
            model = keras.models.load_model(path, custom_objects=objects, compile=False)
        except Exception as e:
            raise UsageError(f"could not load the tf_keras SavedModel {path}: {one_line(e, 300)}") from None
        return Loaded(path, info, keras_model=model, custom=custom)
    config = read_config(path)
    keras_own = {}
    if info.kind == F.KIND_H5 and flavour == "3":
        # Keras 3 writes the Embedding mask into a legacy .h5 as the op node ``NotEqual``, which
        # its own .h5 reader does not know. It is Keras' class (``keras.src`` is not public API).
        from keras.src.ops.numpy import NotEqual

        keras_own["NotEqual"] = NotEqual
    if not unsafe:
        _refuse_unsafe(config, flavour, objects, path)
    missing = unresolved(config, flavour, {**keras_own, **objects}, imports_modules=unsafe and flavour == "2")
    if missing:
        hint = ("" if custom is None else f" (not in --custom-objects {custom.path.name}, which defines "
                f"{', '.join(sorted(custom.objects))})")
        raise UsageError(f"{path.name} names classes that are neither Keras builtins nor registered: "
                         f"{', '.join(missing)}{hint}. Pass {CUSTOM_OBJECTS_FLAG} defining them (probattn "
                         f"supplies only its own {OUR_LAYER})")
    _check_our_layer(config, flavour, path)
    kwargs = {"custom_objects": {**keras_own, **objects}, "compile": False}
    if info.kind == F.KIND_KERAS:
        kwargs["safe_mode"] = not unsafe
    try:
        model = keras.saving.load_model(path, **kwargs) if flavour == "3" else keras.models.load_model(path, **kwargs)
    except Exception as e:
        msg = str(e)
        if "Lambda" in msg and "unsafe" in msg.lower() or "safe_mode" in msg:
            raise UsageError(_lambda_refusal(path, ["Lambda"])) from None
        raise UsageError(f"could not load {info.describe()} {path}: {type(e).__name__}: {one_line(msg, 300)}") from None
    return Loaded(path, info, keras_model=model, custom=custom)


def load_keras_model(path, unsafe: bool = False, custom_objects=None):
    """The Keras model of ``path`` (see ``load_model``); refuses a SavedModel that has none."""
    loaded = load_model(path, unsafe=unsafe, custom_objects=custom_objects)
    if loaded.keras_model is None:
        raise UsageError(f"{path} is a {loaded.info.savedmodel_kind} SavedModel without a Keras model")
    return loaded.keras_model


class SignatureModel:
    """A SavedModel without a Keras model, called through its ``serving_default`` signature
    (Keras 3 ``model.export`` writes ``serve`` and ``serving_default``). One input: token ids
    of the signature's dtype; ids are cast to it inside the serving graph."""

    def __init__(self, path: Path):
        from probattn.models.quiet import import_tensorflow

        tf = import_tensorflow()
        try:
            self.obj = tf.saved_model.load(str(path))
        except Exception as e:
            raise UsageError(f"could not load SavedModel {path}: {one_line(e, 200)}") from None
        sigs = dict(self.obj.signatures)
        if "serving_default" not in sigs:
            raise UsageError(f"SavedModel {path} has no 'serving_default' signature (found {sorted(sigs) or 'none'})")
        self.fn = sigs["serving_default"]
        args, kwargs = self.fn.structured_input_signature
        specs = dict(kwargs)
        if len(specs) != 1 or args:
            raise UsageError(f"SavedModel {path}: serving_default takes {len(specs) + len(args)} inputs "
                             f"({', '.join(specs)}); probattn exports models with one input of token ids")
        (self.input_name, spec), = specs.items()
        if spec.dtype == tf.string:
            raise UsageError(f"SavedModel {path} takes text ({self.input_name}: string): the tokenizer is inside "
                             "the graph. Export the model's .keras file instead (probattn strips a "
                             "TextVectorization layer and ships its vocabulary as tokenizer.json)")
        if not (spec.dtype.is_integer or spec.dtype.is_floating) or spec.shape.rank != 2:
            raise UsageError(f"SavedModel {path}: input {self.input_name} is {spec.dtype.name} {spec.shape}; "
                             "expected token ids [batch, sequence]")
        self.input_dtype = spec.dtype
        self.input_shape = spec.shape.as_list()
        self.output_names = list(self.fn.structured_outputs)

    def __call__(self, ids):
        import tensorflow as tf

        out = self.fn(**{self.input_name: tf.cast(ids, self.input_dtype)})
        return [out[n] for n in self.output_names]


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

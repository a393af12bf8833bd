"""Which Keras wrote a model file, told from the file itself (nothing is imported from it).

* ``.keras`` archive: ``metadata.json`` has ``keras_version`` (3.x: Keras 3, 2.x: tf_keras).
* ``.h5``: the root attributes hold ``keras_version`` (and ``model_config`` when it is a
  whole model, not weights only).
* SavedModel directory, one of three kinds:
  - ``tf_keras``: tf_keras ``model.save(dir)`` writes ``keras_metadata.pb`` beside it;
  - ``keras3-export``: Keras 3 ``model.export()`` / ``keras.export.ExportArchive`` (root
    children ``_all_variables`` and ``_misc_assets``);
  - ``tf-saved-model``: ``tf.saved_model.save`` of any object (Keras 3 inside or not).
  The last two have no Keras model to rebuild: they load with ``tf.saved_model.load`` and
  run through their ``serving_default`` signature.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from probattn.models.errors import UsageError, one_line

H5_MAGIC = b"\x89HDF\r\n\x1a\n"
KIND_KERAS, KIND_H5, KIND_SAVEDMODEL = "keras", "h5", "savedmodel"
#: SavedModel kinds
SM_TF_KERAS, SM_KERAS3_EXPORT, SM_PLAIN = "tf_keras", "keras3-export", "tf-saved-model"


@dataclass
class FileInfo:
    kind: str  # KIND_*
    flavour: str | None  # "3", "2" or None (a SavedModel without a Keras model)
    keras_version: str | None = None
    evidence: str = ""
    savedmodel_kind: str | None = None  # SM_* for SavedModels
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        who = {"3": "Keras 3", "2": "tf_keras"}.get(self.flavour, "no Keras model")
        what = self.savedmodel_kind or self.kind
        return f"{what} file written by {who}" + (f" {self.keras_version}" if self.keras_version else "")


def _major(version) -> str | None:
    try:
        major = int(str(version).split(".")[0])
    except (TypeError, ValueError):
        return None
    return "3" if major >= 3 else "2" if major == 2 else None


def _keras_zip(path: Path) -> FileInfo:
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            meta = json.loads(z.read("metadata.json")) if "metadata.json" in names else {}
    except Exception as e:
        raise UsageError(f"{path} is not a valid .keras file ({one_line(e, 160)})") from None
    if "config.json" not in names:
        raise UsageError(f"{path} is not a valid .keras file (no config.json inside)")
    version = meta.get("keras_version")
    flavour = _major(version)
    if flavour is None:
        raise UsageError(f"{path}: metadata.json records no Keras version ({version!r}); cannot tell "
                         "whether Keras 3 or tf_keras wrote it")
    return FileInfo(KIND_KERAS, flavour, str(version), f"metadata.json keras_version={version}")


def _h5(path: Path) -> FileInfo:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except Exception as e:
        raise UsageError(f"{path} could not be read as an HDF5 Keras model ({one_line(e, 200)})") from None
    version = attrs.get("keras_version")
    if isinstance(version, bytes):
        version = version.decode("utf-8", "replace")
    if "model_config" not in attrs:
        raise UsageError(f"{path} holds no model config (a weights-only file from save_weights?); "
                         "save the whole model with model.save(...)")
    flavour = _major(version)
    if flavour is None:
        raise UsageError(f"{path}: the HDF5 file records no Keras version ({version!r})")
    return FileInfo(KIND_H5, flavour, str(version), f"HDF5 root attribute keras_version={version}")


def _savedmodel(path: Path) -> FileInfo:
    if (path / "keras_metadata.pb").is_file():
        return FileInfo(KIND_SAVEDMODEL, "2", None, "keras_metadata.pb present (tf_keras model.save)",
                        SM_TF_KERAS)
    children = _root_children(path)
    if {"_all_variables", "_misc_assets"} <= children:
        return FileInfo(KIND_SAVEDMODEL, None, None, "root children _all_variables and _misc_assets "
                        "(Keras 3 model.export / ExportArchive)", SM_KERAS3_EXPORT)
    return FileInfo(KIND_SAVEDMODEL, None, None, "no keras_metadata.pb (tf.saved_model.save)", SM_PLAIN)


def _root_children(path: Path) -> set:
    from probattn.models.quiet import import_tensorflow

    import_tensorflow()
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    try:
        sm.ParseFromString((path / "saved_model.pb").read_bytes())
        nodes = sm.meta_graphs[0].object_graph_def.nodes
    except Exception as e:
        raise UsageError(f"{path} is not a valid SavedModel ({one_line(e, 160)})") from None
    return {c.local_name for c in nodes[0].children} if nodes else set()


def detect(path) -> FileInfo:
    """What kind of model file ``path`` is and which Keras wrote it; a one-line error when
    it cannot be told."""
    path = Path(path)
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise UsageError(f"{path} is a directory but not a SavedModel (no saved_model.pb)")
        return _savedmodel(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if zipfile.is_zipfile(path):
        return _keras_zip(path)
    if head == H5_MAGIC:
        return _h5(path)
    raise UsageError(f"{path} is neither a .keras archive, an HDF5 model nor a SavedModel directory")

"""A collection of user-style models, in both Keras flavours, for ``probattn export`` ->
``verify`` -> ``predict``: the models people arrive with (their own classes, the seed
page's code, Keras' attention layers, sigmoid and multi-output heads, fixed-length and
float inputs, SavedModels of every kind...).

Each ``UserModel`` builds a tiny model (vocabulary ~200, random but seeded weights), saves
it the way its user would, and says what must happen:

* ``expect="pass"``: export -> verify pass, and the bundle's predictions match the user's
  own model, run with the user's own classes: max |diff| <= ``MATCH_MAX_ABS`` and no
  decision flipped;
* ``expect="broken"``: the model itself breaks masking; verify exits 1 and its diagnosis
  names ``broken_at``, the layer where it starts.

``tests/test_user_models.py`` runs the collection with the formats each case needs;
``scripts/user_models_table.py`` runs it with every format for the table in the README.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OBJECTS = HERE / "user_objects"
#: the bundle must give the user's own model's outputs: float32 op-order noise across
#: converters is ~1e-7 (tolerances.FP32_MAX_ABS allows 1e-5); 1e-4 is the bar this collection
#: is held to for fp32 artifacts
MATCH_MAX_ABS = 1e-4
VOCAB = 200
LABELS3 = ["neg", "neu", "pos"]

_WORDS = ("the a an film movie plot actor actress scene story script music score director camera light dark "
          "good bad great awful boring brilliant dull funny sad slow fast long short warm cold clever silly "
          "loud quiet bright grim tender harsh sweet bitter fresh stale bold weak strong gentle wild calm "
          "love hate enjoy miss watch see hear feel think know make take give find tell ask seem leave call "
          "keep let begin show run move live believe bring happen write sit stand lose pay meet include "
          "continue set learn change lead understand follow stop create speak read spend grow open walk win "
          "offer remember consider appear buy wait serve die send expect build stay fall cut reach kill "
          "remain suggest raise pass sell require report decide pull and but or so yet very quite too rather "
          "really just only also even still never always often sometimes here there now then today tonight "
          "is was are were be been being has have had do does did not no").split()


def texts_and_labels(n=48, seed=0, words=None, labels=LABELS3):
    """A tiny seeded text set: ``n`` texts of 1 to 40 words, labels drawn at random."""
    rng = np.random.default_rng(seed)
    words = words or _WORDS
    texts = [" ".join(rng.choice(words, int(rng.integers(1, 41)))) for _ in range(n)]
    return texts, [labels[int(i)] for i in rng.integers(0, len(labels), n)]


#: words for the float-id model: enough of them that ids go past 2048 (float16's last exact
#: integer), where a float16 cast of the ids would round them
HIGH_WORDS = [f"w{i:04d}" for i in range(2600)]


def _seeded(model, seed=0, scale=0.5):
    """Random but seeded float weights (untrained 'uniform' attention would be near-uniform)."""
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, scale, w.shape).astype(w.dtype) if np.issubdtype(w.dtype, np.floating) else w
                       for w in model.get_weights()])
    return model


@dataclass
class UserModel:
    name: str
    flavour: str  # "3" or "2"
    build: object  # (keras, objects) -> model
    save: str = "keras"  # keras | h5 | export (Keras 3 model.export) | tf_saved_model | tf_keras_savedmodel
    custom: str | None = None  # file in tests/user_objects the user passes with --custom-objects
    expect: str = "pass"  # pass | broken
    broken_at: str | None = None  # the layer the diagnosis must name
    labels: list = field(default_factory=lambda: list(LABELS3))
    formats: tuple = ("onnx",)
    precisions: tuple = ("fp32",)
    high_ids: bool = False  # texts and tokenizer with ids past 2048
    text_input: bool = False  # the model reads strings (TextVectorization)
    mixed: bool = False  # built under mixed_float16
    note: str = ""

    @property
    def custom_path(self) -> Path | None:
        return OBJECTS / self.custom if self.custom else None


# ---------------------------------------------------------------------------- builders

def _ours(keras, flavour):
    from probattn.models.layers import layer_classes

    return layer_classes(flavour).ProbAttention


def _ids_input(keras, length=None, dtype="int32"):
    return keras.Input(shape=(length,), dtype=dtype, name="token_ids")


def _classifier(keras, pool, inp=None, x=None, classes=3, vocab=VOCAB, head="softmax", name="probabilities"):
    inp = inp if inp is not None else _ids_input(keras)
    if x is None:
        x = keras.layers.Embedding(vocab, 16, mask_zero=True, name="embedding")(inp)
    x = pool(x)
    x = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    out = keras.layers.Dense(classes, activation=head, name=name)(x)
    return keras.Model(inp, out)


def probattn_model(keras, objs, flavour="3"):
    return _seeded(_classifier(keras, _ours(keras, flavour)(name="prob_attention")))


def user_probattn(keras, objs):
    return _seeded(_classifier(keras, objs["ProbAttention"](name="prob_attention")), seed=1)


def custom_layers(keras, objs):
    inp = _ids_input(keras)
    x = keras.layers.Embedding(VOCAB, 16, mask_zero=True)(inp)
    x = objs["ProbAttention"](name="user_pool")(x)
    x = objs["Gate"]()(x)
    x = objs["Scale"](0.5)(x)
    x = keras.layers.Dense(16, activation=objs["swishish"])(x)
    return _seeded(keras.Model(inp, keras.layers.Dense(3, activation="softmax")(x)), seed=2)


def subclassed(keras, objs):
    model = objs["SubclassedClassifier"](VOCAB, 16, 3)
    model(np.array([[1, 2, 0]], np.int32))
    return _seeded(model, seed=3)


def fixed_length(keras, objs, flavour="3"):
    inp = _ids_input(keras, 32)
    return _seeded(_classifier(keras, _ours(keras, flavour)(name="prob_attention"), inp=inp), seed=4)


def float_ids(keras, objs, flavour="3"):
    inp = _ids_input(keras, None, "float32")
    return _seeded(_classifier(keras, _ours(keras, flavour)(name="prob_attention"), inp=inp, vocab=2700), seed=5)


def seed_page(keras, objs):
    """The seed page's model code as written (fixed length float input, Masking after a
    masked Embedding, its ProbAttention), shape bug fixed."""
    maxlen, vocab_size, embedding_dim, n_classes = 40, VOCAB, 16, 3
    inputs = keras.Input(shape=(maxlen,))
    x = keras.layers.Embedding(vocab_size, embedding_dim, mask_zero=True)(inputs)
    x = keras.layers.Masking()(x)
    x1 = objs["ProbAttention"]()(x)
    x2 = keras.layers.Dense(128, activation="relu")(x1)
    outputs = keras.layers.Dense(n_classes, activation="softmax")(x2)
    model = keras.Model(inputs=inputs, outputs=outputs)
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    return _seeded(model, seed=6)


def seed_page_tf_keras(keras, objs):
    maxlen = 40
    inputs = keras.Input(shape=(maxlen,))
    x = keras.layers.Embedding(VOCAB, 16, mask_zero=True)(inputs)
    x = keras.layers.Masking()(x)
    x = objs["SeedProbAttention"]()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    return _seeded(keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x)), seed=6)


def sigmoid_binary(keras, objs, flavour="3"):
    return _seeded(_classifier(keras, _ours(keras, flavour)(name="prob_attention"), classes=1, head="sigmoid"),
                   seed=7)


def multi_label(keras, objs, flavour="3"):
    return _seeded(_classifier(keras, _ours(keras, flavour)(name="prob_attention"), classes=4, head="sigmoid"),
                   seed=8)


def multi_output(keras, objs, flavour="3"):
    inp = _ids_input(keras)
    x = keras.layers.Embedding(VOCAB, 16, mask_zero=True)(inp)
    x = _ours(keras, flavour)(name="prob_attention")(x)
    h = keras.layers.Dense(16, activation="relu")(x)
    sentiment = keras.layers.Dense(3, activation="softmax", name="sentiment")(h)
    toxic = keras.layers.Dense(1, activation="sigmoid", name="toxic")(h)
    return _seeded(keras.Model(inp, [sentiment, toxic]), seed=9)


def zoo(architecture, flavour):
    def build(keras, objs):
        from probattn.models.zoo import build_model

        return _seeded(build_model(architecture, VOCAB, 3, 16, 16, flavour=flavour), seed=10)

    return build


def conv1d(keras, objs, flavour="3"):
    inp = _ids_input(keras)
    x = keras.layers.Embedding(VOCAB, 16, mask_zero=True)(inp)
    x = keras.layers.Conv1D(16, 3, padding="same", activation="relu", name="conv1d")(x)
    return _seeded(_classifier(keras, _ours(keras, flavour)(name="prob_attention"), inp=inp, x=x), seed=11)


def masking_after_embedding(keras, objs, flavour="3"):
    inp = _ids_input(keras)
    x = keras.layers.Embedding(VOCAB, 16, mask_zero=True)(inp)
    x = keras.layers.Masking(name="masking")(x)
    return _seeded(_classifier(keras, _ours(keras, flavour)(name="prob_attention"), inp=inp, x=x), seed=12)


def attention_gap(keras, objs):
    """keras.layers.Attention self-attention, then a masked GlobalAveragePooling1D."""
    inp = _ids_input(keras)
    x = keras.layers.Embedding(VOCAB, 16, mask_zero=True)(inp)
    x = keras.layers.Attention(name="attention")([x, x])
    return _seeded(_classifier(keras, keras.layers.GlobalAveragePooling1D(name="gap"), inp=inp, x=x), seed=13)


def masked_mean(keras, objs):
    """The same model with a masked mean that stays finite (the user's own MaskedMean)."""
    inp = _ids_input(keras)
    x = keras.layers.Embedding(VOCAB, 16, mask_zero=True)(inp)
    x = keras.layers.AdditiveAttention(name="attention")([x, x])
    return _seeded(_classifier(keras, objs["MaskedMean"](name="masked_mean"), inp=inp, x=x), seed=14)


def text_vectorization(keras, objs, flavour="3"):
    texts, _ = texts_and_labels(200, seed=99)
    tv = keras.layers.TextVectorization(max_tokens=VOCAB, output_mode="int", name="textvec")
    tv.adapt(texts)
    inp = keras.Input(shape=(1,), dtype="string", name="text")
    x = keras.layers.Embedding(VOCAB, 16, mask_zero=True, name="embedding")(tv(inp))
    return _seeded(_classifier(keras, _ours(keras, flavour)(name="prob_attention"), inp=inp, x=x), seed=15)


def mixed_precision(keras, objs, flavour="3"):
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inp = _ids_input(keras)
        x = keras.layers.Embedding(VOCAB, 16, mask_zero=True)(inp)
        x = _ours(keras, flavour)(name="prob_attention")(x)
        x = keras.layers.Dense(16, activation="relu")(x)
        out = keras.layers.Dense(3, activation="softmax", dtype="float32", name="probabilities")(x)
        model = keras.Model(inp, out)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    return _seeded(model, seed=16)


COLLECTION = [
    # ---- Keras 3 (what `from tensorflow import keras` is on TF 2.16+)
    UserModel("k3_probattn", "3", lambda k, o: probattn_model(k, o, "3"), formats=("onnx", "tflite"),
              note="probattn's own layer"),
    UserModel("k3_probattn_h5", "3", lambda k, o: probattn_model(k, o, "3"), save="h5"),
    UserModel("k3_user_probattn", "3", user_probattn, custom="keras3_objects.py",
              note="the user's own class named ProbAttention, tanh scores"),
    UserModel("k3_custom_layers", "3", custom_layers, custom="keras3_objects.py",
              note="custom layers (registered and not) and a custom activation"),
    UserModel("k3_custom_layers_h5", "3", custom_layers, save="h5", custom="keras3_objects.py"),
    UserModel("k3_subclassed", "3", subclassed, custom="keras3_objects.py", note="subclassed keras.Model"),
    UserModel("k3_fixed_length", "3", lambda k, o: fixed_length(k, o, "3"), formats=("onnx", "tflite"),
              note="Input(shape=(32,))"),
    UserModel("k3_float_ids", "3", lambda k, o: float_ids(k, o, "3"), precisions=("fp32", "fp16"),
              high_ids=True, note="float32 id input, ids past 2048"),
    UserModel("k3_seed_page", "3", seed_page, custom="seed_page.py", expect="broken", broken_at="masking",
              formats=("onnx", "tflite"), precisions=("fp32", "fp16"),
              note="the seed page's code, shape bug fixed"),
    UserModel("k3_sigmoid_binary", "3", lambda k, o: sigmoid_binary(k, o, "3"), labels=["neg", "pos"]),
    UserModel("k3_multi_label", "3", lambda k, o: multi_label(k, o, "3"), labels=["a", "b", "c", "d"]),
    UserModel("k3_multi_output", "3", lambda k, o: multi_output(k, o, "3"), note="softmax + sigmoid heads"),
    UserModel("k3_dot", "3", zoo("dot", "3"), formats=("onnx", "tflite")),
    UserModel("k3_additive", "3", zoo("additive", "3")),
    UserModel("k3_mha", "3", zoo("mha", "3"), formats=("onnx", "tflite")),
    UserModel("k3_bilstm", "3", zoo("bilstm", "3"), formats=("onnx", "tflite")),
    UserModel("k3_conv1d", "3", lambda k, o: conv1d(k, o, "3"), expect="broken", broken_at="conv1d"),
    UserModel("k3_masking", "3", lambda k, o: masking_after_embedding(k, o, "3"), expect="broken",
              broken_at="masking", note="Masking() after Embedding(mask_zero=True)"),
    UserModel("k3_attention_gap", "3", attention_gap, expect="broken", broken_at="gap",
              note="masked GlobalAveragePooling1D: NaN on an all-padding row"),
    UserModel("k3_masked_mean", "3", masked_mean, custom="keras3_objects.py",
              note="AdditiveAttention + a finite masked mean"),
    UserModel("k3_text_vectorization", "3", lambda k, o: text_vectorization(k, o, "3"), text_input=True),
    UserModel("k3_mixed_float16", "3", lambda k, o: mixed_precision(k, o, "3"), formats=("onnx", "tflite"),
              mixed=True),
    UserModel("k3_model_export", "3", lambda k, o: probattn_model(k, o, "3"), save="export",
              formats=("onnx", "tflite"), note="Keras 3 model.export() SavedModel"),
    UserModel("k3_tf_saved_model", "3", zoo("dot", "3"), save="tf_saved_model", formats=("onnx", "tflite"),
              note="tf.saved_model.save of a tf.Module around a Keras 3 model"),
    # ---- tf_keras (Keras 2)
    UserModel("tk_probattn", "2", lambda k, o: probattn_model(k, o, "2")),
    UserModel("tk_probattn_h5", "2", lambda k, o: probattn_model(k, o, "2"), save="h5"),
    UserModel("tk_user_probattn_h5", "2", user_probattn, save="h5", custom="tf_keras_objects.py"),
    UserModel("tk_mha", "2", zoo("mha", "2"), formats=("onnx", "tflite"), note="needs the mha_expand_dims rewrite"),
    UserModel("tk_bilstm", "2", zoo("bilstm", "2"), formats=("onnx", "tflite")),
    UserModel("tk_savedmodel", "2", lambda k, o: probattn_model(k, o, "2"), save="tf_keras_savedmodel"),
    UserModel("tk_conv1d", "2", lambda k, o: conv1d(k, o, "2"), expect="broken", broken_at="conv1d"),
    UserModel("tk_sigmoid_binary", "2", lambda k, o: sigmoid_binary(k, o, "2"), labels=["neg", "pos"]),
    UserModel("tk_fixed_float_seed", "2", seed_page_tf_keras, custom="tf_keras_objects.py", expect="broken",
              broken_at="masking", note="the seed page's model in tf_keras"),
]


def by_name(name: str) -> UserModel:
    return next(c for c in COLLECTION if c.name == name)


# ---------------------------------------------------------------------------- building and saving

@dataclass
class Built:
    case: UserModel
    model: object  # the user's model, in memory, with the user's classes
    path: Path  # what the user hands to probattn
    tokenizer: Path | None  # None: the model carries its own (TextVectorization)
    data: Path  # labelled texts for verify
    labels_file: Path
    texts: list

    def layer_name(self, base: str) -> str:
        """The name Keras gave the layer the case calls ``base`` (a layer built without a name
        is ``masking``, or ``masking_3`` when other models in this process took ``masking``)."""
        import re

        names = [l.name for l in getattr(self.model, "layers", [])]
        found = [n for n in names if n == base or re.fullmatch(re.escape(base) + r"_\d+", n)]
        assert len(found) == 1, (base, names)
        return found[0]


def _keras(flavour):
    from probattn.models.keras_compat import get_keras

    return get_keras(flavour)


def user_objects(case: UserModel) -> dict:
    """The user's classes, loaded the way probattn loads ``--custom-objects`` (one module per
    file per process, so a registered class is registered once)."""
    if not case.custom:
        return {}
    from probattn.export.loading import load_custom_objects

    return load_custom_objects(case.custom_path, case.flavour).objects


def build(case: UserModel, workdir: Path) -> Built:
    """Build, seed and save one case the way its user would."""
    from probattn.models.text.tokenizer import train_tokenizer

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    keras = _keras(case.flavour)
    keras.utils.set_random_seed(0)
    model = case.build(keras, user_objects(case))
    words = HIGH_WORDS if case.high_ids else None
    texts, labels = texts_and_labels(48, seed=1, words=words, labels=case.labels)
    data = workdir / "data.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for t, l in zip(texts, labels):
            f.write(json.dumps({"text": t, "label": l}) + "\n")
    labels_file = workdir / "labels.json"
    labels_file.write_text(json.dumps(case.labels))
    tok = None
    if not case.text_input:
        corpus, _ = texts_and_labels(400, seed=2, words=words)
        tokenizer = train_tokenizer(corpus, vocab_size=2700 if case.high_ids else VOCAB, max_length=64)
        tok = workdir / "tokenizer.json"
        tokenizer.save(str(tok))
    path = _save(case, model, workdir, keras)
    return Built(case, model, path, tok, data, labels_file, texts)


def _save(case, model, workdir: Path, keras) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case.save == "keras":
            path = workdir / "model.keras"
            model.save(path)
        elif case.save == "h5":
            path = workdir / "model.h5"
            model.save(path)
        elif case.save == "export":
            path = workdir / "exported"
            model.export(str(path), format="tf_saved_model", verbose=False)
        elif case.save == "tf_keras_savedmodel":
            path = workdir / "saved"
            model.save(str(path), save_format="tf")
        elif case.save == "tf_saved_model":
            import tensorflow as tf

            class Serving(tf.Module):
                def __init__(self, m):
                    super().__init__()
                    self.model = m

                @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="ids")])
                def serve(self, ids):
                    return {"scores": self.model(ids, training=False)}

            path = workdir / "tf_saved"
            module = Serving(model)
            tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
        else:
            raise ValueError(case.save)
    return path


def user_outputs(built: Built, ids=None) -> list:
    """The user's own model on the texts (or ``ids``), every output, float64."""
    import tensorflow as tf

    model = built.model
    if built.case.text_input:
        out = model(tf.constant(np.array(built.texts, dtype=object).reshape(-1, 1)), training=False)
    else:
        dtype = getattr(model, "inputs", None) and model.inputs[0].dtype
        dtype = getattr(dtype, "name", dtype) or "int32"
        out = model(tf.cast(ids, dtype), training=False)
    outs = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (list, tuple)) else [out]
    return [np.asarray(o, np.float64) for o in outs]


# ---------------------------------------------------------------------------- one run

def run(built: Built, out: Path, formats=None, precisions=None, all_formats: bool = False) -> dict:
    """export -> verify -> predict for one built case; the outcome and its figures.
    ``all_formats``: export as the CLI does without --formats/--precisions (every format;
    what cannot be built is left out and reported)."""
    from probattn.export.exporter import ExportOptions, export
    from probattn.export.parity import verify
    from probattn.export.parity.compare import decisions
    from probattn.export.predict import Predictor
    from probattn.models.text.tokenizer import encode, load_tokenizer

    case = built.case
    custom = str(case.custom_path) if case.custom else None
    opts = ExportOptions(formats=None if all_formats else tuple(formats or case.formats),
                         precisions=None if all_formats else tuple(precisions or case.precisions),
                         tokenizer=str(built.tokenizer) if built.tokenizer else None,
                         labels=str(built.labels_file), custom_objects=custom,
                         calibration_data=str(built.data))
    manifest = export(built.path, out, opts)
    report = verify(out, data=str(built.data), quiet=True, custom_objects=custom,
                    report_dir=out / "report")
    result = {"name": case.name, "flavour": case.flavour, "passed": report.passed,
              "explanations": report.meta.get("explanations", []),
              "diagnosis": report.meta.get("diagnosis") or {},
              "rows": {(r["artifact"], r["runtime"]): r["passed"] for r in report.rows},
              "failures": [c.message() for c in report.failures],
              "artifacts": [(a["format"], a["precision"]) for a in manifest["artifacts"]],
              "left_out": manifest["left_out"], "manifest": manifest}
    # the bundle, as a client uses it (onnxruntime fp32), against the user's own model
    p = Predictor(out, runtime="onnxruntime", precision="fp32")
    tok = load_tokenizer(out / "tokenizer.json")
    ids = encode(tok, built.texts, p.max_length)
    got = p.predict_outputs(ids)
    ref = user_outputs(built, _fit(ids, manifest))
    heads = manifest["heads"]
    result["max_abs"] = max(float(np.max(np.abs(got[h["output"]] - r))) for h, r in zip(heads, ref))
    result["flipped"] = int(sum(np.sum(decisions(got[h["output"]].astype(np.float64), h["kind"])
                                       != decisions(r, h["kind"])) for h, r in zip(heads, ref)))
    result["predict"] = p.predict(built.texts[:3])
    return result


def _fit(ids, manifest):
    fixed = (manifest.get("model_input") or {}).get("fixed_length")
    if fixed and ids.shape[1] < fixed:
        ids = np.pad(ids, ((0, 0), (0, fixed - ids.shape[1])))
    return ids


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")

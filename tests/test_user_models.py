"""The user-model collection (tests/user_models.py) through export -> verify -> predict.

Every model either passes with its bundle matching the user's own model (run with the
user's own classes) to ``MATCH_MAX_ABS`` with no decision flipped, or, where the model
itself breaks masking, fails verify with the diagnosis naming the layer where it starts.
Each case exports only the formats it needs (listed in the collection)."""
from __future__ import annotations

import numpy as np
import pytest

import user_models as U
from probattn.export.parity import tolerances as T


@pytest.fixture(scope="session")
def user_builds(tmp_path_factory):
    """Every model of the collection, built and saved once (tiny: building all takes seconds)."""
    root = tmp_path_factory.mktemp("user_models")
    return {case.name: U.build(case, root / case.name) for case in U.COLLECTION}


def test_collection_covers_the_issue():
    names = {c.name for c in U.COLLECTION}
    assert len(U.COLLECTION) >= 25 and len(names) == len(U.COLLECTION)
    assert {c.flavour for c in U.COLLECTION} == {"2", "3"}
    saves = {c.save for c in U.COLLECTION}
    assert saves == {"keras", "h5", "export", "tf_saved_model", "tf_keras_savedmodel"}
    assert {c.expect for c in U.COLLECTION} == {"pass", "broken"}
    for want in ("k3_user_probattn", "k3_subclassed", "k3_custom_layers", "k3_fixed_length", "k3_float_ids",
                 "k3_sigmoid_binary", "k3_multi_label", "k3_multi_output", "k3_dot", "k3_additive", "k3_mha",
                 "k3_bilstm", "k3_conv1d", "k3_masking", "k3_attention_gap", "k3_text_vectorization",
                 "k3_mixed_float16", "k3_seed_page", "k3_model_export", "k3_tf_saved_model", "tk_probattn_h5",
                 "k3_probattn_h5"):
        assert want in names, want


@pytest.fixture(scope="session")
def user_results(user_builds, tmp_path_factory):
    """export -> verify -> predict of a case, run once per session and shared."""
    root = tmp_path_factory.mktemp("user_bundles")
    cache = {}

    def get(name):
        if name not in cache:
            out = root / name
            cache[name] = (U.run(user_builds[name], out), out)
        return cache[name]

    return get


@pytest.mark.parametrize("name", [c.name for c in U.COLLECTION])
def test_user_model(name, user_builds, user_results):
    built = user_builds[name]
    case = built.case
    result, _ = user_results(name)
    summary = f"{name}: failures {result['failures'][:5]}; explanations {result['explanations']}"
    if case.expect == "broken":
        assert not result["passed"], f"{name} breaks masking but verify passed"
        layer = built.layer_name(case.broken_at)
        assert result["diagnosis"].get("starts_at") == layer, summary
        assert any(f"layer '{layer}'" in line for line in result["explanations"]), summary
        assert any(line.startswith("The Keras model itself breaks masking") for line in result["explanations"])
    else:
        assert result["passed"], summary
    # in both cases the bundle is the user's model: same outputs, same decisions
    if case.mixed:  # the user's model computes in float16; the bundle is its float32 twin
        assert result["flipped"] == 0, f"{name}: {result['flipped']} decisions differ from the mixed model"
        assert result["max_abs"] <= T.FP16_MAX_ABS, f"{name}: {result['max_abs']:.3g} from the mixed model"
        twin = result["manifest"]["adaptations"][0]
        assert twin["twin_vs_original_max_abs"] <= T.FP16_MAX_ABS
    else:
        assert result["max_abs"] <= U.MATCH_MAX_ABS, f"{name}: max |diff| {result['max_abs']:.3g} vs the user's model"
        assert result["flipped"] == 0, f"{name}: {result['flipped']} decisions differ from the user's model"
    assert result["predict"] and all("label" in r for r in result["predict"])


def test_mixed_model_bundle_matches_its_float32_self(user_builds, user_results):
    """The mixed_float16 model's bundle equals the same model run in float32 (its twin) to
    the collection's bound: the only gap to the mixed model is float16 rounding."""
    from probattn.export.loading import load_keras_model
    from probattn.export.predict import Predictor
    from probattn.models.text.tokenizer import encode, load_tokenizer

    built = user_builds["k3_mixed_float16"]
    _, out = user_results("k3_mixed_float16")
    twin = load_keras_model(out / "model.keras")
    assert all("float16" not in str(getattr(l, "compute_dtype", "")) for l in twin.layers)
    p = Predictor(out)
    ids = encode(load_tokenizer(out / "tokenizer.json"), built.texts, p.max_length)
    np.testing.assert_allclose(p.predict_ids(ids), np.asarray(twin(ids)), rtol=0, atol=U.MATCH_MAX_ABS)


def test_seed_page_is_diagnosed_not_just_failed(user_builds, user_results):
    """The seed page's code (Keras 3, shape bug fixed): verify names Masking as where masking
    breaks, names the 1e12 constant as a float16 hazard for the fp16 files, and says what the
    fp16 converters did with it."""
    built = user_builds["k3_seed_page"]
    result, _ = user_results("k3_seed_page")
    lines = "\n".join(result["explanations"])
    masking, pool = built.layer_name("masking"), built.layer_name("prob_attention")
    assert f"starting at layer '{masking}'" in lines and "recomputes the mask" in lines, lines
    assert "1e+12" in lines and f"layer '{pool}'" in lines and "model_fp16.tflite" in lines, lines
    assert result["manifest"]["model_input"] == {"dtype": "float32", "fixed_length": 40, "cast": True}


def test_float_ids_past_2048_survive_fp16(user_builds, user_results):
    """Float-typed id inputs: the fp16 ONNX must not round ids above 2048 (float16's last
    exact integer) on the way to the embedding."""
    from probattn.export.predict import Predictor
    from probattn.models.text.tokenizer import encode, load_tokenizer

    built = user_builds["k3_float_ids"]
    _, out = user_results("k3_float_ids")
    tok = load_tokenizer(out / "tokenizer.json")
    ids = encode(tok, built.texts, 64)
    assert ids.max() > 2048, "the texts must reach ids above 2048"
    odd = ids[(ids > 2048) & (ids % 2 == 1)]
    assert odd.size, "odd ids above 2048 are the ones float16 cannot hold"
    fp16 = Predictor(out, precision="fp16").predict_ids(ids)
    ref = U.user_outputs(built, ids)[0]
    np.testing.assert_allclose(fp16, ref, rtol=0, atol=T.FP16_MAX_ABS,
                               err_msg="fp16 ONNX of a float-id model is off: ids rounded?")


def test_tflite_audit_allows_only_the_lstm_loop_structure(user_results):
    """The BiLSTM's LiteRT file (the ``lstm_loop`` rewrite: two WHILE loops, five subgraphs)
    passes the byte audit; the same file with the structure bent any other way is refused."""
    import copy

    import flatbuffers

    from probattn.export.audit import tflite as A
    from probattn.export.formats.tflite_flatbuffer import schema
    from probattn.models.errors import UsageError

    result, out = user_results("k3_bilstm")
    entry = next(a for a in result["manifest"]["artifacts"] if a["format"] == "tflite" and a["precision"] == "fp32")
    blob = (out / entry["path"]).read_bytes()
    labels = result["manifest"]["labels"]
    A.audit(blob, entry, labels=labels)
    s = schema()
    model = s.ModelT.InitFromPackedBuf(bytearray(blob), 0)
    names = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}

    def op_name(op):
        code = model.operatorCodes[op.opcodeIndex]
        return names[max(code.builtinCode, code.deprecatedBuiltinCode)]

    whiles = [op for op in model.subgraphs[0].operators if op_name(op) == "WHILE"]
    assert len(model.subgraphs) == 5 and len(whiles) == 2, (len(model.subgraphs), len(whiles))
    body = whiles[0].builtinOptions.bodySubgraphIndex

    def refused(change, message):
        m = copy.deepcopy(model)
        change(m)
        b = flatbuffers.Builder(len(blob) + 4096)
        b.Finish(m.Pack(b), file_identifier=b"TFL3")
        with pytest.raises(UsageError, match=message):
            A.audit(bytes(b.Output()), entry, labels=labels)

    def code(m, name):  # the index of a new op code
        c = s.OperatorCodeT()
        c.builtinCode = getattr(s.BuiltinOperator, name)
        c.deprecatedBuiltinCode = min(c.builtinCode, s.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
        if name == "CUSTOM":
            c.customCode = "Evil"
        m.operatorCodes.append(c)
        return len(m.operatorCodes) - 1

    def set_op(m, g, name):
        m.subgraphs[g].operators[0].opcodeIndex = code(m, name)

    def while_ops(m):
        return [op for op in m.subgraphs[0].operators if op_name(op) == "WHILE"]

    def share_body(m):
        w = while_ops(m)
        w[1].builtinOptions.bodySubgraphIndex = w[0].builtinOptions.bodySubgraphIndex

    def nest(m):
        m.subgraphs[body].operators.append(copy.deepcopy(while_ops(m)[0]))

    def loop_on_model(m):
        while_ops(m)[0].builtinOptions.condSubgraphIndex = 0

    def cond_not_bool(m):
        c = m.subgraphs[while_ops(m)[0].builtinOptions.condSubgraphIndex]
        c.tensors[int(c.outputs[0])].type = s.TensorType.FLOAT32

    def signature_on_body(m):
        m.signatureDefs[0].subgraphIndex = body

    refused(lambda m: set_op(m, body, "CUSTOM"), f"subgraph {body} uses CUSTOM:Evil")
    refused(lambda m: set_op(m, body, "VAR_HANDLE"), f"subgraph {body} uses VAR_HANDLE")
    refused(lambda m: set_op(m, body, "IF"), f"subgraph {body} uses IF")
    refused(lambda m: set_op(m, 0, "CALL_ONCE"), "subgraph 0.* uses CALL_ONCE")
    refused(share_body, "each loop has its own subgraphs")
    refused(nest, "loops inside a loop's condition or body are refused")
    refused(loop_on_model, "condition is subgraph 0")
    refused(cond_not_bool, "must have one bool output")
    refused(signature_on_body, f"runs subgraph {body}")
    refused(lambda m: m.subgraphs.append(copy.deepcopy(m.subgraphs[body])), "subgraph 5 is neither")
    refused(lambda m: m.subgraphs.extend(copy.deepcopy(m.subgraphs[body]) for _ in range(A.MAX_SUBGRAPHS)),
            f"at most {A.MAX_SUBGRAPHS} allowed")

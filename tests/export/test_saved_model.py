"""`export_saved_model`: TF Serving layout, signatures, graph checks, decode signatures.

Run through `tf.saved_model.load` here; tests/export/test_serving.py runs the same artifacts
through the TF C API loader, `saved_model_cli` and the REST helper.
"""

import importlib
import os
import re

import keras
import numpy as np
import pytest
from keras import ops

from keras_favor import export
from keras_favor.export.saved_model import check_inference_ops, saved_model_signature_names
from keras_favor.layers import FavorAttention, FavorTransformerDecoder, TokenAndPositionEmbedding
from tests.export.conftest import (
    VOCAB,
    WIDTH,
    attention_model,
    language_model,
    random_ids,
    random_tokens,
    stream,
    under_policy,
)
from tests.testing import assert_close_to_scale, to_numpy

ATOL = 1e-5
DECODER_SIGNATURES = ["decode_step", "initial_state", "serve", "serving_default"]


def _signature_defs(path):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    return proto.meta_graphs[0].signature_def


def _io(signature):
    def shape(info):
        return [d.size for d in info.tensor_shape.dim]

    return (
        {name: (info.dtype, shape(info)) for name, info in signature.inputs.items()},
        {name: (info.dtype, shape(info)) for name, info in signature.outputs.items()},
    )


def _loaded_runner(path):
    import tensorflow as tf

    signatures = tf.saved_model.load(path).signatures

    def run(name, inputs):
        outputs = signatures[name](**{k: tf.constant(v) for k, v in inputs.items()})
        return {k: v.numpy() for k, v in outputs.items()}

    return run


def test_layout_and_signatures(lm_export):
    assert os.path.basename(lm_export) == "1"
    assert os.path.isfile(os.path.join(lm_export, "saved_model.pb"))
    assert os.path.isdir(os.path.join(lm_export, "variables"))
    # Nothing but the version directory: the temporary write directory is gone.
    assert os.listdir(os.path.dirname(lm_export)) == ["1"]
    assert saved_model_signature_names(lm_export) == DECODER_SIGNATURES
    defs = _signature_defs(lm_export)
    f32, i32 = 1, 3  # DataType enum
    # (S, z, the convolution's last k - 1 = 3 inputs) per block: N=2, M=16, D=8, width 16.
    state_shapes = [[-1, 2, 16, 8], [-1, 2, 16], [-1, 3, 16]] * 2
    states = {f"state_{i}": (f32, shape) for i, shape in enumerate(state_shapes)}
    assert _io(defs["serving_default"]) == (
        {"token_ids": (i32, [-1, -1])},  # dynamic batch and length
        {"logits": (f32, [-1, -1, VOCAB])},
    )
    assert _io(defs["serve"]) == _io(defs["serving_default"])
    assert _io(defs["initial_state"]) == ({"batch_size": (i32, [])}, states)
    assert _io(defs["decode_step"]) == (
        {"token_ids": (i32, [-1]), "position": (i32, [-1]), **states},
        {"logits": (f32, [-1, VOCAB]), **states},
    )


def test_public_surface():
    assert export.__all__ == [
        "DecodeSignatures",
        "TFLiteRunner",
        "export_saved_model",
        "export_tflite",
    ]
    # The tools that imitate a server live in `keras_favor.export.testing`, not beside the API.
    for name in ("SavedModelSession", "rest_predict", "saved_model_cli_run"):
        assert not hasattr(export, name)
        assert callable(getattr(importlib.import_module("keras_favor.export.testing"), name))


def test_serve_endpoint_is_serving_default(lm, lm_export):
    """`tf.saved_model.load(path).serve(inputs)`, as on a `keras.Model.export` SavedModel."""
    import tensorflow as tf

    loaded = tf.saved_model.load(lm_export)
    ids = random_ids(2, 9, seed=11)
    want = to_numpy(lm(ids))
    served = loaded.serve({"token_ids": tf.constant(ids)})
    assert sorted(served) == ["logits"]
    np.testing.assert_allclose(served["logits"], want, atol=ATOL, rtol=0)
    # The same traced function under both names, as attributes and as signatures.
    assert loaded.serve is loaded.serving_default
    got = loaded.signatures["serve"](token_ids=tf.constant(ids))["logits"]
    np.testing.assert_array_equal(got, served["logits"])


# Graph and eager runs round in another order: measured up to 2 ulps (float16) and 1 ulp
# (bfloat16) of the largest logit; allowed 4 ulps of the compute dtype, relative to that scale.
HALF_TOLERANCE = {"mixed_float16": 4 * 2.0**-10, "mixed_bfloat16": 4 * 2.0**-7}


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_saved_model(tmp_path, policy):
    """A mixed-precision model exports as it runs: the graph computes (and answers) in the compute
    dtype, and the decode signatures stream it."""
    model = under_policy(policy, language_model)
    ids = random_ids(2, 9, seed=12)
    want = to_numpy(model(ids))
    path = export.export_saved_model(model, tmp_path)
    assert saved_model_signature_names(path) == DECODER_SIGNATURES
    run = _loaded_runner(path)
    got = run("serving_default", {"token_ids": ids})["logits"]
    assert got.dtype.name == model.compute_dtype
    assert_close_to_scale(got.astype("float32"), want, HALF_TOLERANCE[policy])
    streamed = stream(run, 2, ids).astype("float32")
    assert_close_to_scale(streamed, want, HALF_TOLERANCE[policy])


@pytest.mark.parametrize("causal", [False, True])
def test_serving_default_matches_keras(attention_exports, causal):
    model, path = attention_exports[causal]
    run = _loaded_runner(path)
    for batch, length in [(1, 1), (3, 7), (2, 33)]:
        x = random_tokens(batch, length, seed=length)
        got = run("serving_default", {"tokens": x})["logits"]
        np.testing.assert_allclose(got, model(x), atol=ATOL, rtol=0)


def test_graph_has_no_random_or_qr_ops(lm_export, attention_exports):
    for path in [lm_export] + [p for _, p in attention_exports.values()]:
        op_types = check_inference_ops(path)
        bad = [op for op in op_types if re.search("Random|Qr|Multinomial|Rng", op)]
        assert not bad
        # The walk reaches into the functions, where the FAVOR math lives.
        assert "<main graph>" not in op_types["Exp"] and op_types["Exp"]


class _RandomInCall(keras.layers.Layer):
    def __init__(self, kind, **kwargs):
        super().__init__(**kwargs)
        self.kind = kind
        self.seed_generator = keras.random.SeedGenerator(1)

    def call(self, x):
        if self.kind == "normal":
            return x + keras.random.normal(ops.shape(x), seed=self.seed_generator)
        q, _ = ops.qr(ops.reshape(x[:, :4, :4], (-1, 4, 4)))
        return x + ops.sum(q)


@pytest.mark.parametrize("kind, op", [("normal", "StatelessRandomNormal"), ("qr", "Qr")])
def test_random_or_qr_op_in_graph_is_rejected(tmp_path, kind, op):
    tokens = keras.Input((None, WIDTH), name="tokens")
    model = keras.Model(tokens, _RandomInCall(kind)(tokens))
    with pytest.raises(ValueError, match=op):
        export.export_saved_model(model, tmp_path, version=1)
    assert os.listdir(tmp_path) == []  # no version (and no temporary) directory left behind


@pytest.mark.parametrize("version", [0, -1, "1", 1.0, True])
def test_invalid_version(tmp_path, version):
    with pytest.raises(ValueError, match="version"):
        export.export_saved_model(attention_model(False), tmp_path, version=version)


def test_existing_version_needs_overwrite(tmp_path):
    model = attention_model(False)
    export.export_saved_model(model, tmp_path, version=3)
    with pytest.raises(ValueError, match="version"):
        export.export_saved_model(model, tmp_path, version=3)
    other = attention_model(False, vocab=4)
    path = export.export_saved_model(other, tmp_path, version=3, overwrite=True)
    x = random_tokens(1, 5)
    np.testing.assert_allclose(
        _loaded_runner(path)("serving_default", {"tokens": x})["logits"], other(x), atol=ATOL
    )
    assert sorted(os.listdir(tmp_path)) == ["3"]


def test_invalid_model_and_decode(tmp_path):
    with pytest.raises(ValueError, match="model"):
        export.export_saved_model("not a model", tmp_path)
    with pytest.raises(ValueError, match="decode"):
        export.export_saved_model(attention_model(True), tmp_path, decode="always")
    # decode=True demands a streamable chain of FavorTransformerDecoder blocks.
    with pytest.raises(ValueError, match="FavorTransformerDecoder"):
        export.export_saved_model(attention_model(True), tmp_path, decode=True)
    # "auto": no decode signatures for a model that cannot stream.
    path = export.export_saved_model(attention_model(True), tmp_path, version=2)
    assert saved_model_signature_names(path) == ["serve", "serving_default"]


def test_decode_signatures_reproduce_forward(lm, lm_export):
    ids = random_ids(2, 9, seed=3)  # 9 positions: two full chunks of 4 and one partial
    got = stream(_loaded_runner(lm_export), 2, ids)
    np.testing.assert_allclose(got, lm(ids), atol=ATOL, rtol=0)


def test_export_after_redraw_uses_new_features(tmp_path):
    model = attention_model(False)
    x = random_tokens(2, 6)
    before = keras.ops.convert_to_numpy(model(x))
    model.get_layer("attention").redraw_random_features(seed=7)
    after = keras.ops.convert_to_numpy(model(x))
    assert np.abs(after - before).max() > 1e-3
    path = export.export_saved_model(model, tmp_path)
    got = _loaded_runner(path)("serving_default", {"tokens": x})["logits"]
    np.testing.assert_allclose(got, after, atol=ATOL, rtol=0)


def _two_in_two_out():
    queries = keras.Input((None, WIDTH), name="queries")
    context = keras.Input((None, WIDTH), name="context")
    attended = FavorAttention(2, 8, num_random_features=16, seed=2)(queries, context)
    pooled = keras.layers.GlobalAveragePooling1D()(attended)
    return keras.Model(
        {"queries": queries, "context": context}, {"attended": attended, "pooled": pooled}
    )


def test_named_inputs_and_outputs(tmp_path):
    model = _two_in_two_out()
    path = export.export_saved_model(model, tmp_path)
    inputs, outputs = _io(_signature_defs(path)["serving_default"])
    assert inputs == {"queries": (1, [-1, -1, WIDTH]), "context": (1, [-1, -1, WIDTH])}
    assert outputs == {"attended": (1, [-1, -1, WIDTH]), "pooled": (1, [-1, WIDTH])}
    feed = {"queries": random_tokens(2, 3, seed=1), "context": random_tokens(2, 8, seed=2)}
    got = _loaded_runner(path)("serving_default", feed)
    want = model(feed)
    for name in ("attended", "pooled"):
        np.testing.assert_allclose(got[name], want[name], atol=ATOL, rtol=0)


def test_decode_signatures_of_a_favor_attention_layer(tmp_path):
    """`DecodeSignatures` built by hand around `FavorAttention.get_initial_state` / `step`."""
    model = attention_model(True)
    attention, dense = model.get_layer("attention"), model.get_layer("logits")

    def step_fn(inputs, state):
        x = inputs["tokens"]  # (B, E): one position
        out, state = attention.step(x, x, state)
        return {"logits": dense(out)}, state

    decode = export.DecodeSignatures(
        attention.get_initial_state,
        step_fn,
        {"tokens": keras.InputSpec(shape=(None, WIDTH), dtype="float32")},
    )
    path = export.export_saved_model(model, tmp_path, decode=decode)
    run = _loaded_runner(path)
    x = random_tokens(2, 9, seed=5)
    state = run("initial_state", {"batch_size": np.int32(2)})
    assert sorted(state) == ["state_0", "state_1"]
    logits = []
    for t in range(9):
        outputs = run("decode_step", dict(state, tokens=x[:, t]))
        logits.append(outputs.pop("logits"))
        state = outputs
    np.testing.assert_allclose(np.stack(logits, 1), model(x), atol=ATOL, rtol=0)


def test_subclassed_model_needs_input_signature(tmp_path):
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.inner = attention_model(False)

        def call(self, x):
            return self.inner(x)

    model = Subclassed()
    x = random_tokens(1, 4)
    want = model(x)
    with pytest.raises(ValueError, match="input_signature"):
        export.export_saved_model(model, tmp_path)
    spec = {"tokens": keras.InputSpec(shape=(None, None, WIDTH), dtype="float32")}
    path = export.export_saved_model(model, tmp_path, input_signature=spec, output_names=["logits"])
    got = _loaded_runner(path)("serving_default", {"tokens": x})["logits"]
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_sequential_decoder(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((None,), dtype="int32", name="token_ids"),
            TokenAndPositionEmbedding(VOCAB, 64, WIDTH),
            FavorTransformerDecoder(32, 2, num_random_features=16, causal_chunk_size=4, seed=0),
            keras.layers.Dense(VOCAB, name="logits"),
        ]
    )
    path = export.export_saved_model(model, tmp_path)
    assert saved_model_signature_names(path) == DECODER_SIGNATURES
    run = _loaded_runner(path)
    ids = random_ids(2, 6, seed=6)
    want = model(ids)
    np.testing.assert_allclose(
        run("serving_default", {"token_ids": ids})["logits"], want, atol=ATOL
    )
    np.testing.assert_allclose(stream(run, 2, ids), want, atol=ATOL, rtol=0)

"""`export_tflite`: builtin ops only, dynamic length, decode-step signatures, quantization.

Models run with LiteRT's `Interpreter` (ai-edge-litert), as on a device.

Tolerances against the float32 Keras model (inputs ~N(0, 1)):
- float32: 1e-5 absolute (the same float32 math; measured ≤ 1.4e-6 up to length 4100).
- float16 (weights stored as float16, computed in float32): every weight is rounded with a
  relative error ≤ 2⁻¹¹ ≈ 4.9e-4, and an output passes through ~4 rounded matrices in a row
  (q/k/v, ω inside exp, output, logits): max |error| ≤ 4e-3 · max|ref|, RMS ≤ 2e-3 · RMS(ref)
  (measured ≤ 1.7e-3 and ≤ 8e-4).
- dynamic range (int8 weights per channel, activations quantized to int8 on the fly): each int8
  rounding is ≤ 1/254 of a channel's (or row's) largest value, twice per matmul over ~4 matmuls,
  so ~1-2 %: max |error| ≤ 5e-2 · max|ref|, RMS ≤ 3e-2 · RMS(ref) (measured 2.1 % and 1.7 %;
  Keras MultiHeadAttention quantized the same way measures 1.8 % / 1.6 %).
"""

import os

import keras
import numpy as np
import pytest

from keras_favor import export
from keras_favor.export.mixed_precision import float32_copy, half_precision_policies
from keras_favor.layers import FavorAttention
from tests.export.conftest import (
    WIDTH,
    attention_model,
    language_model,
    random_ids,
    random_tokens,
    stream,
    under_policy,
)

pytest.importorskip("ai_edge_litert")

ATOL = 1e-5


def _np(x):
    return keras.ops.convert_to_numpy(x)


@pytest.fixture(scope="module")
def attention_tflite(attention_exports, tmp_path_factory):
    """{causal: (model, .tflite path)} converted from the exported SavedModels."""
    tmp = tmp_path_factory.mktemp("tflite")
    return {
        causal: (model, export.export_tflite(path, tmp / f"attention_{causal}.tflite"))
        for causal, (model, path) in attention_exports.items()
    }


@pytest.fixture(scope="module")
def lm_tflite(lm_export, tmp_path_factory):
    return export.export_tflite(lm_export, tmp_path_factory.mktemp("tflite") / "lm.tflite")


@pytest.mark.parametrize("causal", [False, True])
def test_float32_matches_keras_at_any_length(attention_tflite, causal):
    model, path = attention_tflite[causal]
    runner = export.TFLiteRunner(path)
    assert runner.signature_names == ["serving_default"]
    assert runner.signature() == (["tokens"], ["logits"])
    # Lengths below, at, across chunk boundaries (chunk 4) and ≥ 4096; one interpreter.
    for batch, length in [(2, 1), (2, 7), (3, 33), (1, 4100), (2, 5)]:
        x = random_tokens(batch, length, seed=length)
        got = runner.run({"tokens": x})["logits"]
        assert got.shape == (batch, length, WIDTH)
        np.testing.assert_allclose(got, model(x), atol=ATOL, rtol=0)


def test_classic_interpreter_resize_tensor_input(attention_tflite):
    """The plain LiteRT API a device app uses: resize, allocate, set, invoke, get."""
    from ai_edge_litert.interpreter import Interpreter

    model, path = attention_tflite[True]
    interpreter = Interpreter(model_path=os.fspath(path))
    (input_detail,) = interpreter.get_input_details()
    (output_detail,) = interpreter.get_output_details()
    assert list(input_detail["shape_signature"]) == [-1, -1, WIDTH]  # dynamic batch and length
    for length in (3, 4096):
        x = random_tokens(1, length, seed=length)
        interpreter.resize_tensor_input(input_detail["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(input_detail["index"], x)
        interpreter.invoke()
        got = interpreter.get_tensor(output_detail["index"])
        np.testing.assert_allclose(got, model(x), atol=ATOL, rtol=0)


def test_language_model_full_and_decode_step(lm, lm_tflite):
    runner = export.TFLiteRunner(lm_tflite)
    assert runner.signature_names == ["decode_step", "initial_state", "serving_default"]
    inputs, outputs = runner.signature("decode_step")
    states = [f"state_{i}" for i in range(6)]  # (S, z, conv inputs) per block
    assert sorted(inputs) == ["position"] + states + ["token_ids"]
    assert sorted(outputs) == ["logits"] + states
    ids = random_ids(2, 9, seed=3)
    want = _np(lm(ids))
    np.testing.assert_allclose(runner.run({"token_ids": ids})["logits"], want, atol=ATOL, rtol=0)
    got = stream(lambda name, feed: runner.run(feed, name), 2, ids)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_left_padded_rotary_language_model(tmp_path):
    """Key padding masks (mask_zero), sine positions and RoPE: SavedModel and TFLite, full
    forward and decode steps.

    Regression: a (B, S) mask indexed as mask[:, None, :, None] became a StridedSlice adding
    two axes, which has no TFLite builtin; `favor_attention` now uses expand_dims.
    """

    model = language_model(position="sine", rotary=True, mask_zero=True)
    ids = random_ids(2, 7, seed=4)
    ids[1, :3] = 0  # left padding
    _check_decoder_exports(model, ids, tmp_path)


def _check_decoder_exports(model, ids, tmp_path):
    """SavedModel and builtin-only TFLite of a decoder LM equal Keras on the real (unpadded)
    positions of `ids`: the TFLite full forward, and decode steps through both. Returns the
    TFLite runner."""
    import tensorflow as tf

    want = _np(model(ids))
    real = ids > 0  # a padded position's output is not defined by either path
    saved_model = export.export_saved_model(model, tmp_path / "lm", decode=True)
    signatures = tf.saved_model.load(saved_model).signatures

    def run_saved_model(name, feed):
        outputs = signatures[name](**{k: tf.constant(v) for k, v in feed.items()})
        return {k: v.numpy() for k, v in outputs.items()}

    runner = export.TFLiteRunner(export.export_tflite(saved_model, tmp_path / "lm.tflite"))
    np.testing.assert_allclose(
        runner.run({"token_ids": ids})["logits"][real], want[real], atol=ATOL, rtol=0
    )
    for run in (run_saved_model, lambda name, feed: runner.run(feed, name)):
        got = stream(run, 2, ids)
        np.testing.assert_allclose(got[real], want[real], atol=ATOL, rtol=0)
    return runner


@pytest.mark.parametrize(
    "block_kwargs, num_states",
    [
        (dict(decay="retnet", causal_conv_kernel_size=3), 6),  # per block S, z, conv inputs
        (dict(local_window=3, feature_map="hedgehog"), 10),  # and the window's keys and values
    ],
    ids=["decay_conv", "local_window_hedgehog"],
)
def test_long_context_options_language_model(tmp_path, block_kwargs, num_states):
    """A decayed state with a causal convolution, or an exact local window with a learnable map
    (and the default convolution), with RoPE and left padding: `.keras` bit-exact, SavedModel and
    builtin-only TFLite, full forward and decode steps (every state array a signature tensor)."""

    model = language_model(position=None, rotary=True, mask_zero=True, **block_kwargs)
    ids = random_ids(2, 7, seed=5)
    ids[1, :2] = 0  # left padding
    model(ids)
    rng = np.random.RandomState(0)
    for layer in model.layers:  # random filters: the identity start would hide a wrong buffer
        conv = getattr(layer, "_causal_conv", None)
        if conv is not None:
            conv.kernel.assign(rng.randn(*conv.kernel.shape).astype("float32"))
    want = _np(model(ids))
    model.save(tmp_path / "lm.keras")
    np.testing.assert_array_equal(_np(keras.saving.load_model(tmp_path / "lm.keras")(ids)), want)
    runner = _check_decoder_exports(model, ids, tmp_path)
    inputs, _ = runner.signature("decode_step")
    assert sorted(inputs) == ["position"] + [f"state_{i}" for i in range(num_states)] + [
        "token_ids"
    ]


def _attention_decode(model):
    """Decode signatures of `attention_model(causal=True)` around `FavorAttention.step`."""
    attention, dense = model.get_layer("attention"), model.get_layer("logits")

    def step_fn(inputs, state):
        x = inputs["tokens"]
        out, state = attention.step(x, x, state)
        return {"logits": dense(out)}, state

    spec = keras.InputSpec(shape=(None, model.inputs[0].shape[-1]), dtype="float32")
    return export.DecodeSignatures(attention.get_initial_state, step_fn, {"tokens": spec})


@pytest.mark.parametrize(
    "quantization, dtype, max_rel, rms_rel",
    [("float16", np.float16, 4e-3, 2e-3), ("dynamic_range", np.int8, 5e-2, 3e-2)],
)
def test_quantized(tmp_path, quantization, dtype, max_rel, rms_rel):
    # Width 32, key dim 16, M=64: the q/k/v/output kernels and ω have ≥ 1024 entries, so the
    # converter quantizes them (it leaves smaller tensors in float32).
    model = attention_model(True, vocab=64, width=32, key_dim=16, num_random_features=64)
    path = export.export_tflite(
        model,
        tmp_path / "model.tflite",
        quantization=quantization,
        decode=_attention_decode(model),
    )
    runner = export.TFLiteRunner(path)
    quantized = [t for t in runner.interpreter.get_tensor_details() if t["dtype"] == dtype]
    assert len(quantized) >= 6  # q, k, v, output, logits kernels and the projection ω

    def check(got, want):
        err = np.abs(got - want)
        assert err.max() <= max_rel * np.abs(want).max()
        assert np.sqrt(np.mean(err**2)) <= rms_rel * np.sqrt(np.mean(want**2))

    for length in (7, 4100):
        x = np.random.RandomState(length).randn(1, length, 32).astype("float32")
        check(runner.run({"tokens": x})["logits"], _np(model(x)))
    x = np.random.RandomState(0).randn(2, 6, 32).astype("float32")
    state = runner.run({"batch_size": np.int32(2)}, "initial_state")
    logits = []
    for t in range(6):
        outputs = runner.run(dict(state, tokens=x[:, t]), "decode_step")
        logits.append(outputs.pop("logits"))
        state = outputs
    check(np.stack(logits, 1), _np(model(x)))


def test_every_feature_map_converts_with_builtins(tmp_path):
    """One model, one causal FavorAttention branch per feature map, one output per map."""
    keras.utils.set_random_seed(0)
    maps = ["softmax_hyperbolic", "softmax_trig", "softmax_optimal", "relu", "elu"]
    tokens = keras.Input((None, WIDTH), name="tokens")
    outputs = {}
    for i, feature_map in enumerate(maps):
        attention = FavorAttention(
            2, 8, num_random_features=16, feature_map=feature_map, causal_chunk_size=4, seed=i
        )
        outputs[feature_map] = attention(tokens, tokens, use_causal_mask=True)
    model = keras.Model(tokens, outputs)
    runner = export.TFLiteRunner(export.export_tflite(model, tmp_path / "m.tflite"))
    assert sorted(runner.signature()[1]) == sorted(maps)
    for length in (7, 33):
        x = random_tokens(2, length, seed=length)
        want = {name: _np(value) for name, value in model(x).items()}
        got = runner.run({"tokens": x})
        for feature_map in maps:
            atol = ATOL
            if feature_map == "softmax_trig":
                # Signed features make the normaliser a difference of terms that can come close
                # to zero (outputs reach 10²-10³ from unit inputs): float32 rounding, ~1e-7 of
                # the terms, is amplified by the same factor. Measured over 6 weight seeds: up
                # to 1.1e-4 of max|output|; the other maps stay within 1e-5 absolute.
                atol = 1e-3 * np.abs(want[feature_map]).max()
            np.testing.assert_allclose(
                got[feature_map], want[feature_map], atol=atol, rtol=0, err_msg=feature_map
            )


class _OuterProduct(keras.layers.Layer):
    def call(self, x):
        outer = keras.ops.einsum("bnm,bnd->bnmd", x, x)  # TFLite has no builtin for this einsum
        return keras.ops.sum(outer, axis=-1)


def test_flex_ops_fail_loudly_naming_the_op(tmp_path):
    tokens = keras.Input((None, WIDTH), name="tokens")
    model = keras.Model(tokens, _OuterProduct()(tokens))
    # The op, the Keras layer it comes from and the einsum equation are all named.
    with pytest.raises(ValueError, match=r"Einsum \(at \S*outer_product\S*\).*abc,abd->abcd"):
        export.export_tflite(model, tmp_path / "m.tflite")
    assert not os.path.exists(tmp_path / "m.tflite")


def test_flex_qr_in_a_foreign_saved_model_is_named(tmp_path):
    """A SavedModel not written by `export_saved_model` (no op check) with QR in its graph."""

    class Qr(keras.layers.Layer):
        def call(self, x):
            q, _ = keras.ops.qr(keras.ops.reshape(x[:, :4, :4], (-1, 4, 4)))
            return x + keras.ops.sum(q)

    tokens = keras.Input((None, WIDTH), name="tokens")
    keras.Model(tokens, Qr()(tokens)).export(tmp_path / "sm", verbose=False)
    with pytest.raises(ValueError, match="Qr"):
        export.export_tflite(tmp_path / "sm", tmp_path / "m.tflite")


def test_invalid_arguments(attention_tflite, tmp_path):
    model, path = attention_tflite[False]
    for quantization in ("int8", "full_integer", True):
        with pytest.raises(ValueError, match="quantization"):
            export.export_tflite(model, tmp_path / "m.tflite", quantization=quantization)
    runner = export.TFLiteRunner(path)
    with pytest.raises(ValueError, match="signature_name"):
        runner.run({"tokens": random_tokens(1, 2)}, "decode_step")
    with pytest.raises(ValueError, match="inputs"):
        runner.run({"x": random_tokens(1, 2)})


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_model_converts_as_its_float32_copy(tmp_path, policy):
    """Regression: a mixed-precision model failed conversion (float16 BatchMatMul, BiasAdd and
    MatMul have no TFLite builtin) with advice to rewrite einsums. It now converts as its float32
    copy: LiteRT gives the float32 Keras model's outputs (same weights) at float32 accuracy."""
    model = under_policy(policy, language_model)
    reference = language_model()  # the same architecture under float32, given the same weights
    reference.set_weights(model.get_weights())
    runner = export.TFLiteRunner(export.export_tflite(model, tmp_path / "lm.tflite"))
    assert runner.signature_names == ["decode_step", "initial_state", "serving_default"]
    ids = random_ids(2, 9, seed=13)
    want = _np(reference(ids))
    np.testing.assert_allclose(runner.run({"token_ids": ids})["logits"], want, atol=ATOL, rtol=0)
    got = stream(lambda name, feed: runner.run(feed, name), 2, ids)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # The model passed in and the global policy are left as they were.
    assert model.dtype_policy.name == policy
    assert model.get_layer("logits").compute_dtype == policy.removeprefix("mixed_")
    assert keras.config.dtype_policy().name == "float32"


def test_float32_copy():
    model = attention_model(True)
    assert float32_copy(model) is model  # nothing to change
    mixed = under_policy("mixed_float16", attention_model, True)
    copy = float32_copy(mixed)
    assert copy is not mixed and copy.dtype_policy.name == "float32"
    assert half_precision_policies(mixed) == ["mixed_float16"]
    assert half_precision_policies(copy) == []
    x = random_tokens(2, 5, seed=3)
    np.testing.assert_allclose(_np(copy(x)), _np(model(x)), atol=ATOL, rtol=0)


def test_half_precision_saved_model_dir_names_the_dtype(tmp_path):
    mixed = under_policy("mixed_float16", attention_model, False)
    saved_model = export.export_saved_model(mixed, tmp_path / "sm")
    with pytest.raises(ValueError, match=r"computes in float16.*dtype_policy") as error:
        export.export_tflite(saved_model, tmp_path / "m.tflite")
    assert "Rewrite" not in str(error.value)  # not the advice for ops without a builtin


def test_half_precision_with_explicit_decode_signatures_is_refused(tmp_path):
    mixed = under_policy("mixed_bfloat16", attention_model, True)
    with pytest.raises(ValueError, match="`dtype_policy`.*DecodeSignatures.*'mixed_bfloat16'"):
        export.export_tflite(mixed, tmp_path / "m.tflite", decode=_attention_decode(mixed))
    assert not os.path.exists(tmp_path / "m.tflite")


def test_half_precision_model_without_config_is_refused(tmp_path):
    class Wrapper(keras.Model):  # no get_config: its float32 copy cannot be rebuilt
        def __init__(self, inner, **kwargs):
            super().__init__(**kwargs)
            self.inner = inner

        def call(self, x):
            return self.inner(x)

    model = under_policy("mixed_float16", lambda: Wrapper(attention_model(False)))
    model(random_tokens(1, 3))
    spec = {"tokens": keras.InputSpec(shape=(None, None, WIDTH), dtype="float32")}
    with pytest.raises(ValueError, match=r"(?s)`dtype_policy`.*float32.*'mixed_float16'"):
        export.export_tflite(model, tmp_path / "m.tflite", input_signature=spec)

"""Tests of the learnable `Hedgehog` feature map: config round trip and argument errors, the
features themselves (exact identity start, positivity, per-token causal features, padding), the
random-features start against softmax attention, and the guarantees every map has inside
`FavorAttention`: ownership of the weights, fit, causality, decoding, masks, mixed precision,
`.keras` saving, SavedModel and TFLite with builtin ops only."""

import json
import os
import tempfile

import keras
import numpy as np
import pytest

from keras_favor import (
    FavorAttention,
    FavorTransformerDecoder,
    decode_step,
    feature_maps,
    initial_decode_state,
)
from keras_favor.feature_maps import FeatureMap, Hedgehog
from tests.ops import reference
from tests.testing import TestCase, data, to_numpy

tf_only = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow-specific")

B, N, L, H = 2, 3, 6, 4


def built(fmap, num_heads=N, key_dim=H, seed=None):
    """`fmap` with its weights created on a bare layer (as FavorAttention.build does)."""
    owner = keras.layers.Layer()
    owner.seed = seed
    fmap.build(owner, num_heads, key_dim)
    return fmap, owner


def head_major(scale=0.5, seed=0, length=L, key_dim=H):
    rng = np.random.default_rng(seed)
    q = (scale * rng.normal(size=(B, N, length, key_dim))).astype("float32")
    k = (scale * rng.normal(size=(B, N, length, key_dim))).astype("float32")
    return q, k


def softmax_np(u):
    e = np.exp(u - u.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Config and arguments.


NON_DEFAULT = dict(
    feature_dim=6,
    shared_query_key=True,
    use_bias=False,
    kernel_initializer="identity",
)


def test_name_and_config_round_trip():
    assert type(feature_maps.get("hedgehog")) is Hedgehog
    defaults = Hedgehog().get_config()
    assert all(defaults[k] != v for k, v in NON_DEFAULT.items())  # every argument non-default
    for fmap in (Hedgehog(**NON_DEFAULT), Hedgehog(kernel_initializer="orthogonal")):
        config = json.loads(json.dumps(feature_maps.serialize(fmap)))
        restored = feature_maps.get(config)
        assert type(restored) is Hedgehog and restored.get_config() == fmap.get_config()
    assert Hedgehog(**NON_DEFAULT).get_config() == NON_DEFAULT
    assert not Hedgehog().uses_random_features
    assert Hedgehog().output_dim(H, 256) == 2 * H
    assert Hedgehog(feature_dim=5).output_dim(H) == 10


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"feature_dim": 0}, "feature_dim"),
        ({"feature_dim": 2.0}, "feature_dim"),
        ({"shared_query_key": 1}, "shared_query_key"),
        ({"use_bias": "yes"}, "use_bias"),
        ({"kernel_initializer": "no_such_initializer"}, "kernel_initializer"),
    ],
)
def test_bad_arguments(kwargs, name):
    value = repr(next(iter(kwargs.values())))
    with pytest.raises(ValueError, match=rf"`{name}`.*Received: {name}={value}"):
        Hedgehog(**kwargs)


def test_unbuilt_map_raises():
    q, k = head_major()
    with pytest.raises(ValueError, match="build"):
        Hedgehog()(q, k)


# ---------------------------------------------------------------------------------------------
# The features.


def test_identity_start_is_softmax_of_x_and_minus_x():
    fmap, _ = built(Hedgehog(kernel_initializer="identity"))
    q, k = head_major(scale=2.0)
    q_feat, k_feat = (to_numpy(x) for x in fmap(q, k))
    np.testing.assert_allclose(q_feat, np.concatenate([softmax_np(q), softmax_np(-q)], -1), 1e-6)
    np.testing.assert_allclose(k_feat, np.concatenate([softmax_np(k), softmax_np(-k)], -1), 1e-6)


@pytest.mark.parametrize("shared", [False, True])
def test_weights_shapes_and_queries_and_keys_start_equal(shared):
    fmap, owner = built(Hedgehog(feature_dim=5, shared_query_key=shared), seed=3)
    names = [w.name for w in owner.trainable_weights]
    expected = ["hedgehog_query_kernel", "hedgehog_query_bias"]
    assert names == expected if shared else expected + ["hedgehog_key_kernel", "hedgehog_key_bias"]
    assert tuple(fmap.query_kernel.shape) == (N, H, 5)
    assert tuple(fmap.query_bias.shape) == (N, 1, 5)
    assert all(w.dtype == "float32" for w in owner.weights)
    np.testing.assert_array_equal(to_numpy(fmap.query_kernel), to_numpy(fmap.key_kernel))
    # A seeded owner gives the same start; heads differ from each other.
    again, _ = built(Hedgehog(feature_dim=5, shared_query_key=shared), seed=3)
    np.testing.assert_array_equal(to_numpy(again.query_kernel), to_numpy(fmap.query_kernel))
    kernel = to_numpy(fmap.query_kernel)
    assert not np.allclose(kernel[0], kernel[1])


@pytest.mark.parametrize("causal", [False, True])
def test_features_positive_bounded_and_each_half_sums_to_one(causal):
    fmap, _ = built(Hedgehog(feature_dim=5), seed=0)
    q, k = head_major(scale=30.0)  # far beyond float16's exp range: still bounded features
    for x in fmap(q, k, causal=causal):
        assert keras.backend.standardize_dtype(x.dtype) == "float32"
        x = to_numpy(x)
        assert x.shape == (B, N, L, 10)
        assert np.all(x >= 0) and np.all(x <= 1)
        np.testing.assert_allclose(x[..., :5].sum(-1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(x[..., 5:].sum(-1), 1.0, rtol=1e-6)


def test_features_are_per_token_and_ignore_padding():
    # No statistic over tokens: each token's features equal those computed from it alone,
    # whatever the other tokens (and padded keys) hold, causal or not.
    fmap, _ = built(Hedgehog(), seed=0)
    q, k = head_major()
    q[:, :, 3:] *= 20.0
    k[:, :, 3:] *= 20.0
    mask = np.ones((B, 1, L, 1), "float32")
    mask[:, :, 4:] = 0.0
    for causal, key_mask in ((True, None), (False, mask)):
        q_all, k_all = (to_numpy(x) for x in fmap(q, k, causal=causal, key_mask=key_mask))
        for t in (0, 2):
            q_one, k_one = (to_numpy(x) for x in fmap(q[:, :, t : t + 1], k[:, :, t : t + 1]))
            # A statistic over the x20 tokens would change features by orders of magnitude; the
            # tolerance allows the ulps of a matmul of another shape (JAX's CPU kernels).
            np.testing.assert_allclose(q_all[:, :, t : t + 1], q_one, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(k_all[:, :, t : t + 1], k_one, rtol=1e-6, atol=1e-7)


def test_random_features_start_estimates_softmax_attention():
    # softmax(xW) with W = ω·H^(-1/4): the key's denominator Σ_m exp(ω_mᵀk') estimates
    # F'·exp(‖k'‖²/2), so the start is FAVOR+ with F' features; its attention weights approach
    # softmax's as F' grows, while the identity start is another kernel. Fixed seeds; the largest
    # weight errors measured: 0.014 (F'=4096), 0.063 (F'=8), 0.068 (identity), 0.089 (uniform).
    q, k = head_major(scale=0.5, length=8, key_dim=8)
    exact = softmax_np(np.einsum("bnth,bnsh->bnts", q, k) / np.sqrt(8))

    def weights_error(fmap):
        fmap, _ = built(fmap, key_dim=8, seed=0)
        q_feat, k_feat = (to_numpy(x).astype("float64") for x in fmap(q, k))
        scores = np.einsum("bntf,bnsf->bnts", q_feat, k_feat)
        return np.abs(scores / scores.sum(-1, keepdims=True) - exact).max()

    many = weights_error(Hedgehog(feature_dim=4096))
    few = weights_error(Hedgehog(feature_dim=8))
    identity = weights_error(Hedgehog(kernel_initializer="identity"))
    assert many < 0.03 and many < few / 3 and many < identity / 3


# ---------------------------------------------------------------------------------------------
# Inside FavorAttention.


class TestHedgehogAttention(TestCase):
    @pytest.mark.heavy
    def test_layer_harness(self):
        # Config, symbolic and eager calls, a fit step that moves every weight (the map's
        # included), both mixed policies and a bit-exact `.keras` round trip.
        self.run_layer_test(
            FavorAttention,
            dict(num_heads=2, key_dim=4, feature_map=Hedgehog(feature_dim=3), seed=1),
            {"query": data(2, 5, 6), "value": data(2, 5, 6, seed=1)},
            (2, 5, 6),
            call_kwargs={"use_causal_mask": True},
            expected_num_trainable_weights=12,
            expected_num_non_trainable_weights=1,
            require_all_non_default=False,  # FavorAttention's own test covers its arguments
            # Not attributes in FavorAttention (as in MultiHeadAttention); see its tests.
            attribute_exceptions=("output_shape", "activity_regularizer"),
        )


def test_layers_own_separate_copies_of_the_map():
    fmap = Hedgehog()
    first, second = FavorAttention(2, 4, feature_map=fmap), FavorAttention(2, 4, feature_map=fmap)
    x = data(1, 3, 8)
    first(x, x)
    second(x, x)
    assert first.feature_map is not second.feature_map and first.feature_map is not fmap
    assert fmap.query_kernel is None  # the instance passed in stays unbuilt
    assert first.feature_map.query_kernel is not second.feature_map.query_kernel
    paths = [w.path for w in first.trainable_weights]
    assert first.feature_map.query_kernel.path in paths
    assert second.feature_map.query_kernel.path not in paths


def test_causal_no_leak_and_decode_steps_equal_causal_call():
    layer = FavorAttention(2, 4, value_dim=3, feature_map="hedgehog", causal_chunk_size=3, seed=0)
    x = data(2, 8, 6)
    full = to_numpy(layer(x, x, use_causal_mask=True))
    changed = x.copy()
    changed[:, 5:] = data(2, 3, 6, seed=9, scale=3.0)
    out = to_numpy(layer(changed, changed, use_causal_mask=True))
    np.testing.assert_allclose(out[:, :5], full[:, :5], rtol=1e-6, atol=1e-7)
    assert np.abs(out[:, 5:] - full[:, 5:]).max() > 1e-3
    state = layer.get_initial_state(2)
    assert tuple(state[0].shape) == (2, 2, 8, 3)
    for t in range(8):
        step, state = layer.step(x[:, t], x[:, t], state)
        np.testing.assert_allclose(to_numpy(step), full[:, t], rtol=1e-5, atol=1e-6)


def test_padding_equals_truncation_and_matches_numpy():
    layer = FavorAttention(2, 4, feature_map="hedgehog", seed=0)
    q, v = data(2, 5, 8), data(2, 6, 8, seed=1)
    mask = np.array([[1, 1, 1, 1, 0, 0]] * 2, bool)
    padded = to_numpy(layer(q, v, value_mask=mask))
    np.testing.assert_allclose(padded, to_numpy(layer(q, v[:, :4])), rtol=1e-5, atol=1e-6)
    # The same attention in float64 numpy from the layer's own projections and map weights.
    proj = [to_numpy(d(x)) for d, x in ((layer.query_dense, q), (layer.key_dense, v))]
    value = to_numpy(layer.value_dense(v))
    fmap = layer.feature_map

    def phi(x, kernel, bias):
        u = np.einsum("blnh,nhf->bnlf", x, to_numpy(kernel)) + to_numpy(bias)
        return np.concatenate([softmax_np(u), softmax_np(-u)], -1)

    q_feat = phi(proj[0], fmap.query_kernel, fmap.query_bias)
    k_feat = phi(proj[1], fmap.key_kernel, fmap.key_bias)[:, :, :4]
    out = reference.linear_attention(
        np.swapaxes(q_feat, 1, 2), np.swapaxes(k_feat, 1, 2), value[:, :4]
    )
    expected = to_numpy(layer.output_dense(out.astype("float32")))
    np.testing.assert_allclose(padded, expected, rtol=1e-4, atol=1e-5)


def test_float16_large_inputs_stay_finite():
    # Bounded features: no overflow in the sums, where exp features overflow at input scale 4.
    layer = FavorAttention(2, 4, feature_map="hedgehog", seed=0, dtype="mixed_float16")
    x = data(2, 300, 8, scale=40.0)
    for causal in (False, True):
        assert np.all(np.isfinite(to_numpy(layer(x, x, use_causal_mask=causal))))


def test_decoder_block_save_load_and_streaming_with_hedgehog():
    token_ids = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(11, 8)(token_ids)
    x = FavorTransformerDecoder(16, 2, feature_map="hedgehog", causal_chunk_size=3, seed=0)(x)
    model = keras.Model(token_ids, keras.layers.Dense(11)(x))
    ids = np.random.default_rng(0).integers(0, 11, (2, 7)).astype("int32")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(to_numpy(loaded(ids)), to_numpy(model(ids)))
    decoder = loaded.layers[2]
    assert type(decoder._self_attention_layer.feature_map) is Hedgehog
    # LNs, projections, map, FFN, the default convolution's kernel and bias.
    assert len(decoder.trainable_weights) == 4 + 8 + 4 + 4 + 2
    # Streaming decode of the loaded model, position by position, equals its full forward.
    full = to_numpy(loaded(ids))
    state = initial_decode_state(loaded, 2)
    for t in range(7):
        out, state = decode_step(loaded, ids[:, t], t, state)
        np.testing.assert_allclose(to_numpy(out), full[:, t], rtol=1e-5, atol=1e-5)


@keras.saving.register_keras_serializable(package="keras_favor_tests")
class ScaledElu(FeatureMap):
    """A user map with one trainable scale per head, written the way `Hedgehog` is."""

    def build(self, layer, num_heads, key_dim):
        self.scale = layer.add_weight(
            name="elu_scale", shape=(num_heads, 1, 1), initializer="ones", autocast=False
        )

    def features(self, x, projection_matrix=None, *, is_query):
        return keras.ops.elu(x * self.scale) + 1.0


def test_user_map_with_weights_trains_and_saves():
    inputs = keras.Input((None, 8))
    layer = FavorAttention(2, 4, feature_map=ScaledElu())
    model = keras.Model(inputs, layer(inputs, inputs))
    x, y = data(4, 5, 8), data(4, 5, 8, seed=1)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert not np.allclose(to_numpy(layer.feature_map.scale), 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(model(x)))


# ---------------------------------------------------------------------------------------------
# Export.


@tf_only
def test_saved_model_and_tflite_with_builtins_only(tmp_path):
    pytest.importorskip("ai_edge_litert")
    from keras_favor import export

    keras.utils.set_random_seed(0)
    tokens = keras.Input((None, 8), name="tokens")
    outputs = {
        f"causal_{causal}": FavorAttention(
            2, 4, feature_map="hedgehog", causal_chunk_size=4, seed=int(causal)
        )(tokens, tokens, use_causal_mask=causal)
        for causal in (False, True)
    }
    model = keras.Model(tokens, outputs)
    saved = export.export_saved_model(model, tmp_path / "sm")
    runner = export.TFLiteRunner(export.export_tflite(saved, tmp_path / "m.tflite"))
    import tensorflow as tf

    serve = tf.saved_model.load(saved).signatures["serving_default"]
    for length in (5, 13):
        x = data(2, length, 8, seed=length)
        want = {name: to_numpy(value) for name, value in model(x).items()}
        got_tflite = runner.run({"tokens": x})
        got_saved = {k: v.numpy() for k, v in serve(tokens=tf.constant(x)).items()}
        for name in want:
            np.testing.assert_allclose(got_tflite[name], want[name], atol=1e-5, rtol=0)
            np.testing.assert_allclose(got_saved[name], want[name], atol=1e-5, rtol=0)

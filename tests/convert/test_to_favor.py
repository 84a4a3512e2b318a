"""Tests of `keras_favor.convert.to_favor`: functional models with MultiHeadAttention and
keras_favor blocks built with attention_type="softmax" become FAVOR models with equal weights and
the same call arguments; outputs equal where FAVOR is exact; errors name the layer and reason."""

import os
import tempfile

import keras
import numpy as np
import pytest

from keras_favor import FavorAttention, FavorTransformerDecoder, FavorTransformerEncoder
from keras_favor.convert import to_favor
from keras_favor.feature_maps import Hedgehog, ReLU
from tests.testing import data, to_numpy

WIDTH = 8


def mha_model(causal=True, mask_zero=False):
    """ids -> Embedding -> LN -> MHA (self-attention) -> residual -> Dense, and a second MHA."""
    keras.utils.set_random_seed(0)
    ids = keras.Input((None,), dtype="int32", name="ids")
    x = keras.layers.Embedding(13, WIDTH, mask_zero=mask_zero, name="embedding")(ids)
    h = keras.layers.LayerNormalization(name="norm")(x)
    h = keras.layers.MultiHeadAttention(2, 4, bias_initializer="random_normal", name="attention_0")(
        h, h, use_causal_mask=causal
    )
    x = keras.layers.Add(name="residual")([x, h])
    # key_dim == value_dim: Keras' MultiHeadAttention on JAX fails otherwise.
    x = keras.layers.MultiHeadAttention(2, 3, output_shape=6, name="attention_1")(
        x, x, use_causal_mask=causal
    )
    return keras.Model(ids, keras.layers.Dense(13, name="logits")(x))


def ids(batch, length, seed=0):
    return np.random.default_rng(seed).integers(1, 13, (batch, length)).astype("int32")


def assert_same_weights(old_layer, new_layer):
    old = {w.path.split("/", 1)[1]: to_numpy(w) for w in old_layer.weights}
    new = {w.path.split("/", 1)[1]: to_numpy(w) for w in new_layer.weights}
    assert set(old) <= set(new)
    for path, value in old.items():
        np.testing.assert_array_equal(new[path], value, err_msg=path)
    return sorted(set(new) - set(old))


@pytest.mark.parametrize("causal", [False, True])
def test_mha_becomes_favor_attention_with_the_same_weights(causal):
    model = mha_model(causal)
    x = ids(2, 7)
    before = to_numpy(model(x))
    favor = to_favor(model, num_random_features=16, seed=3)
    assert [type(layer).__name__ for layer in favor.layers] == [
        "InputLayer",
        "Embedding",
        "LayerNormalization",
        "FavorAttention",
        "Add",
        "FavorAttention",
        "Dense",
    ]
    for old, new in zip(model.layers, favor.layers):
        assert new is not old and new.name == old.name
        extra = assert_same_weights(old, new)
        if isinstance(new, FavorAttention):
            assert extra == ["projection_matrix", "redraw_count"]
            assert new.num_random_features == 16
        else:
            assert extra == []
    attention = [favor.get_layer(f"attention_{i}") for i in range(2)]
    assert [a.seed for a in attention] == [3, 4]  # seed + i: every layer its own draw
    assert attention[1].key_dim == 3 and tuple(favor.output.shape) == (None, None, 13)
    # The original is untouched.
    assert isinstance(model.get_layer("attention_0"), keras.layers.MultiHeadAttention)
    np.testing.assert_array_equal(to_numpy(model(x)), before)


def test_outputs_equal_where_favor_is_exact():
    # Attention over one key returns its value whatever the kernel: with causal masks the first
    # position attends to itself only, and a one-token input attends to itself in both modes.
    for causal in (True, False):
        model = mha_model(causal)
        favor = to_favor(model, feature_map="hedgehog", seed=0)
        one = ids(3, 1)
        np.testing.assert_allclose(to_numpy(favor(one)), to_numpy(model(one)), atol=1e-5)
        if causal:
            x = ids(3, 6)
            np.testing.assert_allclose(
                to_numpy(favor(x))[:, 0], to_numpy(model(x))[:, 0], atol=1e-5
            )


@pytest.mark.parametrize("causal", [False, True])
def test_a_local_window_covering_the_input_keeps_the_outputs(causal):
    # The hybrid is exact softmax inside its window: with the window over the whole input the
    # converted model equals the original (MHA layers and softmax blocks alike); a narrow window
    # differs, and reaches every converted layer and block.
    model = mha_model(causal)
    x = ids(2, 7)
    want = to_numpy(model(x))
    wide = to_favor(model, feature_map="hedgehog", seed=0, local_window=7)
    np.testing.assert_allclose(to_numpy(wide(x)), want, atol=2e-6)
    narrow = to_favor(model, feature_map="softmax_positive", seed=0, local_window=2)
    assert [layer.local_window for layer in narrow.layers if isinstance(layer, FavorAttention)] == [
        2,
        2,
    ]
    assert np.abs(to_numpy(narrow(x)) - want).max() > 1e-3
    inputs = keras.Input((None, WIDTH))
    block = FavorTransformerEncoder(16, 2, attention_type="softmax", seed=1, name="encoder")
    blocks = keras.Model(inputs, block(inputs))
    converted = to_favor(blocks, feature_map="hedgehog", local_window=5)
    assert converted.get_layer("encoder").local_window == 5
    sequence = data(2, 5, WIDTH)
    np.testing.assert_allclose(to_numpy(converted(sequence)), to_numpy(blocks(sequence)), atol=2e-6)


def test_outputs_equal_a_hand_built_favor_model():
    # The same model built directly with FavorAttention and given the MHA weights.
    model = mha_model(causal=True)
    fmap = ReLU(random_features=False)
    favor = to_favor(model, feature_map=fmap, causal_chunk_size=3)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(13, WIDTH)(inputs)
    h = keras.layers.LayerNormalization()(x)
    h = FavorAttention(2, 4, feature_map=fmap, causal_chunk_size=3)(h, h, use_causal_mask=True)
    x = keras.layers.Add()([x, h])
    x = FavorAttention(2, 3, output_shape=6, feature_map=fmap, causal_chunk_size=3)(
        x, x, use_causal_mask=True
    )
    hand = keras.Model(inputs, keras.layers.Dense(13)(x))
    for old, new in zip(model.layers, hand.layers):
        new.set_weights(old.get_weights() + new.get_weights()[len(old.weights) :])
    x = ids(2, 9, seed=1)
    np.testing.assert_allclose(to_numpy(favor(x)), to_numpy(hand(x)), rtol=1e-6, atol=1e-6)


def test_keras_masks_pass_through():
    # Embedding(mask_zero=True): padded keys leave the attention (padding equals truncation);
    # a lone real token among padding attends to itself, exactly as in the softmax model.
    model = mha_model(causal=False, mask_zero=True)
    favor = to_favor(model, feature_map="hedgehog", seed=0)
    x = ids(2, 6)
    padded = np.concatenate([x, np.zeros((2, 3), "int32")], 1)
    np.testing.assert_allclose(
        to_numpy(favor(padded))[:, :6], to_numpy(favor(x)), rtol=1e-5, atol=1e-6
    )
    lone = np.array([[5, 0, 0, 0]], "int32")
    np.testing.assert_allclose(
        to_numpy(favor(lone))[:, 0], to_numpy(model(lone))[:, 0], rtol=1e-5, atol=1e-6
    )


def test_softmax_blocks_become_favor_blocks_and_save():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, WIDTH))
    x = FavorTransformerEncoder(16, 2, attention_type="softmax", seed=1, name="encoder")(inputs)
    x = FavorTransformerDecoder(
        16, 2, attention_type="softmax", use_rotary_embedding=True, seed=2, name="decoder"
    )(x)
    already = FavorTransformerEncoder(16, 2, num_random_features=8, seed=3, name="favor_block")
    model = keras.Model(inputs, already(x))
    favor = to_favor(model, feature_map=Hedgehog(feature_dim=3), causal_chunk_size=2)
    for name in ("encoder", "decoder", "favor_block"):
        old, new = model.get_layer(name), favor.get_layer(name)
        assert new.attention_type == "favor"
        extra = assert_same_weights(old, new)
        if name == "favor_block":
            assert extra == [] and type(new.feature_map).__name__ == "SoftmaxPositive"
        else:
            assert new.seed == old.seed and new.causal_chunk_size == 2
            assert extra == [
                f"self_attention/hedgehog_{role}_{kind}"
                for role in ("key", "query")
                for kind in ("bias", "kernel")
            ] + ["self_attention/redraw_count"]
    one = data(2, 1, WIDTH)
    np.testing.assert_allclose(to_numpy(favor(one)), to_numpy(model(one)), atol=1e-5)
    x = data(2, 5, WIDTH)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "favor.keras")
        favor.save(path)
        loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(to_numpy(loaded(x)), to_numpy(favor(x)))


def test_nested_functional_model_is_converted():
    inner = mha_model(causal=True)
    outer_inputs = keras.Input((None,), dtype="int32")
    outer = keras.Model(outer_inputs, keras.layers.Dense(2, name="head")(inner(outer_inputs)))
    favor = to_favor(outer, seed=0)
    converted = favor.layers[1]
    assert isinstance(converted.get_layer("attention_1"), FavorAttention)
    assert_same_weights(outer.get_layer("head"), favor.get_layer("head"))
    one = ids(2, 1)
    np.testing.assert_allclose(to_numpy(favor(one)), to_numpy(outer(one)), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Errors.


def _functional(attention, **call_kwargs):
    x = keras.Input((5, WIDTH))
    return keras.Model(x, attention(x, x, **call_kwargs))


class GatedAttention(keras.layers.MultiHeadAttention):
    pass


class Holder(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(2, 4)

    def call(self, x):
        return self.attention(x, x)


@pytest.mark.parametrize(
    "build, match",
    [
        (
            lambda: _functional(
                keras.layers.MultiHeadAttention(2, 4, name="dense_mask"),
                attention_mask=keras.ops.ones((1, 5, 5), "bool"),
            ),
            r"'dense_mask'.*dense \(batch, T, S\) attention_mask.*shape=\(1, 5, 5\)",
        ),
        (lambda: _scores_model(), r"'scores'.*return_attention_scores=True"),
        (
            lambda: _functional(GatedAttention(2, 4, name="custom")),
            r"'custom' \(GatedAttention\).*subclass of MultiHeadAttention",
        ),
        (
            lambda: _functional(keras.layers.MultiHeadAttention(2, 4, use_gate=True, name="g")),
            r"'g'.*use_gate",
        ),
        (
            lambda: keras.Model(*_holder()),
            r"'holder' \(Holder\).*MultiHeadAttention layers \['multi_head_attention",
        ),
    ],
)
def test_unconvertible_layers_are_named(build, match):
    model = build()
    with pytest.raises(ValueError, match=match):
        to_favor(model)


def _scores_model():
    x = keras.Input((5, WIDTH))
    out, scores = keras.layers.MultiHeadAttention(2, 4, name="scores")(
        x, x, return_attention_scores=True
    )
    return keras.Model(x, [out, scores])


def _holder():
    x = keras.Input((5, WIDTH))
    return x, Holder(name="holder")(x)


def test_bad_model_and_options():
    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="`model`.*functional.*Received: model="):
        to_favor(Subclassed())
    model = mha_model()
    with pytest.raises(ValueError, match=r"FAVOR options.*Received: num_heads=3"):
        to_favor(model, num_heads=3)
    with pytest.raises(ValueError, match=r"`num_random_features`.*Received: num_random_features=0"):
        to_favor(model, num_random_features=0)
    with pytest.raises(ValueError, match=r"`feature_map`.*Received: feature_map='softmax'"):
        to_favor(model, feature_map="softmax")

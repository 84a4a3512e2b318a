"""Feature maps of the user's own: the `FeatureMap` contract. A map that overrides only `features`
works (what it does not declare, `uses_random_features` and `output_dim`, is inferred by a
symbolic probe) through the non-causal and causal calls, decoding and `.keras` files, or fails when
its layer is constructed with a ValueError naming what to define."""

import os
import re
import tempfile

import keras
import numpy as np
import pytest
from keras import ops

from keras_favor import FavorAttention
from keras_favor.feature_maps import FeatureMap
from keras_favor.layers import (
    FavorTransformerDecoder,
    TokenAndPositionEmbedding,
    decode_step,
    initial_decode_state,
)
from tests.testing import data, to_numpy


@keras.saving.register_keras_serializable(package="keras_favor_user_maps")
class RandomRelu(FeatureMap):
    """The issue's reproducer: overrides only `features`, which uses the projection matrix."""

    def features(self, x, projection_matrix=None, *, is_query):
        return ops.relu(ops.matmul(x, ops.transpose(projection_matrix))) + 1e-3


@keras.saving.register_keras_serializable(package="keras_favor_user_maps")
class TwoSidedElu(FeatureMap):
    """2H features and no `output_dim`: [elu(x) + 1, elu(-x) + 1]."""

    def features(self, x, projection_matrix=None, *, is_query):
        return ops.concatenate([ops.elu(x) + 1.0, ops.elu(-x) + 1.0], axis=-1)


class DeclaredWithoutRandomFeatures(RandomRelu):
    """Declares no random features, yet uses the projection."""

    @property
    def uses_random_features(self):
        return False


class Broken(FeatureMap):
    def features(self, x, projection_matrix=None, *, is_query):
        raise RuntimeError("no features today")


class WrongOutputDim(TwoSidedElu):
    def output_dim(self, key_dim, num_random_features=None):
        return key_dim


class QueryKeyMismatch(FeatureMap):
    def features(self, x, projection_matrix=None, *, is_query):
        return ops.concatenate([x, x], axis=-1) if is_query else x


USER_MAPS = [RandomRelu, TwoSidedElu]
KEY_DIM, FEATURES = 4, 8


@pytest.mark.parametrize(
    "cls, uses_random_features, output_dim",
    [(RandomRelu, True, FEATURES), (TwoSidedElu, False, 2 * KEY_DIM)],
)
def test_undeclared_properties_are_inferred(cls, uses_random_features, output_dim):
    fmap = cls()
    assert fmap.output_dim(KEY_DIM, FEATURES) == output_dim
    assert fmap.uses_random_features is uses_random_features
    assert cls().uses_random_features is uses_random_features  # without a probe by a layer


def test_output_dim_of_a_random_map_needs_the_number_of_features():
    with pytest.raises(ValueError, match="num_random_features"):
        RandomRelu().output_dim(KEY_DIM)


@pytest.mark.parametrize("cls", USER_MAPS)
def test_layer_with_a_features_only_map(cls):
    """Non-causal and causal calls, decoding steps and a `.keras` round trip."""
    layer = FavorAttention(2, KEY_DIM, num_random_features=FEATURES, feature_map=cls(), seed=0)
    x = data(2, 7, 8)
    bidirectional = to_numpy(layer(x, x))
    assert np.all(np.isfinite(bidirectional))
    assert (layer.projection_matrix is not None) is layer.uses_random_features
    inputs = keras.Input((None, 8))
    model = keras.Model(inputs, layer(inputs, inputs, use_causal_mask=True))
    causal = model.predict(x, verbose=0)
    # Causal position 6 sees every key: it equals the bidirectional output there.
    np.testing.assert_allclose(causal[:, -1], bidirectional[:, -1], rtol=1e-5, atol=1e-6)
    state = layer.get_initial_state(2)
    for t in range(7):
        out, state = layer.step(x[:, t], x[:, t], state)
        np.testing.assert_allclose(to_numpy(out), causal[:, t], rtol=1e-4, atol=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), causal)
    assert type(loaded.layers[1].feature_map) is cls


@pytest.mark.parametrize("cls", USER_MAPS)
def test_streaming_decoder_with_a_features_only_map(cls):
    tokens = keras.Input((None,), dtype="int32")
    h = TokenAndPositionEmbedding(30, 16, 8)(tokens)
    h = FavorTransformerDecoder(16, 2, feature_map=cls(), num_random_features=FEATURES, seed=1)(h)
    model = keras.Model(tokens, keras.layers.Dense(30)(h))
    ids = np.array([[3, 14, 15, 9, 2], [6, 5, 3, 5, 8]], "int32")
    full = model.predict(ids, verbose=0)
    state = initial_decode_state(model, batch_size=2)
    for t in range(ids.shape[1]):
        logits, state = decode_step(model, ids[:, t], t, state)
        np.testing.assert_allclose(to_numpy(logits), full[:, t], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "fmap, names",
    [
        (DeclaredWithoutRandomFeatures(), ["uses_random_features"]),
        (Broken(), ["uses_random_features", "output_dim", "no features today"]),
        (QueryKeyMismatch(), ["output_dim", r"query features of shape \(1, 1, 2, 8\)"]),
    ],
    ids=["declared_no_random_features", "broken", "query_key_mismatch"],
)
def test_a_map_that_cannot_run_fails_when_the_layer_is_constructed(fmap, names):
    with pytest.raises(ValueError) as info:
        FavorAttention(2, KEY_DIM, num_random_features=FEATURES, feature_map=fmap)
    for name in names:
        assert re.search(name, str(info.value)), (name, str(info.value))


def test_a_wrong_declared_output_dim_is_named_when_decoding():
    layer = FavorAttention(2, KEY_DIM, feature_map=WrongOutputDim())
    x = data(2, 3, 8)
    layer(x, x)
    state = layer.get_initial_state(2)
    with pytest.raises(ValueError, match=r"F=8 features.*`output_dim\(key_dim"):
        layer.step(x[:, 0], x[:, 0], state)

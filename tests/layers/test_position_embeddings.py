"""Tests of the position layers: SinePositionEncoding, PositionEmbedding, RotaryEmbedding and
TokenAndPositionEmbedding (harness: config, calls, fit, mixed precision, `.keras` saving), their
values against numpy references, per-sequence offsets, masks, and RoPE's relative-position
property."""

import keras
import numpy as np
import pytest

from keras_favor.layers import (
    PositionEmbedding,
    RotaryEmbedding,
    SinePositionEncoding,
    TokenAndPositionEmbedding,
)
from tests.testing import TestCase, data, to_numpy


def tokens(*shape, vocabulary_size=20, seed=0):
    return np.random.default_rng(seed).integers(1, vocabulary_size, size=shape).astype("int32")


def sine_reference(positions, width, max_wavelength=10000.0):
    # Feature 2i: sin(p / w^(2i/E)); feature 2i+1: cos of the same angle.
    i = np.arange(width)
    angles = np.asarray(positions, "float64")[..., None] / max_wavelength ** (2 * (i // 2) / width)
    return np.where(i % 2 == 0, np.sin(angles), np.cos(angles))


def rope_reference(x, positions, max_wavelength=10000.0, scaling_factor=1.0):
    # Rotate-half RoPE as complex multiplication: (x_i + j x_{i+H/2}) e^{j p θ_i}.
    half = x.shape[-1] // 2
    theta = max_wavelength ** (-np.arange(half) * 2.0 / x.shape[-1])
    angles = np.asarray(positions, "float64")[..., None] / scaling_factor * theta  # (..., T, H/2)
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angles)
    return np.concatenate([z.real, z.imag], axis=-1)


class TestHarness(TestCase):
    def test_sine_position_encoding(self):
        self.run_layer_test(
            SinePositionEncoding,
            dict(max_wavelength=500),
            data(2, 6, 8),
            (2, 6, 8),
            require_all_non_default=True,
            run_training_check=False,  # no weights
        )

    def test_position_embedding(self):
        self.run_layer_test(
            PositionEmbedding,
            dict(sequence_length=10, initializer="he_normal"),
            data(2, 6, 8),
            (2, 6, 8),
            require_all_non_default=True,
            expected_num_trainable_weights=1,
            run_training_check=False,  # its output does not depend on the input's values
        )

    def test_rotary_embedding(self):
        self.run_layer_test(
            RotaryEmbedding,
            dict(max_wavelength=100, scaling_factor=2.0, sequence_axis=2, feature_axis=3),
            data(2, 3, 6, 8),  # (B, N, T, H)
            (2, 3, 6, 8),
            require_all_non_default=True,
            run_training_check=False,  # no weights
        )

    @pytest.mark.parametrize("position_embedding_type", ["learned", "sine", None])
    def test_token_and_position_embedding(self, position_embedding_type):
        self.run_layer_test(
            TokenAndPositionEmbedding,
            dict(
                vocabulary_size=20,
                sequence_length=12,
                embedding_dim=8,
                position_embedding_type=position_embedding_type,
                embeddings_initializer="glorot_uniform",
                mask_zero=True,
                max_wavelength=500,
            ),
            tokens(2, 6),
            (2, 6, 8),
            require_all_non_default=position_embedding_type != "learned",
            expected_num_trainable_weights=2 if position_embedding_type == "learned" else 1,
        )


def test_token_and_position_embedding_learned_all_non_default_except_type():
    # "learned" is the default type; the harness test above covers the other arguments with it.
    layer = TokenAndPositionEmbedding(20, 12, 8, embeddings_initializer="ones", mask_zero=True)
    config = layer.get_config()
    assert config["position_embedding_type"] == "learned"
    assert TokenAndPositionEmbedding.from_config(config).get_config() == config


def test_sine_values_and_offsets():
    x = data(2, 5, 6)
    layer = SinePositionEncoding(max_wavelength=1000)
    np.testing.assert_allclose(
        to_numpy(layer(x)),
        np.broadcast_to(sine_reference(np.arange(5), 6, 1000.0), (2, 5, 6)),
        atol=1e-6,
    )
    out = to_numpy(layer(x, start_index=np.array([0, 7])))  # one offset per sequence
    np.testing.assert_allclose(out[1], sine_reference(np.arange(7, 12), 6, 1000.0), atol=1e-5)
    np.testing.assert_allclose(out[0], sine_reference(np.arange(5), 6, 1000.0), atol=1e-6)
    np.testing.assert_array_equal(
        to_numpy(layer(x, start_index=3)), to_numpy(layer(np.zeros((2, 8, 6), "float32")))[:, 3:8]
    )


def test_learned_values_offsets_and_limit():
    layer = PositionEmbedding(sequence_length=8)
    x = data(2, 4, 3)
    out = to_numpy(layer(x))
    table = to_numpy(layer.position_embeddings)
    np.testing.assert_array_equal(out, np.broadcast_to(table[:4], (2, 4, 3)))
    out = to_numpy(layer(x, start_index=np.array([1, 4])))
    np.testing.assert_array_equal(out[0], table[1:5])
    np.testing.assert_array_equal(out[1], table[4:8])
    with pytest.raises(ValueError, match="sequence_length"):
        layer(data(1, 9, 3))
    with pytest.raises(ValueError, match="sequence_length"):
        layer(x, start_index=5)


def test_rotary_values_against_complex_reference():
    x = data(2, 7, 3, 8)  # (B, T, N, H)
    layer = RotaryEmbedding(max_wavelength=50, scaling_factor=1.5)
    expected = rope_reference(np.moveaxis(x, 2, 1), np.arange(7), 50.0, 1.5)  # (B, N, T, H)
    np.testing.assert_allclose(to_numpy(layer(x)), np.moveaxis(expected, 1, 2), atol=1e-5)
    # Position 0 is the identity; norms are preserved.
    np.testing.assert_array_equal(to_numpy(layer(x))[:, 0], x[:, 0])
    np.testing.assert_allclose(
        np.linalg.norm(to_numpy(layer(x)), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5
    )
    # Offsets per sequence and explicit positions agree.
    by_start = to_numpy(layer(x, start_index=np.array([2, 5])))
    by_positions = to_numpy(layer(x, positions=np.array([np.arange(2, 9), np.arange(5, 12)])))
    np.testing.assert_allclose(by_start, by_positions, atol=1e-6)
    expected = rope_reference(np.moveaxis(x, 2, 1)[1], np.arange(5, 12), 50.0, 1.5)
    np.testing.assert_allclose(by_start[1], np.moveaxis(expected, 0, 1), atol=1e-5)


def test_rotary_axes():
    x = data(2, 3, 7, 8)  # (B, N, T, H)
    moved = RotaryEmbedding(sequence_axis=2)(x)
    reference = RotaryEmbedding()(np.moveaxis(x, 2, 1))
    np.testing.assert_allclose(to_numpy(moved), np.moveaxis(to_numpy(reference), 1, 2), atol=1e-6)
    y = data(2, 8, 7)  # (B, H, T)
    moved = RotaryEmbedding(sequence_axis=2, feature_axis=1)(y)
    reference = RotaryEmbedding()(np.swapaxes(y, 1, 2))
    np.testing.assert_allclose(to_numpy(moved), np.swapaxes(to_numpy(reference), 1, 2), atol=1e-6)


def test_rotary_scores_depend_only_on_offset():
    # (R_m q)·(R_n k) = q·R_{n-m} k: the same for every pair of positions with one offset.
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(2, 16)).astype("float32")
    layer = RotaryEmbedding(max_wavelength=100)
    positions = np.arange(40)
    rq = to_numpy(layer(np.broadcast_to(q, (1, 40, 16)), positions=positions))[0]
    rk = to_numpy(layer(np.broadcast_to(k, (1, 40, 16)), positions=positions))[0]
    scores = rq @ rk.T  # scores[m, n]
    for offset in (-7, 0, 3, 25):
        diagonal = np.diagonal(scores, offset=offset)
        np.testing.assert_allclose(diagonal, np.full_like(diagonal, diagonal[0]), atol=1e-4)
    assert np.ptp([np.diagonal(scores, o)[0] for o in range(8)]) > 1e-2  # and do depend on it


def test_token_and_position_embedding_sum_mask_and_offsets():
    ids = np.array([[3, 5, 0, 0], [7, 1, 2, 9]], "int32")
    for kind in ("learned", "sine", None):
        layer = TokenAndPositionEmbedding(10, 8, 4, position_embedding_type=kind, mask_zero=True)
        out = to_numpy(layer(ids, start_index=np.array([0, 2])))
        expected = to_numpy(layer.token_embedding(ids))
        if kind is not None:
            expected = expected + to_numpy(
                layer.position_embedding(expected, start_index=np.array([0, 2]))
            )
        np.testing.assert_allclose(out, expected, atol=1e-6)
        np.testing.assert_array_equal(to_numpy(layer.compute_mask(ids)), ids != 0)
    assert TokenAndPositionEmbedding(10, None, 4, "sine").compute_mask(ids) is None
    weights = TokenAndPositionEmbedding(10, 8, 4, position_embedding_type=None)
    weights.build((None, None))
    assert len(weights.weights) == 1


def test_token_and_position_embedding_mask_in_functional_model():
    inputs = keras.Input((None,), dtype="int32")
    outputs = TokenAndPositionEmbedding(10, 8, 4, mask_zero=True)(inputs)
    mask = getattr(outputs, "_keras_mask", None)
    assert mask is not None and tuple(mask.shape) == (None, None)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: SinePositionEncoding(max_wavelength=0), "max_wavelength"),
        (lambda: PositionEmbedding(sequence_length=0), "sequence_length"),
        (lambda: PositionEmbedding(sequence_length=None), "sequence_length"),
        (lambda: RotaryEmbedding(max_wavelength=-1), "max_wavelength"),
        (lambda: RotaryEmbedding(scaling_factor=0), "scaling_factor"),
        (lambda: RotaryEmbedding(sequence_axis=1.5), "sequence_axis"),
        (lambda: RotaryEmbedding(feature_axis="last"), "feature_axis"),
        (lambda: TokenAndPositionEmbedding(0, 8, 4), "vocabulary_size"),
        (lambda: TokenAndPositionEmbedding(10, 8, 0), "embedding_dim"),
        (lambda: TokenAndPositionEmbedding(10, None, 4), "sequence_length"),
        (lambda: TokenAndPositionEmbedding(10, 8, 4, "rope"), "position_embedding_type"),
        (lambda: TokenAndPositionEmbedding(10, 8, 4, mask_zero=1), "mask_zero"),
        (lambda: TokenAndPositionEmbedding(10, 8, 4, max_wavelength=0), "max_wavelength"),
    ],
)
def test_bad_constructor_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_bad_call_arguments():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding()(data(1, 4, 2, 5))
    with pytest.raises(ValueError, match="sequence_axis"):
        RotaryEmbedding(sequence_axis=-1)(data(1, 4, 6))
    with pytest.raises(ValueError, match="start_index"):
        SinePositionEncoding()(data(2, 4, 6), start_index=np.zeros((2, 1), "int32"))

"""`FavorAttention` and the decoder block under each Keras dtype policy.

Every policy against float32 on the same weights and draws, measured against exact softmax
attention through the same projections (float64); and the layer's guarantees under each policy:
causal outputs ignore later tokens exactly, `.keras` round trips bit-exactly, streaming equals the
full forward, padding equals truncation.
"""

import os

import keras
import numpy as np
import pytest

from keras_favor import FavorAttention
from keras_favor.layers import FavorTransformerDecoder, decode_step, initial_decode_state
from tests.layers import softmax_reference
from tests.testing import data, to_numpy

# float32's guarantees have their own tests; the JAX pass runs the mixed policies only.
POLICIES = [pytest.param("float32", marks=pytest.mark.heavy), "mixed_bfloat16", "mixed_float16"]
# Relative to the output scale: a few ulps of each compute dtype.
TOLERANCE = {"float32": 1e-5, "mixed_bfloat16": 6 * 2.0**-8, "mixed_float16": 6 * 2.0**-11}


def attention_pair(policy, **kwargs):
    """A layer under `policy` and a float32 twin with the same weights, built on (2, 24, 16)."""
    x = data(2, 24, 16, scale=0.5)
    layer = FavorAttention(2, 8, num_random_features=128, seed=0, dtype=policy, **kwargs)
    twin = FavorAttention(2, 8, num_random_features=128, seed=0, **kwargs)
    layer(x, x)
    twin(x, x)
    twin.set_weights(layer.get_weights())
    return layer, twin, x


@pytest.mark.heavy
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_policy_error_against_exact_is_at_most_float32s(policy, causal):
    ratios = []
    for seed in range(3):
        layer, twin, _ = attention_pair(policy)
        x = data(2, 24, 16, scale=0.5, seed=seed + 1)
        exact = softmax_reference.attention(layer, x, x, causal=causal)

        def error(out):
            return np.linalg.norm(to_numpy(out) - exact) / np.linalg.norm(exact)

        out = layer(x, x, use_causal_mask=causal)
        assert keras.backend.standardize_dtype(out.dtype) == policy.split("_")[1]
        ratios.append(error(out) / error(twin(x, x, use_causal_mask=causal)))
    assert np.mean(ratios) <= 1.1, ratios


@pytest.mark.heavy
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_large_inputs_stay_finite_and_close_to_float32(policy):
    # Input scale 4: the regime where float16 key features overflowed when computed in float16.
    x = data(2, 16, 32, scale=4.0)
    layer = FavorAttention(4, 8, num_random_features=64, seed=0, dtype=policy)
    reference = FavorAttention(4, 8, num_random_features=64, seed=0)
    layer(x, x)
    reference(x, x)
    reference.set_weights(layer.get_weights())
    for causal in (False, True):
        out = to_numpy(layer(x, x, use_causal_mask=causal))
        expected = to_numpy(reference(x, x, use_causal_mask=causal))
        assert np.all(np.isfinite(out))
        error = np.abs(out - expected).max() / np.abs(expected).max()
        assert error < (0.02 if policy == "mixed_float16" else 0.1), error
    assert layer.projection_matrix.dtype == "float32"


@pytest.mark.parametrize("policy", POLICIES)
def test_causal_outputs_ignore_later_tokens_exactly(policy):
    layer, _, x = attention_pair(policy, causal_chunk_size=8)
    changed = x.copy()
    changed[:, 13:] = data(2, 11, 16, seed=5)
    out = to_numpy(layer(x, x, use_causal_mask=True))
    again = to_numpy(layer(changed, changed, use_causal_mask=True))
    np.testing.assert_array_equal(out[:, :13], again[:, :13])
    assert not np.array_equal(out[:, 13:], again[:, 13:])


@pytest.mark.parametrize("policy", POLICIES)
def test_padding_equals_truncation(policy):
    layer, _, x = attention_pair(policy)
    mask = np.ones((2, 24), bool)
    mask[:, 17:] = False
    padded = to_numpy(layer(x, x, attention_mask=mask[:, None, :]))
    truncated = to_numpy(layer(x, x[:, :17]))
    scale = np.abs(truncated).max()
    assert np.abs(padded - truncated).max() <= TOLERANCE[policy] * scale


@pytest.mark.parametrize("policy", POLICIES)
def test_keras_file_round_trip_is_bit_exact(policy, tmp_path):
    inputs = keras.Input((None, 16))
    block = FavorTransformerDecoder(
        intermediate_dim=32, num_heads=2, num_random_features=32, seed=0, dtype=policy
    )
    model = keras.Model(inputs, block(inputs))
    x = data(2, 20, 16)
    expected = to_numpy(model(x))
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(to_numpy(loaded(x)), expected)


@pytest.mark.parametrize("policy", POLICIES)
def test_streaming_equals_the_full_forward(policy):
    # decode_step computes in float32 under every policy; the full forward on the bfloat16 fast
    # path rounds its products: equal to the compute dtype's rounding.
    inputs = keras.Input((None, 16))
    block = FavorTransformerDecoder(
        intermediate_dim=32,
        num_heads=2,
        num_random_features=32,
        seed=0,
        decay="retnet",
        causal_conv_kernel_size=3,
        dtype=policy,
    )
    model = keras.Model(inputs, block(inputs))
    x = data(1, 12, 16)
    full = to_numpy(model(x))
    state = initial_decode_state(model, batch_size=1)
    steps = []
    for t in range(12):
        out, state = decode_step(model, x[:, t], t, state)
        steps.append(to_numpy(out))
    steps = np.stack(steps, axis=1)
    assert np.abs(steps - full).max() <= TOLERANCE[policy] * max(1.0, np.abs(full).max())

"""Tests of the per-head decay of the causal state (`decay=` of `favor_attention` and
`favor_attention_step`): exact against the float64 quadratic form with γ^(t−s) weights, over
chunk sizes, the blocked prefix over many chunks and unknown lengths; exact gradients; causality;
padding; streaming; `decay_rates`; and bad input.

Sizes are tiny (B=2, N=2, H=8, D=3), as in `test_linear_attention`.
"""

import keras
import numpy as np
import pytest

from keras_favor.ops import (
    decay_rates,
    favor_attention,
    favor_attention_step,
    favor_initial_state,
)
from tests.ops import reference
from tests.ops.test_linear_attention import (
    B,
    D,
    H,
    N,
    expected,
    favor,
    gradient_of_sum,
    inputs,
    projection_for,
)

RATES = [0.6, 0.95]  # fast enough that a wrong power of γ shows at these lengths


@pytest.mark.parametrize(
    "length,chunk_size",
    # Odd lengths, lengths not a multiple of the chunk, C = 1, C > L, and 75 and 150 chunks
    # (more than 64: the blocked prefix over chunks, with a padded last block).
    [(7, 1), (7, 3), (10, 4), (5, 128), (150, 2), (150, 1)],
)
@pytest.mark.parametrize("case", ["elu", "relu_deterministic", "user_squared"])
def test_decayed_causal_equals_the_quadratic_computation(case, length, chunk_size):
    q, k, v = inputs(length, scale=1.0)
    out = favor(case, q, k, v, None, causal=True, chunk_size=chunk_size, decay=RATES)
    want = expected(case, q, k, v, None, causal=True, decay=RATES)
    np.testing.assert_allclose(out, want, atol=2e-6)


@pytest.mark.parametrize("case", ["softmax_positive", "softmax_hyperbolic", "softmax_optimal"])
def test_random_feature_maps_with_decay_equal_their_estimator(case):
    q, k, v = inputs(11)
    w = projection_for(case)
    out = favor(case, q, k, v, w, causal=True, chunk_size=4, decay=RATES)
    np.testing.assert_allclose(out, expected(case, q, k, v, w, causal=True, decay=RATES), atol=2e-6)


def test_decay_forms_and_rate_one():
    # One number applies to every head; γ = 1 is no decay; "retnet" is decay_rates(N).
    q, k, v = inputs(9)
    plain = favor("elu", q, k, v, None, causal=True, chunk_size=4)
    np.testing.assert_allclose(
        favor("elu", q, k, v, None, causal=True, chunk_size=4, decay=1.0), plain, atol=1e-6
    )
    np.testing.assert_array_equal(
        favor("elu", q, k, v, None, causal=True, chunk_size=4, decay=0.7),
        favor("elu", q, k, v, None, causal=True, chunk_size=4, decay=[0.7, 0.7]),
    )
    np.testing.assert_array_equal(
        favor("elu", q, k, v, None, causal=True, chunk_size=4, decay="retnet"),
        favor("elu", q, k, v, None, causal=True, chunk_size=4, decay=decay_rates(N)),
    )
    # A decayed head differs from the undecayed one; the γ = 1 head is unchanged.
    mixed = favor("elu", q, k, v, None, causal=True, chunk_size=4, decay=[0.5, 1.0])
    assert np.abs(mixed[:, 2:, 0] - plain[:, 2:, 0]).max() > 1e-2
    np.testing.assert_allclose(mixed[:, :, 1], plain[:, :, 1], atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 4])
def test_gradients_equal_autodiff_of_the_quadratic_form(chunk_size):
    # The chunked core's hand-written gradient against autodiff through the explicit T×T form
    # (elu features), with a random weighting of the outputs so every output row matters.
    q, k, v = inputs(10, scale=1.0)
    rng = np.random.default_rng(3)
    weights = rng.normal(size=(B, 10, N, D)).astype("float32")
    mask = reference.decay_weights(RATES, 10).astype("float32")  # (N, T, T)
    ops = keras.ops

    def quadratic(q, k, v):
        qf, kf = ops.elu(q) + 1.0, ops.elu(k) + 1.0
        scores = ops.einsum("btnf,bsnf->bnts", qf, kf) * mask
        out = ops.einsum("bnts,bsnd->btnd", scores, v)
        return out / ops.expand_dims(ops.transpose(ops.sum(scores, -1), (0, 2, 1)), -1)

    def chunked(q, k, v):
        return favor_attention(q, k, v, "elu", causal=True, chunk_size=chunk_size, decay=RATES)

    for index in range(3):
        args = [q, k, v]

        def fn(x, f):
            return f(*args[:index], x, *args[index + 1 :]) * weights

        got = gradient_of_sum(lambda x: fn(x, chunked), args[index])
        want = gradient_of_sum(lambda x: fn(x, quadratic), args[index])
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"argument {index}")


@pytest.mark.heavy
def test_gradients_through_the_blocked_prefix():
    # 80 chunks of 1: the blocked prefix sum (and its reverse in the gradient) against the
    # single-matmul form over the same chunks (chunk 80 = one chunk, no prefix at all).
    q, k, v = inputs(80, scale=1.0)
    for index in range(3):
        args = [q, k, v]

        def run(x, chunk_size):
            a = args[:index] + [x] + args[index + 1 :]
            return favor_attention(*a, "elu", causal=True, chunk_size=chunk_size, decay=RATES)

        got = gradient_of_sum(lambda x: run(x, 1), args[index])
        want = gradient_of_sum(lambda x: run(x, 80), args[index])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=f"argument {index}")


def test_decayed_output_ignores_every_later_token():
    q, k, v = inputs(12)
    w = projection_for("softmax_positive")
    base = favor("softmax_positive", q, k, v, w, causal=True, chunk_size=4, decay=RATES)
    rng = np.random.default_rng(1)
    for t in (0, 3, 4, 7, 10):
        q2, k2, v2 = q.copy(), k.copy(), v.copy()
        for x in (q2, k2, v2):
            x[:, t + 1 :] = rng.normal(size=x[:, t + 1 :].shape)
        out = favor("softmax_positive", q2, k2, v2, w, causal=True, chunk_size=4, decay=RATES)
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6, err_msg=f"t={t}")


def test_left_padding_with_decay_matches_the_reference():
    # Padded keys leave numerator and normaliser; the decay still counts positions (a left-padded
    # sequence is the truncated one shifted: γ^(t−s) depends on differences only).
    q, k, v = inputs(9)
    mask = np.ones((B, 9), bool)
    mask[1, :4] = False
    w = projection_for("softmax_positive")
    out = favor(
        "softmax_positive",
        q,
        k,
        v,
        w,
        causal=True,
        chunk_size=4,
        key_padding_mask=mask,
        decay=RATES,
    )
    truncated = favor(
        "softmax_positive",
        q[1:, 4:],
        k[1:, 4:],
        v[1:, 4:],
        w,
        causal=True,
        chunk_size=4,
        decay=RATES,
    )
    np.testing.assert_allclose(out[1:, 4:], truncated, atol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.function is TF-only")
def test_unknown_length_with_decay_matches_eager():
    import tensorflow as tf

    spec = [tf.TensorSpec((None, None, N, w), tf.float32) for w in (H, H, D)]

    @tf.function(input_signature=spec)
    def graph_fn(q, k, v):
        return favor_attention(q, k, v, "elu", causal=True, chunk_size=2, decay=RATES)

    for length in (1, 7, 150):  # 75 chunks: the blocked prefix with a traced chunk count
        q, k, v = inputs(length, seed=length)
        eager = favor("elu", q, k, v, None, causal=True, chunk_size=2, decay=RATES)
        np.testing.assert_allclose(reference.to_numpy(graph_fn(q, k, v)), eager, atol=2e-6)
    assert graph_fn.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("decay", [RATES, "retnet", 0.9])
def test_step_with_decay_reproduces_the_causal_output(decay):
    q, k, v = inputs(11)
    w = projection_for("softmax_positive")
    full = favor("softmax_positive", q, k, v, w, causal=True, chunk_size=4, decay=decay)
    state = favor_initial_state(B, N, H, D, "softmax_positive", w.shape[0])
    shapes = [tuple(s.shape) for s in state]
    for t in range(11):
        out, state = favor_attention_step(
            q[:, t], k[:, t], v[:, t], state, "softmax_positive", w, decay=decay
        )
        np.testing.assert_allclose(reference.to_numpy(out), full[:, t], atol=1e-6)
        assert [tuple(s.shape) for s in state] == shapes  # fixed size


def test_decay_rates():
    assert decay_rates(4) == [1 - 2**-5, 1 - 2**-6, 1 - 2**-7, 1 - 2**-8]  # RetNet's
    assert decay_rates(1) == [1 - 2**-5]
    reaches = [1 / (1 - g) for g in decay_rates(5, 16, 256)]
    np.testing.assert_allclose(reaches, [16, 32, 64, 128, 256])
    assert decay_rates(3, 8, 8) == [1 - 1 / 8] * 3


# ---------------------------------------------------------------------------------------------
# Bad input


def test_decay_without_causal_names_both_arguments():
    q, k, v = inputs(5)
    with pytest.raises(ValueError, match=r"`decay`.*`causal=True`.*causal=False"):
        favor_attention(q, k, v, "elu", decay=RATES)


@pytest.mark.parametrize(
    "decay", [0.0, 1.5, -0.5, [0.9], [0.9, 0.9, 0.9], "rwkv", [0.9, "a"], True, (0.9, 1.2)]
)
def test_invalid_decay(decay):
    q, k, v = inputs(5)
    with pytest.raises(ValueError, match=r"argument `decay`.*Received: decay="):
        favor_attention(q, k, v, "elu", causal=True, decay=decay)
    state = favor_initial_state(B, N, H, D, "elu")
    with pytest.raises(ValueError, match=r"argument `decay`.*Received: decay="):
        favor_attention_step(q[:, 0], k[:, 0], v[:, 0], state, "elu", decay=decay)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"num_heads": 0}, "num_heads"),
        ({"num_heads": 2, "shortest_reach": 1}, "shortest_reach"),
        ({"num_heads": 2, "shortest_reach": 32, "longest_reach": 16}, "longest_reach"),
    ],
)
def test_invalid_decay_rates_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"argument `{name}`.*Received: {name}="):
        decay_rates(**kwargs)

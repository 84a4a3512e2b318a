"""Tests of the local exact window (`local_window=` of `favor_attention` and
`favor_attention_step`): exact against the float64 T×S form of the hybrid for every kind of map,
causal and bidirectional, over chunk sizes and window sizes; exact softmax when the window
covers the sequence; causality; padding; gradients; streaming; unknown lengths; bad input; and
that the window brings random features closer to softmax.

Sizes are tiny (B=2, N=2, H=8, D=3), as in `test_linear_attention`. The JAX pass (which compiles
every new shape) runs one representative of each test; the `heavy` rest runs on TensorFlow.
"""

import keras
import numpy as np
import pytest

from keras_favor.ops import favor_attention, favor_attention_step, favor_initial_state
from tests.ops import reference
from tests.ops.test_linear_attention import (
    B,
    D,
    H,
    N,
    gradient_of_sum,
    inputs,
    projection_for,
)
from tests.testing import assert_close_to_scale

RATES = [0.6, 0.95]
CASES = ["elu", "relu_deterministic", "user_squared", "softmax_positive", "softmax_hyperbolic"]
heavy = pytest.mark.heavy


def light_first(values, light=1):
    """`values` as pytest params, all but the first `light` of them marked heavy."""
    return [v if i < light else pytest.param(v, marks=heavy) for i, v in enumerate(values)]


def hybrid(case, q, k, v, w, **kwargs):
    out = favor_attention(q, k, v, reference.MAP_CASES[case][0], w, **kwargs)
    return reference.to_numpy(out)


def expected(case, q, k, v, w, window, **kwargs):
    _, name, ref_kwargs = reference.MAP_CASES[case]
    w = None if w is None else reference.to_numpy(w)
    return reference.hybrid_attention(name, q, k, v, w, window=window, **kwargs, **ref_kwargs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "shape",
    # (length, window, chunk): windows that do or do not divide the length, window 1 (the
    # query's own key only), a window longer than the sequence, chunks shorter and longer than
    # the window, many chunks.
    light_first([(10, 3, 4), (7, 1, 3), (9, 4, 2), (5, 8, 128), (40, 3, 2)]),
)
@pytest.mark.parametrize("case", light_first(["softmax_positive", "elu", *CASES[1:3], CASES[4]], 2))
def test_hybrid_equals_the_quadratic_computation(case, shape, causal):
    length, window, chunk_size = shape
    q, k, v = inputs(length, scale=1.0)
    w = projection_for(case)
    out = hybrid(case, q, k, v, w, causal=causal, chunk_size=chunk_size, local_window=window)
    want = expected(case, q, k, v, w, window, causal=causal)
    assert_close_to_scale(out, want, 2e-6)


@pytest.mark.parametrize("case", light_first(["softmax_positive", "elu", "softmax_optimal_rho"]))
def test_decayed_hybrid_equals_the_quadratic_computation(case):
    q, k, v = inputs(13, scale=1.0)
    w = projection_for(case)
    for window in (1, 3, 5):
        out = hybrid(case, q, k, v, w, causal=True, chunk_size=4, local_window=window, decay=RATES)
        want = expected(case, q, k, v, w, window, causal=True, decay=RATES)
        assert_close_to_scale(out, want, 2e-6)


@pytest.mark.parametrize("causal", light_first([True, False]))
@pytest.mark.parametrize("case", light_first(["softmax_positive", "elu"]))
def test_a_window_covering_the_sequence_is_exact_softmax(case, causal):
    q, k, v = inputs(9, scale=2.0)
    w = projection_for(case)
    window = 9 if causal else 5  # bidirectional: |t − s| < 5 covers 9 positions from the middle
    out = hybrid(case, q, k, v, w, causal=causal, local_window=window)
    want = reference.softmax_attention(q, k, v, causal=causal)
    if not causal:
        assert not np.allclose(out, want, atol=1e-3)  # the corners are outside the window
        out = hybrid(case, q, k, v, w, causal=False, local_window=9)
    np.testing.assert_allclose(out, want, atol=2e-6)


@pytest.mark.parametrize("causal", light_first([True, False]))
@pytest.mark.parametrize("case", light_first(["softmax_positive", "elu", "softmax_hyperbolic"]))
def test_a_window_of_one_is_the_map_alone(case, causal):
    # A window of one key (the query's own) holds no softmax to speak of: calibrated on that key,
    # the hybrid's weights are the kernel's, so the output is plain linear attention.
    q, k, v = inputs(11, scale=1.0)
    w = projection_for(case)
    plain = hybrid(case, q, k, v, w, causal=causal, chunk_size=4)
    out = hybrid(case, q, k, v, w, causal=causal, chunk_size=4, local_window=1)
    assert_close_to_scale(out, plain, 2e-6)


@heavy
def test_the_window_brings_random_features_closer_to_softmax():
    # Over several draws of ω, the hybrid's error against exact softmax is below plain FAVOR+'s,
    # and shrinks as the window grows.
    errors = {None: [], 2: [], 6: []}
    for seed in range(6):
        q, k, v = inputs(24, scale=1.5, seed=seed)
        w = projection_for("softmax_positive", seed=seed)
        want = reference.softmax_attention(q, k, v, causal=True)
        for window in errors:
            out = hybrid("softmax_positive", q, k, v, w, causal=True, local_window=window)
            errors[window].append(np.sqrt(np.mean((out - want) ** 2)))
    mean = {window: np.mean(e) for window, e in errors.items()}
    assert mean[6] < mean[2] < mean[None], mean


@pytest.mark.parametrize("case", light_first(["softmax_positive", "elu"]))
def test_causal_hybrid_ignores_every_later_token(case):
    q, k, v = inputs(12, scale=1.0)
    w = projection_for(case)
    base = hybrid(case, q, k, v, w, causal=True, chunk_size=4, local_window=3)
    for t in (0, 4, 7):
        q2, k2, v2 = (x.copy() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, t + 1 :] = np.random.default_rng(t).normal(size=x[:, t + 1 :].shape) * 3
        out = hybrid(case, q2, k2, v2, w, causal=True, chunk_size=4, local_window=3)
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6)


@pytest.mark.parametrize("causal", light_first([True, False]))
@pytest.mark.parametrize("case", light_first(["elu", "softmax_positive"]))
def test_right_padding_equals_truncation(case, causal):
    q, k, v = inputs(11, scale=1.0)
    w = projection_for(case)
    mask = np.ones((B, 11), bool)
    mask[1, 7:] = False
    padded = hybrid(case, q, k, v, w, causal=causal, local_window=3, key_padding_mask=mask)
    for b, length in ((0, 11), (1, 7)):
        alone = hybrid(
            case,
            q[b : b + 1, :length],
            k[b : b + 1, :length],
            v[b : b + 1, :length],
            w,
            causal=causal,
            local_window=3,
        )
        np.testing.assert_allclose(padded[b : b + 1, :length], alone, atol=1e-6)


def test_left_padding_matches_the_reference():
    # Padded keys keep their positions: they take window slots without weight (as with decay).
    q, k, v = inputs(10, scale=1.0)
    mask = np.ones((B, 10), bool)
    mask[0, :4] = False
    out = hybrid("elu", q, k, v, None, causal=True, local_window=3, key_padding_mask=mask)
    want = expected("elu", q, k, v, None, 3, causal=True, key_padding_mask=mask)
    np.testing.assert_allclose(out, want, atol=2e-6)


@heavy
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_equal_autodiff_of_the_quadratic_form(causal):
    # The reference in keras ops (T×S matrices), differentiated by the backend.
    q, k, v = inputs(9, scale=1.0)
    w = projection_for("softmax_positive")
    r = np.random.default_rng(5).normal(size=(B, 9, N, D)).astype("float32")

    def dense(q, k, v):
        ops = keras.ops
        q_feat, k_feat = (
            ops.transpose(x, (0, 2, 1, 3)) for x in _features("softmax_positive", q, k, w)
        )
        kernel = ops.einsum("btnf,bsnf->bnts", q_feat, k_feat)
        scores = ops.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
        lag = np.arange(9)[:, None] - np.arange(9)[None, :]
        visible = (lag >= 0) if causal else np.ones((9, 9), bool)
        near, far = visible & (np.abs(lag) < 3), visible & (np.abs(lag) >= 3)
        top = ops.max(ops.where(near, scores, -np.inf), axis=-1, keepdims=True)
        exact = ops.where(near, ops.exp(scores - top), 0.0)
        alpha = ops.sum(exact, -1, keepdims=True) / ops.sum(
            ops.where(near, kernel, 0.0), -1, keepdims=True
        )
        weights = exact + alpha * ops.where(far, kernel, 0.0)
        weights = weights / ops.sum(weights, -1, keepdims=True)
        return ops.einsum("bnts,bsnd->btnd", weights, v)

    def op(q, k, v):
        return favor_attention(q, k, v, "softmax_positive", w, causal=causal, local_window=3)

    for i, x in enumerate((q, k, v)):

        def loss(x, fn, i=i):
            args = [q, k, v]
            args[i] = x
            return fn(*args) * r

        got = gradient_of_sum(lambda x: loss(x, op), x)
        want = gradient_of_sum(lambda x: loss(x, dense), x)
        assert_close_to_scale(got, want, 1e-4)


def _features(name, q, k, w):
    from keras_favor import feature_maps

    fm = feature_maps.get(name)
    q, k = (keras.ops.transpose(keras.ops.convert_to_tensor(x), (0, 2, 1, 3)) for x in (q, k))
    return fm(q, k, w, causal=True)


@pytest.mark.parametrize("decay", light_first([RATES, None]))
@pytest.mark.parametrize("window", light_first([3, 1, 20]))
@pytest.mark.parametrize("case", light_first(["softmax_positive", "elu"]))
def test_step_reproduces_the_causal_hybrid(case, window, decay):
    q, k, v = inputs(11, scale=1.0)
    w = projection_for(case)
    full = hybrid(case, q, k, v, w, causal=True, chunk_size=4, local_window=window, decay=decay)
    m = None if w is None else w.shape[0]
    state = favor_initial_state(B, N, H, D, reference.MAP_CASES[case][0], m, local_window=window)
    shapes = [tuple(s.shape) for s in state]
    assert shapes[2:] == [(B, N, window, H), (B, N, window, D + 1)]
    for t in range(11):
        out, state = favor_attention_step(
            q[:, t],
            k[:, t],
            v[:, t],
            state,
            reference.MAP_CASES[case][0],
            w,
            decay=decay,
            local_window=window,
        )
        np.testing.assert_allclose(reference.to_numpy(out), full[:, t], atol=2e-6)
        assert [tuple(s.shape) for s in state] == shapes  # fixed size


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.function is TF-only")
@pytest.mark.parametrize("causal", [False, True])
def test_unknown_length_in_tf_function_matches_eager(causal):
    import tensorflow as tf

    spec = [tf.TensorSpec((None, None, N, d), tf.float32) for d in (H, H, D)]

    @tf.function(input_signature=spec)
    def graph_fn(q, k, v):
        return favor_attention(q, k, v, "elu", causal=causal, chunk_size=4, local_window=3)

    for length in (1, 3, 7, 13):
        q, k, v = inputs(length, seed=length)
        eager = hybrid("elu", q, k, v, None, causal=causal, chunk_size=4, local_window=3)
        assert_close_to_scale(reference.to_numpy(graph_fn(q, k, v)), eager, 1e-5)
    assert graph_fn.experimental_get_tracing_count() == 1


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("window", [0, -2, 2.5, "3", True])
def test_invalid_local_window(window):
    q, k, v = inputs(5)
    with pytest.raises(ValueError, match=r"local_window.*Received"):
        favor_attention(q, k, v, "elu", local_window=window)


def test_local_window_needs_equal_lengths():
    q, _, _ = inputs(5)
    _, k, v = inputs(7)
    with pytest.raises(ValueError, match=r"local_window=2.*query.shape=\(2, 5, 2, 8\)"):
        favor_attention(q, k, v, "elu", local_window=2)


def test_step_state_must_match_the_window():
    q, k, v = inputs(1)
    plain = favor_initial_state(B, N, H, D, "elu")
    with pytest.raises(ValueError, match=r"4 arrays.*local_window=3.*length 2"):
        favor_attention_step(q[:, 0], k[:, 0], v[:, 0], plain, "elu", local_window=3)
    state = favor_initial_state(B, N, H, D, "elu", local_window=3)
    with pytest.raises(ValueError, match=r"K must have shape \(2, 2, 4, 8\).*\(2, 2, 3, 8\)"):
        favor_attention_step(q[:, 0], k[:, 0], v[:, 0], state, "elu", local_window=4)

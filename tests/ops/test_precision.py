"""The op under each compute dtype: the bfloat16 fast path, float16's float32 fallback, the
`matmul_dtype` argument.

Errors are measured against exact softmax attention (float64) on the same random draws, for
float32 and for each low-precision input; the fast path may cost at most 1.1× float32's error
(bfloat16 rounding of logits and products against the estimator's own Monte-Carlo error).
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_favor.ops import favor_attention, random_features_matrix
from tests.ops.reference import softmax_attention, to_numpy

FAST_MAPS = ("softmax_positive", "softmax_hyperbolic", "softmax_optimal")


def inputs(length=64, heads=2, dim=16, scale=0.5, seed=0):
    rng = np.random.default_rng(seed)
    q, k = (rng.normal(scale=scale, size=(2, length, heads, dim)).astype("float32") for _ in "qk")
    v = rng.normal(size=(2, length, heads, dim)).astype("float32")
    return q, k, v


def as_dtype(arrays, dtype):
    return [ops.cast(x, dtype) for x in arrays]


def relative_error(out, exact):
    return np.linalg.norm(to_numpy(out) - exact) / np.linalg.norm(exact)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", FAST_MAPS)
def test_bfloat16_fast_path_error_is_at_most_float32s(name, causal):
    q, k, v = inputs()
    exact = softmax_attention(q, k, v, causal=causal)
    ratios = []
    for seed in range(3):
        w = random_features_matrix(128, q.shape[-1], seed=seed)
        err32 = relative_error(favor_attention(q, k, v, name, w, causal=causal), exact)
        low = favor_attention(*as_dtype((q, k, v), "bfloat16"), name, w, causal=causal)
        assert keras.backend.standardize_dtype(low.dtype) == "bfloat16"
        ratios.append(relative_error(low, exact) / err32)
    assert np.mean(ratios) <= 1.1, ratios


@pytest.mark.parametrize("causal", [False, True])
def test_fast_path_differs_from_float32_by_bfloat16_rounding(causal):
    # Same bfloat16 inputs, the fast path against float32 throughout: different (the products
    # are rounded) but within a few bfloat16 ulps of the output scale.
    q, k, v = as_dtype(inputs(), "bfloat16")
    w = random_features_matrix(64, 16, seed=1)
    fast = to_numpy(favor_attention(q, k, v, "softmax_positive", w, causal=causal))
    full = to_numpy(
        favor_attention(q, k, v, "softmax_positive", w, causal=causal, matmul_dtype="float32")
    )
    difference = np.abs(fast - full).max() / np.abs(full).max()
    assert 0 < difference < 4 * 2.0**-8, difference


def test_float32_inputs_take_the_fast_path_only_when_asked():
    q, k, v = inputs()
    w = random_features_matrix(64, 16, seed=1)
    default = to_numpy(favor_attention(q, k, v, "softmax_positive", w))
    forced = to_numpy(favor_attention(q, k, v, "softmax_positive", w, matmul_dtype="float32"))
    np.testing.assert_array_equal(default, forced)
    fast = favor_attention(q, k, v, "softmax_positive", w, matmul_dtype="bfloat16")
    assert keras.backend.standardize_dtype(fast.dtype) == "float32"
    assert 0 < np.abs(to_numpy(fast) - default).max() < 4 * 2.0**-8 * np.abs(default).max()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["softmax_positive", "relu", "elu", "softmax_trig"])
def test_float16_inputs_compute_in_float32(name, causal):
    # float16 has no fast path: the result is the float32 computation on the float16-rounded
    # inputs, rounded to float16 at the end, exactly.
    q16, k16, v16 = as_dtype(inputs(), "float16")
    w = random_features_matrix(32, 16, seed=2) if name not in ("elu",) else None
    out = favor_attention(q16, k16, v16, name, w, causal=causal)
    assert keras.backend.standardize_dtype(out.dtype) == "float16"
    reference = favor_attention(*as_dtype((q16, k16, v16), "float32"), name, w, causal=causal)
    np.testing.assert_array_equal(to_numpy(out), to_numpy(ops.cast(reference, "float16")))


@pytest.mark.parametrize("name", ["relu", "elu", "softmax_trig"])
def test_maps_without_fast_path_compute_bfloat16_inputs_in_float32(name):
    q, k, v = as_dtype(inputs(), "bfloat16")
    w = None if name == "elu" else random_features_matrix(32, 16, seed=2)
    out = favor_attention(q, k, v, name, w, causal=True)
    reference = favor_attention(*as_dtype((q, k, v), "float32"), name, w, causal=True)
    np.testing.assert_array_equal(to_numpy(out), to_numpy(ops.cast(reference, "bfloat16")))


@pytest.mark.parametrize("causal", [False, True])
def test_fast_path_gradients_match_float32(causal):
    q, k, v = inputs(length=40)
    w = random_features_matrix(64, 16, seed=3)

    def grads(matmul_dtype):
        def loss(q, k, v):
            out = favor_attention(
                q, k, v, "softmax_positive", w, causal=causal, matmul_dtype=matmul_dtype
            )
            return ops.sum(ops.square(out))

        return [to_numpy(g) for g in _gradients(loss, [q, k, v])]

    for fast, full in zip(grads("bfloat16"), grads("float32")):
        assert np.all(np.isfinite(fast))
        assert np.abs(fast - full).max() < 0.05 * np.abs(full).max()


def _gradients(fn, args):
    backend = keras.backend.backend()
    args = [ops.convert_to_tensor(a) for a in args]
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(args)
            value = fn(*args)
        return tape.gradient(value, args)
    if backend == "jax":
        import jax

        return jax.grad(fn, argnums=(0, 1, 2))(*args)
    pytest.skip(f"no gradient helper for {backend}")


@pytest.mark.heavy
def test_fast_path_with_decay_and_padding_keeps_exact_identities():
    # Causal outputs at t ignore later tokens, and padding equals truncation, on the fast path.
    q, k, v = as_dtype(inputs(length=50), "bfloat16")
    w = random_features_matrix(64, 16, seed=4)
    out = to_numpy(favor_attention(q, k, v, "softmax_positive", w, causal=True, decay="retnet"))
    changed = [ops.concatenate([x[:, :30], ops.flip(x[:, 30:], axis=1)], axis=1) for x in (q, k, v)]
    again = to_numpy(
        favor_attention(*changed, "softmax_positive", w, causal=True, decay="retnet", chunk_size=16)
    )
    first = to_numpy(
        favor_attention(q, k, v, "softmax_positive", w, causal=True, decay="retnet", chunk_size=16)
    )
    np.testing.assert_array_equal(again[:, :30], first[:, :30])
    assert np.abs(first - out).max() < 4 * 2.0**-8 * np.abs(out).max()  # chunk sizes agree
    mask = np.ones((2, 50), bool)
    mask[:, 40:] = False
    padded = to_numpy(favor_attention(q, k, v, "softmax_positive", w, key_padding_mask=mask))
    truncated = to_numpy(
        favor_attention(q, k[:, :40], v[:, :40], "softmax_positive", w)  # same real keys
    )
    assert np.abs(padded - truncated).max() < 4 * 2.0**-8 * np.abs(truncated).max()


@pytest.mark.parametrize(
    "matmul_dtype, match",
    [("float16", "float16 cannot hold"), ("int8", "matmul_dtype"), (True, "matmul_dtype")],
)
def test_bad_matmul_dtype(matmul_dtype, match):
    q, k, v = inputs(length=8)
    w = random_features_matrix(8, 16, seed=0)
    with pytest.raises(ValueError, match=match):
        favor_attention(q, k, v, "softmax_positive", w, matmul_dtype=matmul_dtype)


def test_fast_path_requested_for_a_map_without_one():
    q, k, v = inputs(length=8)
    with pytest.raises(ValueError, match="matmul_dtype='bfloat16'.*feature_map=ELU"):
        favor_attention(q, k, v, "elu", None, matmul_dtype="bfloat16")

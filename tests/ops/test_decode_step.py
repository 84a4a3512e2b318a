"""Tests of `favor_initial_state` and `favor_attention_step`: decoding one position at a time with a
fixed-size state reproduces the causal full-sequence output at every position."""

import keras
import numpy as np
import pytest

from keras_favor import feature_maps
from keras_favor.ops import (
    favor_attention,
    favor_attention_step,
    favor_initial_state,
    random_features_matrix,
)
from tests.ops import reference

B, N, H, D, M = 2, 2, 8, 3, 16


def setup_case(case, length=7, scale=0.5, seed=0):
    identifier = reference.MAP_CASES[case][0]
    rng = np.random.default_rng(seed)
    q = (scale * rng.normal(size=(B, length, N, H))).astype("float32")
    k = (scale * rng.normal(size=(B, length, N, H))).astype("float32")
    v = rng.normal(size=(B, length, N, D)).astype("float32")
    fmap = feature_maps.get(identifier)
    w = random_features_matrix(M, H, seed=seed) if fmap.uses_random_features else None
    return identifier, fmap, q, k, v, w


def decode(identifier, q, k, v, w, num_random_features=M):
    state = favor_initial_state(B, N, H, D, identifier, num_random_features)
    outputs = []
    for t in range(q.shape[1]):
        out, state = favor_attention_step(q[:, t], k[:, t], v[:, t], state, identifier, w)
        outputs.append(reference.to_numpy(out))
    return np.stack(outputs, axis=1), state  # (B, L, N, D)


@pytest.mark.parametrize(
    "case",
    [
        "softmax_positive",
        "softmax_hyperbolic",
        "softmax_optimal",
        "softmax_trig",
        "relu",
        "relu_deterministic",
        "elu",
        "user_squared",
    ],
)
def test_step_reproduces_the_causal_output_at_every_position(case):
    identifier, _, q, k, v, w = setup_case(case)
    full = reference.to_numpy(favor_attention(q, k, v, identifier, w, causal=True, chunk_size=3))
    stepped, _ = decode(identifier, q, k, v, w)
    np.testing.assert_allclose(stepped, full, atol=1e-5)


@pytest.mark.parametrize("case", ["softmax_positive", "softmax_optimal", "elu"])
def test_step_reproduces_the_causal_output_with_large_inputs(case):
    # Inputs ×4 (‖q·H^(-1/4)‖² ≈ 11): the fixed causal key stabiliser keeps step and full equal.
    identifier, _, q, k, v, w = setup_case(case, scale=2.0, seed=1)
    full = reference.to_numpy(favor_attention(q, k, v, identifier, w, causal=True, chunk_size=4))
    stepped, _ = decode(identifier, q, k, v, w)
    np.testing.assert_allclose(stepped, full, atol=1e-5 * max(1.0, np.abs(full).max()))


@pytest.mark.parametrize("case", list(reference.MAP_CASES))
def test_initial_state_is_zero_and_fixed_size(case):
    identifier, fmap, q, k, v, w = setup_case(case, length=5)
    num_features = fmap.output_dim(H, M)
    expected_features = {
        "softmax_hyperbolic": 2 * M,
        "softmax_trig": 2 * M,
        "relu_deterministic": H,
        "elu": H,
        "user_squared": H,
    }.get(case, M)
    assert num_features == expected_features
    s, z = favor_initial_state(B, N, H, D, identifier, M)
    assert tuple(s.shape) == (B, N, num_features, D) and tuple(z.shape) == (B, N, num_features)
    for x in (s, z):
        assert keras.backend.standardize_dtype(x.dtype) == "float32"
        np.testing.assert_array_equal(reference.to_numpy(x), 0.0)
    _, (s2, z2) = decode(identifier, q, k, v, w)
    assert tuple(s2.shape) == tuple(s.shape) and tuple(z2.shape) == tuple(z.shape)  # no growth
    assert keras.backend.standardize_dtype(s2.dtype) == "float32"


def test_state_holds_the_feature_sums():
    # With the deterministic elu map, S = Σ φ(k_t) v_tᵀ and z = Σ φ(k_t) exactly.
    identifier, _, q, k, v, w = setup_case("elu", length=4)
    _, (s, z) = decode(identifier, q, k, v, w)
    phi_k = reference.features("elu", k)  # (B, L, N, H)
    np.testing.assert_allclose(reference.to_numpy(z), phi_k.sum(1), atol=1e-5)
    np.testing.assert_allclose(
        reference.to_numpy(s), np.einsum("blnf,blnd->bnfd", phi_k, v), atol=1e-5
    )


def test_deterministic_map_needs_no_num_random_features():
    s, z = favor_initial_state(B, N, H, D, "elu")
    assert tuple(s.shape) == (B, N, H, D) and tuple(z.shape) == (B, N, H)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_step_output_in_the_query_dtype(dtype):
    identifier, _, q, k, v, w = setup_case("softmax_positive", length=1)
    state = favor_initial_state(B, N, H, D, identifier, M)
    out, (s, z) = favor_attention_step(
        keras.ops.cast(q[:, 0], dtype),
        keras.ops.cast(k[:, 0], dtype),
        keras.ops.cast(v[:, 0], dtype),
        state,
        identifier,
        w,
    )
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    assert keras.backend.standardize_dtype(s.dtype) == "float32"
    assert np.all(np.isfinite(reference.to_numpy(out)))


# ---------------------------------------------------------------------------------------------
# Bad input


def step_args(case="softmax_positive"):
    identifier, _, q, k, v, w = setup_case(case, length=1)
    state = favor_initial_state(B, N, H, D, identifier, M)
    return dict(
        query=q[:, 0],
        key=k[:, 0],
        value=v[:, 0],
        state=state,
        feature_map=identifier,
        projection_matrix=w,
    )


@pytest.mark.parametrize("case", ["softmax_positive", "softmax_hyperbolic"])
def test_initial_state_of_a_random_map_needs_num_random_features(case):
    with pytest.raises(ValueError, match="num_random_features=None"):
        favor_initial_state(B, N, H, D, case)


@pytest.mark.parametrize("value", [0, -2, 1.5])
def test_initial_state_with_non_positive_num_random_features(value):
    with pytest.raises(ValueError, match=f"num_random_features={value!r}"):
        favor_initial_state(B, N, H, D, "softmax_positive", value)


def test_initial_state_with_unknown_feature_map():
    with pytest.raises(ValueError, match="feature_map='nope'"):
        favor_initial_state(B, N, H, D, "nope", M)


@pytest.mark.parametrize(
    "state",
    [
        "not a state",
        None,
        (np.zeros((B, N, M, D), "float32"),),
        (np.zeros((B, N, M, D), "float32"),) * 3,
    ],
)
def test_step_with_a_state_that_is_not_a_pair(state):
    args = step_args()
    args["state"] = state
    with pytest.raises(ValueError, match="state"):
        favor_attention_step(**args)


@pytest.mark.parametrize(
    "shapes",
    [
        ((B, N, M + 1, D), (B, N, M + 1)),  # features of another M
        ((B, N, 2 * M, D), (B, N, 2 * M)),  # a hyperbolic state for a positive map
        ((B, N, M, D + 1), (B, N, M)),  # another value dim
        ((B, N, M), (B, N, M)),  # S of the wrong rank
        ((B, N, M, D), (B, N, M, 1)),  # z of the wrong rank
        ((B, N, M, D), (B, N, M + 1)),  # z disagrees with S
        ((B, N + 1, M, D), (B, N + 1, M)),  # another number of heads
    ],
)
def test_step_with_a_state_of_the_wrong_shape(shapes):
    args = step_args()
    args["state"] = tuple(np.zeros(shape, "float32") for shape in shapes)
    with pytest.raises(ValueError, match=r"state\[[01]\]\.shape="):
        favor_attention_step(**args)


@pytest.mark.parametrize("name", ["query", "key", "value"])
def test_step_with_wrong_ranks(name):
    args = step_args()
    args[name] = np.zeros((B, 1, N, H), "float32")
    with pytest.raises(ValueError, match=rf"`{name}`.*{name}\.shape="):
        favor_attention_step(**args)


def test_step_with_head_dim_mismatch():
    args = step_args()
    args["key"] = args["key"][..., :6]
    with pytest.raises(ValueError, match=r"`query` and `key`.*key\.shape=\(2, 2, 6\)"):
        favor_attention_step(**args)


def test_step_projection_errors():
    args = step_args()
    args["projection_matrix"] = None
    with pytest.raises(ValueError, match="projection_matrix=None"):
        favor_attention_step(**args)
    args["projection_matrix"] = random_features_matrix(M, 6, seed=0)
    with pytest.raises(ValueError, match=r"projection_matrix\.shape=\(16, 6\)"):
        favor_attention_step(**args)
    args = step_args("elu")
    args["projection_matrix"] = random_features_matrix(M, H, seed=0)
    with pytest.raises(ValueError, match=r"projection_matrix\.shape=\(16, 8\)"):
        favor_attention_step(**args)

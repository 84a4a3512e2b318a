"""Tests of `keras_favor.feature_maps`: get / serialize / deserialize round trips (strings, dicts,
instances, non-default arguments, a registered user map), argument validation, and the maps
themselves on head-major (B, N, L, H) tensors: shapes, signs, per-token causal features, padding
statistics and the kernel each map estimates."""

import json

import keras
import numpy as np
import pytest

from keras_favor import feature_maps
from keras_favor.feature_maps import (
    ELU,
    FeatureMap,
    ReLU,
    SoftmaxHyperbolic,
    SoftmaxOptimal,
    SoftmaxPositive,
    SoftmaxTrig,
)
from keras_favor.ops import random_features_matrix
from tests.ops import reference
from tests.ops.reference import SquaredPlusOffset

NAMES = {
    "softmax_positive": SoftmaxPositive,
    "softmax_hyperbolic": SoftmaxHyperbolic,
    "softmax_trig": SoftmaxTrig,
    "softmax_optimal": SoftmaxOptimal,
    "relu": ReLU,
    "elu": ELU,
}

INSTANCES = {
    "softmax_positive": SoftmaxPositive(),
    "softmax_hyperbolic": SoftmaxHyperbolic(),
    "softmax_trig": SoftmaxTrig(),
    "softmax_optimal": SoftmaxOptimal(),
    "softmax_optimal_rho": SoftmaxOptimal(rho=0.3),
    "relu": ReLU(),
    "relu_deterministic": ReLU(random_features=False, epsilon=0.01),
    "relu_epsilon": ReLU(epsilon=0.05),
    "elu": ELU(),
    "user_squared": SquaredPlusOffset(offset=0.25),
}

B, N, L, H, M = 2, 2, 6, 8, 16


# ---------------------------------------------------------------------------------------------
# get / serialize / deserialize


@pytest.mark.parametrize("name", list(NAMES))
def test_get_by_name(name):
    fmap = feature_maps.get(name)
    assert type(fmap) is NAMES[name]
    assert feature_maps.deserialize(name).get_config() == fmap.get_config()
    assert type(feature_maps.deserialize(name)) is NAMES[name]


@pytest.mark.parametrize("case", list(INSTANCES))
def test_get_returns_instances_unchanged(case):
    assert feature_maps.get(INSTANCES[case]) is INSTANCES[case]


@pytest.mark.parametrize("case", list(INSTANCES))
def test_serialize_deserialize_round_trip(case):
    fmap = INSTANCES[case]
    config = feature_maps.serialize(fmap)
    config = json.loads(json.dumps(config))  # JSON-able, as in a saved model
    for restored in (
        feature_maps.deserialize(config),
        feature_maps.get(config),
        keras.saving.deserialize_keras_object(config),  # how a layer's from_config would see it
    ):
        assert type(restored) is type(fmap)
        assert restored is not fmap
        assert restored.get_config() == fmap.get_config()
        assert restored.uses_random_features == fmap.uses_random_features
        assert restored.output_dim(H, M) == fmap.output_dim(H, M)


def test_non_default_arguments_survive_the_round_trip():
    restored = feature_maps.get(json.loads(json.dumps(feature_maps.serialize(ReLU(False, 0.01)))))
    assert restored.random_features is False and restored.epsilon == 0.01
    assert not restored.uses_random_features
    restored = feature_maps.deserialize(feature_maps.serialize(SoftmaxOptimal(rho=0.3)))
    assert restored.rho == 0.3
    restored = feature_maps.deserialize(feature_maps.serialize(SquaredPlusOffset(offset=0.25)))
    assert restored.offset == 0.25


def test_registered_user_map_round_trips_by_its_registered_name():
    config = feature_maps.serialize(SquaredPlusOffset(offset=0.25))
    assert config["registered_name"] == "keras_favor_tests>SquaredPlusOffset"
    restored = feature_maps.get(config)
    assert isinstance(restored, SquaredPlusOffset) and isinstance(restored, FeatureMap)
    assert not restored.uses_random_features and restored.output_dim(H, M) == H


@pytest.mark.parametrize("case", list(INSTANCES))
def test_repr_shows_the_config(case):
    fmap = INSTANCES[case]
    text = repr(fmap)
    assert text.startswith(type(fmap).__name__ + "(")
    for key, value in fmap.get_config().items():
        assert f"{key}={value!r}" in text


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "identifier,echo",
    [
        ("softmax", "feature_map='softmax'"),
        ("SOFTMAX_POSITIVE", "feature_map='SOFTMAX_POSITIVE'"),
        (None, "feature_map=None"),
        (3, "feature_map=3"),
        ({"class_name": "NoSuchMap", "config": {}}, "NoSuchMap"),
    ],
)
def test_get_rejects_unknown_identifiers(identifier, echo):
    with pytest.raises(ValueError, match=r"`feature_map`.*" + echo):
        feature_maps.get(identifier)


def test_get_rejects_a_config_of_something_else():
    config = keras.saving.serialize_keras_object(keras.initializers.Zeros())
    with pytest.raises(ValueError, match="feature_map"):
        feature_maps.get(config)


@pytest.mark.parametrize(
    "factory,echo",
    [
        (lambda: ReLU(random_features="yes"), "random_features='yes'"),
        (lambda: ReLU(random_features=1), "random_features=1"),
        (lambda: ReLU(epsilon=-0.1), "epsilon=-0.1"),
        (lambda: ReLU(epsilon="small"), "epsilon='small'"),
        (lambda: SoftmaxOptimal(rho=-0.5), "rho=-0.5"),
        (lambda: SoftmaxOptimal(rho="auto"), "rho='auto'"),
    ],
)
def test_bad_map_arguments(factory, echo):
    with pytest.raises(ValueError, match=echo):
        factory()


def test_base_class_features_must_be_overridden():
    with pytest.raises(NotImplementedError, match="features"):
        FeatureMap()(np.zeros((1, 1, 2, 4), "float32"), np.zeros((1, 1, 2, 4), "float32"))


# ---------------------------------------------------------------------------------------------
# The maps on head-major tensors


def head_major(scale=0.5, seed=0, length=L):
    rng = np.random.default_rng(seed)
    q = (scale * rng.normal(size=(B, N, length, H))).astype("float32")
    k = (scale * rng.normal(size=(B, N, length, H))).astype("float32")
    return q, k


def projection(fmap, seed=0):
    return random_features_matrix(M, H, seed=seed) if fmap.uses_random_features else None


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", list(INSTANCES))
def test_feature_shapes_dtypes_and_signs(case, causal):
    fmap = INSTANCES[case]
    q, k = head_major()
    q_feat, k_feat = fmap(q, k, projection(fmap), causal=causal)
    num_features = fmap.output_dim(H, M)
    assert num_features == {"softmax_hyperbolic": 2 * M, "softmax_trig": 2 * M}.get(
        case, M if fmap.uses_random_features else H
    )
    assert tuple(q_feat.shape) == (B, N, L, num_features)
    assert tuple(k_feat.shape) == (B, N, L, num_features)
    for x in (q_feat, k_feat):
        assert keras.backend.standardize_dtype(x.dtype) == "float32"
        x = reference.to_numpy(x)
        assert np.all(np.isfinite(x))
        if case != "softmax_trig":  # every map but the trigonometric baseline is positive
            assert np.all(x >= 0) and np.all(x.sum(-1) > 0)


@pytest.mark.parametrize("case", list(INSTANCES))
def test_causal_features_depend_on_their_own_token_only(case):
    # In causal mode no statistic may use other tokens: the features of each token computed with
    # the whole sequence equal those computed from that token alone (queries and keys), even when
    # the other tokens are large.
    fmap = INSTANCES[case]
    q, k = head_major(scale=0.5)
    q[:, :, 3:] *= 20.0
    k[:, :, 3:] *= 20.0
    w = projection(fmap)
    q_all, k_all = (reference.to_numpy(x) for x in fmap(q, k, w, causal=True))
    for t in (0, 2):
        q_one, k_one = (
            reference.to_numpy(x)
            for x in fmap(q[:, :, t : t + 1], k[:, :, t : t + 1], w, causal=True)
        )
        # Relative to the largest feature: a signed (trig) feature near zero has no relative
        # precision; a statistic over the x20 tokens would change the features by orders of
        # magnitude.
        for whole, alone in ((q_all, q_one), (k_all, k_one)):
            np.testing.assert_allclose(
                whole[:, :, t : t + 1], alone, rtol=1e-6, atol=1e-6 * np.abs(alone).max()
            )


@pytest.mark.parametrize("case", list(INSTANCES))
def test_non_causal_statistics_ignore_padded_keys(case):
    # Non-causal maps may use statistics over keys (the key stabiliser, FAVOR++'s ρ), but only over
    # real keys: with a key mask, the features of the real keys equal those computed from the
    # real keys alone, whatever the padded keys hold.
    fmap = INSTANCES[case]
    q, k = head_major()
    w = projection(fmap)
    # Padded keys that would dominate a statistic: large values (norms, FAVOR++'s ρ), and a key
    # along ω's first row, whose logit ωᵀy − ‖y‖²/2 reaches its largest value ‖ω‖²/2.
    k[:, :, 4] = 50.0
    k[:, :, 5] = 0.0 if w is None else reference.to_numpy(w)[0] * H**0.25
    mask = np.zeros((B, 1, L, 1), "float32")
    mask[:, :, :4] = 1.0
    q_masked, k_masked = (reference.to_numpy(x) for x in fmap(q, k, w, key_mask=mask))
    q_alone, k_alone = (reference.to_numpy(x) for x in fmap(q, k[:, :, :4], w))
    np.testing.assert_allclose(q_masked, q_alone, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(k_masked[:, :, :4], k_alone, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize(
    "case", ["softmax_positive", "softmax_hyperbolic", "softmax_optimal_rho", "softmax_trig"]
)
def test_causal_key_features_estimate_the_kernel_up_to_a_constant(case):
    # With causal=True the key stabiliser is a constant fixed by ω alone, so key features are the
    # unbiased estimator's features times one constant c: φ_lib(y_i)ᵀφ_lib(y_j) = c · K̂(y_i, y_j)
    # with K̂ the numpy estimator of exp(y_iᵀy_j/√H) (all constants kept). The ratio must be the
    # same for every pair (to float32 precision).
    fmap = INSTANCES[case]
    _, k = head_major(scale=0.5, length=5)
    w = projection(fmap)
    _, k_feat = fmap(k, k, w, causal=True)
    k_feat = reference.to_numpy(k_feat)
    lib = np.einsum("bnif,bnjf->bnij", k_feat, k_feat)
    _, name, kwargs = reference.MAP_CASES[case]
    a = reference.optimal_a(kwargs["rho"]) if "rho" in kwargs else None
    ref_feat = reference.features(name, np.swapaxes(k, 1, 2), reference.to_numpy(w), a=a)
    ref = np.einsum("binf,bjnf->bnij", ref_feat, ref_feat)
    ratio = lib / ref
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-4)


def test_user_map_defined_by_features_only():
    fmap = SquaredPlusOffset(offset=0.25)
    q, k = head_major()
    q_feat, k_feat = fmap(q, k)
    np.testing.assert_allclose(reference.to_numpy(q_feat), q.astype(float) ** 2 + 0.25, rtol=1e-6)
    np.testing.assert_allclose(reference.to_numpy(k_feat), k.astype(float) ** 2 + 0.25, rtol=1e-6)

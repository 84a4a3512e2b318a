"""Tests of `FavorAttention`: the harness (config, symbolic / eager calls, fit, mixed precision,
saving), bad arguments, the ELU layer against a numpy reference built from its own weights,
MultiHeadAttention weight transfer and convergence, masks, causality, streaming decoding, the
random projection (seeds, redraws, saving, graphs free of random ops, tf.distribute).

Everything runs on TensorFlow and JAX except the tests marked as TensorFlow-only.
"""

import os
import re
import subprocess
import sys
import tempfile
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

from keras_favor import FavorAttention
from keras_favor.feature_maps import FeatureMap
from keras_favor.ops import random_features_matrix
from tests.testing import TestCase, data, to_numpy

tf_only = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow-specific")


@keras.saving.register_keras_serializable(package="keras_favor_tests")
class ScaledRelu(FeatureMap):
    """A user-defined random-feature map (to test serialization of user maps)."""

    def __init__(self, scale=1.0):
        self.scale = scale

    @property
    def uses_random_features(self):
        return True

    def output_dim(self, key_dim, num_random_features=None):
        return num_random_features

    def features(self, x, projection_matrix=None, *, is_query):
        u = ops.matmul(x, ops.transpose(ops.cast(projection_matrix, "float32")))
        return ops.relu(u * self.scale) + 1e-3

    def get_config(self):
        return {"scale": self.scale}


# All arguments non-default: a `get_config` that drops one cannot pass the round trip.
ALL_ARGUMENTS = dict(
    num_heads=2,
    key_dim=4,
    value_dim=3,
    dropout=0.1,
    use_bias=False,
    output_shape=5,
    kernel_initializer="he_normal",
    bias_initializer="ones",
    kernel_regularizer="l2",
    bias_regularizer="l1",
    activity_regularizer=keras.regularizers.L1L2(l1=1e-4, l2=1e-3),
    kernel_constraint="max_norm",
    bias_constraint="unit_norm",
    feature_map="softmax_hyperbolic",
    num_random_features=8,
    orthogonal=False,
    row_norms="sqrt_dim",
    causal_chunk_size=3,
    seed=7,
    attention_axes=1,  # the one axis FAVOR attends over, given explicitly
    decay=[0.9, 0.5],
    local_window=2,
)
# `output_shape` is not an attribute (Functional summaries read that name, as for
# MultiHeadAttention); `activity_regularizer` is the base layer's attribute, left None because the
# projections apply the regularizer (as MultiHeadAttention does).
ATTRIBUTE_EXCEPTIONS = ("output_shape", "activity_regularizer")


class TestHarness(TestCase):
    def test_config_all_arguments_non_default(self):
        layer = self.run_config_test(
            FavorAttention,
            ALL_ARGUMENTS,
            require_all_non_default=True,
            attribute_exceptions=ATTRIBUTE_EXCEPTIONS,
        )
        assert layer.feature_map.__class__.__name__ == "SoftmaxHyperbolic"
        assert layer.value_dim == 3 and layer.seed == 7 and layer.causal_chunk_size == 3
        assert layer.decay == [0.9, 0.5] and layer.local_window == 2

    @pytest.mark.heavy
    @pytest.mark.parametrize("causal", [False, True])
    def test_self_attention_all_arguments(self, causal):
        x = data(3, 7, 6)
        self.run_layer_test(
            FavorAttention,
            ALL_ARGUMENTS if causal else {**ALL_ARGUMENTS, "decay": None},  # decay: causal only
            {"query": x, "value": x},
            (3, 7, 5),
            call_kwargs={"use_causal_mask": causal},
            expected_num_trainable_weights=4,  # no biases
            expected_num_non_trainable_weights=2,
            attribute_exceptions=ATTRIBUTE_EXCEPTIONS,
        )

    @pytest.mark.heavy
    def test_cross_attention_with_key(self):
        kwargs = dict(num_heads=2, key_dim=4, num_random_features=16, seed=1)
        self.run_layer_test(
            FavorAttention,
            kwargs,
            {"query": data(2, 5, 6), "value": data(2, 9, 3, seed=1), "key": data(2, 9, 4, seed=2)},
            (2, 5, 6),
            expected_num_trainable_weights=8,
            expected_num_non_trainable_weights=2,
            attribute_exceptions=ATTRIBUTE_EXCEPTIONS,
        )

    @pytest.mark.heavy
    def test_deterministic_map_has_no_projection(self):
        x = data(2, 6, 8)
        self.run_layer_test(
            FavorAttention,
            dict(num_heads=2, key_dim=4, feature_map="elu"),
            {"query": x, "value": x},
            (2, 6, 8),
            call_kwargs={"use_causal_mask": True},
            expected_num_non_trainable_weights=1,  # the redraw count only
            attribute_exceptions=ATTRIBUTE_EXCEPTIONS,
        )

    def test_jit_compile_fit(self):
        x = data(2, 6, 8)
        layer = FavorAttention(2, 4, num_random_features=8, causal_chunk_size=4, seed=0)
        model = self.run_symbolic_call_test(
            layer, {"query": x, "value": x}, (2, 6, 8), {"use_causal_mask": True}
        )
        self.run_training_step_test(model, {"query": x, "value": x}, jit_compile=True)


# ------------------------------------------------------------------------------------------
# Bad arguments and inputs: each a ValueError naming the argument.

BAD_INIT = [
    ({"num_heads": 0}, "num_heads"),
    ({"num_heads": 2.0}, "num_heads"),
    ({"num_heads": True}, "num_heads"),
    ({"key_dim": -1}, "key_dim"),
    ({"key_dim": "8"}, "key_dim"),
    ({"value_dim": 0}, "value_dim"),
    ({"dropout": 1.0}, "dropout"),
    ({"dropout": -0.1}, "dropout"),
    ({"dropout": "0.1"}, "dropout"),
    ({"use_bias": 1}, "use_bias"),
    ({"output_shape": 0}, "output_shape"),
    ({"output_shape": (4, -1)}, "output_shape"),
    ({"output_shape": "4"}, "output_shape"),
    ({"kernel_initializer": "no_such_initializer"}, "kernel_initializer"),
    ({"bias_initializer": 3}, "bias_initializer"),
    ({"kernel_regularizer": "no_such_regularizer"}, "kernel_regularizer"),
    ({"bias_regularizer": "no_such_regularizer"}, "bias_regularizer"),
    ({"activity_regularizer": "no_such_regularizer"}, "activity_regularizer"),
    ({"kernel_constraint": "no_such_constraint"}, "kernel_constraint"),
    ({"bias_constraint": "no_such_constraint"}, "bias_constraint"),
    ({"feature_map": "softmax"}, "feature_map"),
    ({"feature_map": 3}, "feature_map"),
    ({"num_random_features": 0}, "num_random_features"),
    ({"num_random_features": 16.0}, "num_random_features"),
    ({"orthogonal": "yes"}, "orthogonal"),
    ({"row_norms": "unit"}, "row_norms"),
    ({"causal_chunk_size": 0}, "causal_chunk_size"),
    ({"seed": -1}, "seed"),
    ({"seed": "0"}, "seed"),
]


@pytest.mark.parametrize("kwargs, name", BAD_INIT, ids=[f"{n}-{k[n]!r}" for k, n in BAD_INIT])
def test_bad_constructor_argument(kwargs, name):
    kwargs = {"num_heads": 2, "key_dim": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        FavorAttention(**kwargs)


def _bad_calls():
    x = data(2, 5, 8)
    longer = data(2, 7, 8)
    return [
        ("return_attention_scores", dict(query=x, value=x, return_attention_scores=True)),
        ("attention_mask", dict(query=x, value=x, attention_mask=np.ones((2, 5, 5), bool))),
        ("attention_mask", dict(query=x, value=x, attention_mask=np.ones((2, 5), bool))),
        ("use_causal_mask", dict(query=x, value=longer, use_causal_mask=True)),
        ("use_causal_mask", dict(query=x, value=x, use_causal_mask="yes")),
        ("query", dict(query=x[:, 0], value=x)),
        ("value", dict(query=x, value=x[..., None])),
        ("key", dict(query=x, value=x, key=longer)),
        ("value_mask", dict(query=x, value=x, value_mask=np.ones((2, 4), bool))),
        ("key_mask", dict(query=x, value=x, key_mask=np.ones((2, 5, 1), bool))),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_call_argument(index):
    name, kwargs = _bad_calls()[index]
    layer = FavorAttention(2, 4, num_random_features=8)
    with pytest.raises(ValueError, match=name):
        layer(**kwargs)


@pytest.mark.parametrize("index", range(3))
def test_bad_call_argument_symbolic(index):
    # The same checks run when the layer is called on keras.Input tensors.
    q = keras.Input((5, 8))
    name, kwargs = [
        ("return_attention_scores", dict(return_attention_scores=True)),
        ("attention_mask", dict(attention_mask=keras.Input((5, 5)))),
        ("use_causal_mask", dict(value=keras.Input((6, 8)), use_causal_mask=True)),
    ][index]
    kwargs = {"query": q, "value": q, **kwargs}
    with pytest.raises(ValueError, match=name):
        FavorAttention(2, 4, num_random_features=8)(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # Internal shapes must not leak: the user's argument names and shapes are quoted.
        (
            dict(query=data(2, 5, 8), value=data(2, 5, 8), attention_mask=np.ones((2, 1, 8))),
            "Argument `attention_mask` must be a key padding mask of shape (batch, 1, key_length)"
            " = (2, 1, 5). Received: attention_mask.shape=(2, 1, 8)",
        ),
        (
            dict(query=data(2, 5, 8), value=data(3, 5, 8)),
            "Arguments `query` and `value` must have the same batch size. "
            "Received: query.shape=(2, 5, 8), value.shape=(3, 5, 8)",
        ),
        (
            dict(query=data(2, 5, 8), value=data(2, 5, 8), key=data(1, 5, 8)),
            "Arguments `query` and `key` must have the same batch size. "
            "Received: query.shape=(2, 5, 8), key.shape=(1, 5, 8)",
        ),
        (
            dict(query=data(2, 5, 8), value=data(2, 5, 8), attention_mask=np.ones((2, 5, 5))),
            "Received: attention_mask.shape=(2, 5, 5)",
        ),
    ],
    ids=["attention_mask_length", "value_batch", "key_batch", "dense_attention_mask"],
)
def test_errors_quote_the_users_arguments(kwargs, message):
    layer = FavorAttention(2, 4, num_random_features=8)
    with pytest.raises(ValueError, match=re.escape(message)):
        layer(**kwargs)


def test_is_a_multi_head_attention_that_overrides_only_the_attention():
    layer = FavorAttention(2, 4, num_random_features=8)
    assert isinstance(layer, keras.layers.MultiHeadAttention)
    # The projections, their arguments and read-only views come from MultiHeadAttention.
    for inherited in ("_get_common_kwargs_for_sublayer", "_make_output_dense", "query_dense"):
        assert inherited not in vars(FavorAttention)
    assert "_compute_attention" in vars(FavorAttention)


@pytest.mark.heavy
@pytest.mark.parametrize("axes", [None, 1, -2, (1,), [1], (-2,)])
def test_attention_axes_of_the_sequence_axis_are_accepted(axes):
    x = data(2, 6, 8)
    layer = FavorAttention(2, 4, num_random_features=8, seed=0, attention_axes=axes)
    reference = FavorAttention(2, 4, num_random_features=8, seed=0)
    reference(x, x)
    layer(x, x)
    layer.set_weights(reference.get_weights())
    np.testing.assert_array_equal(to_numpy(layer(x, x)), to_numpy(reference(x, x)))
    assert layer.attention_axes == (None if axes is None else (1,))
    assert FavorAttention.from_config(layer.get_config()).attention_axes == layer.attention_axes


@pytest.mark.parametrize("axes", [2, 0, (1, 2), (2,), "1", 1.0])
def test_other_attention_axes_raise(axes):
    with pytest.raises(ValueError, match=r"`attention_axes`.*one axis.*attention_axes="):
        FavorAttention(2, 4, attention_axes=axes)


@pytest.mark.parametrize(
    "kwargs",
    [{"sliding_window": 4}, {"use_gate": True}, {"flash_attention": True}],
    ids=lambda kwargs: next(iter(kwargs)),
)
def test_multi_head_attention_arguments_without_favor_counterpart_raise(kwargs):
    name, value = next(iter(kwargs.items()))
    with pytest.raises(ValueError, match=f"`{name}`.*Received: {name}={value}"):
        FavorAttention(2, 4, **kwargs)


def test_loads_a_multi_head_attention_config():
    # Its inert entries (sliding_window=None, use_gate=False, attention_axes=None) are accepted.
    mha = keras.layers.MultiHeadAttention(2, 4, value_dim=3, output_shape=5, seed=1)
    layer = FavorAttention.from_config({**mha.get_config(), "num_random_features": 8})
    x = data(2, 6, 8)
    mha.build(x.shape, x.shape)  # not called: on JAX its fused path rejects value_dim != key_dim
    assert tuple(layer(x, x).shape) == (2, 6, 5)
    assert [w.shape for w in layer.weights[: len(mha.weights)]] == [w.shape for w in mha.weights]
    assert "sliding_window" not in layer.get_config() and "use_gate" not in layer.get_config()


def test_bad_decode_and_redraw_arguments():
    layer = FavorAttention(2, 4, num_random_features=8)
    with pytest.raises(ValueError, match="redraw_random_features"):
        layer.redraw_random_features()  # not built yet
    x = data(2, 5, 8)
    layer(x, x)
    with pytest.raises(ValueError, match="seed"):
        layer.redraw_random_features(seed=-3)
    for bad in (0, True, 2.0, np.ones((2,), "int32"), np.float32(2.0)):
        with pytest.raises(ValueError, match="batch_size"):
            layer.get_initial_state(bad)
    state = layer.get_initial_state(2)
    with pytest.raises(ValueError, match="query"):
        layer.step(x, x[:, 0], state)
    with pytest.raises(ValueError, match="value"):
        layer.step(x[:, 0], x, state)
    with pytest.raises(ValueError, match="state"):
        layer.step(x[:, 0], x[:, 0], state[0])


# ------------------------------------------------------------------------------------------
# Exact computation: the ELU layer against numpy, from the layer's own weights.


def _elu1(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def numpy_elu_layer(layer, query, value, key=None, key_mask=None, causal=False):
    """float64 reference of a `FavorAttention(feature_map="elu")` with biases."""
    key = value if key is None else key
    wq, bq, wk, bk, wv, bv, wo, bo = [np.float64(w) for w in layer.get_weights()[:8]]
    q = np.einsum("bte,enh->btnh", query, wq) + bq
    k = np.einsum("bse,enh->bsnh", key, wk) + bk
    v = np.einsum("bse,end->bsnd", value, wv) + bv
    fq, fk = _elu1(q), _elu1(k)  # (B, T, N, H), (B, S, N, H)
    if key_mask is not None:
        fk = fk * key_mask[:, :, None, None]
    if causal:
        out = np.zeros(q.shape[:3] + (v.shape[-1],))
        for t in range(q.shape[1]):
            kv = np.einsum("bsnf,bsnd->bnfd", fk[:, : t + 1], v[:, : t + 1])
            z = fk[:, : t + 1].sum(1)
            out[:, t] = (
                np.einsum("bnf,bnfd->bnd", fq[:, t], kv)
                / np.einsum("bnf,bnf->bn", fq[:, t], z)[..., None]
            )
    else:
        kv = np.einsum("bsnf,bsnd->bnfd", fk, v)
        z = fk.sum(1)
        out = np.einsum("btnf,bnfd->btnd", fq, kv) / np.einsum("btnf,bnf->btn", fq, z)[..., None]
    return np.einsum("btnd,nde->bte", out, wo) + bo


@pytest.mark.parametrize("causal", [False, True])
def test_elu_layer_equals_numpy_reference(causal):
    layer = FavorAttention(
        3,
        4,
        value_dim=5,
        output_shape=7,
        feature_map="elu",
        causal_chunk_size=4,
        bias_initializer="random_normal",
    )
    q, v = data(2, 9, 6), data(2, 9, 10, seed=1)
    out = to_numpy(layer(q, v, use_causal_mask=causal))
    np.testing.assert_allclose(
        out, numpy_elu_layer(layer, q, v, causal=causal), rtol=1e-4, atol=1e-5
    )


@pytest.mark.heavy
def test_elu_layer_cross_attention_with_key_mask():
    layer = FavorAttention(2, 4, feature_map="elu", bias_initializer="random_normal")
    q, v, k = data(2, 3, 6), data(2, 8, 5, seed=1), data(2, 8, 7, seed=2)
    mask = np.array([[1, 1, 1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 1, 1, 1, 1]], bool)
    out = to_numpy(layer(q, v, key=k, key_mask=mask))
    expected = numpy_elu_layer(layer, q, v, key=k, key_mask=mask.astype(float))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------
# MultiHeadAttention compatibility.


def _mha_and_favor(num_random_features, seed, **kwargs):
    x, y = data(2, 12, 16), data(2, 9, 12, seed=1)
    # dropout > 0 (inactive at inference) keeps MHA on its explicit einsum path: on JAX, its fused
    # path rejects value_dim != key_dim.
    mha = keras.layers.MultiHeadAttention(**kwargs, dropout=0.1)
    mha.build(x.shape, y.shape)
    rng = np.random.default_rng(3)  # moderate weights: logits of std ~0.2
    mha.set_weights([rng.normal(scale=0.12, size=w.shape).astype("float32") for w in mha.weights])
    favor = FavorAttention(**kwargs, num_random_features=num_random_features, seed=seed)
    favor(x, y)
    return mha, favor, x, y


@pytest.mark.heavy
def test_weights_have_multi_head_attention_structure():
    kwargs = dict(num_heads=3, key_dim=4, value_dim=5, output_shape=(2, 3))
    mha, favor, _, _ = _mha_and_favor(8, 0, **kwargs)
    n = len(mha.weights)
    assert n == 8
    assert [w.shape for w in favor.weights[:n]] == [w.shape for w in mha.weights]
    strip = lambda w: w.path.split("/", 1)[1]  # noqa: E731
    assert [strip(w) for w in favor.weights[:n]] == [strip(w) for w in mha.weights]
    assert [strip(w) for w in favor.weights[n:]] == ["projection_matrix", "redraw_count"]
    assert [w.trainable for w in favor.weights] == [True] * n + [False, False]
    for name in ("query_dense", "key_dense", "value_dense", "output_dense"):
        assert getattr(favor, name).equation == getattr(mha, name).equation


@pytest.mark.heavy
def test_multi_head_attention_weights_load_and_outputs_converge():
    """MHA weights load as they are; FAVOR+ outputs approach MHA's as M grows (logits ~0.2)."""
    kwargs = dict(num_heads=2, key_dim=8, value_dim=6, output_shape=10)
    errors = {}
    for m in (16, 2048):
        errs = []
        for seed in range(3):
            mha, favor, x, y = _mha_and_favor(m, seed, **kwargs)
            favor.set_weights(mha.get_weights() + favor.get_weights()[len(mha.weights) :])
            for a, b in zip(favor.get_weights(), mha.get_weights()):
                np.testing.assert_array_equal(a, b)
            expected = to_numpy(mha(x, y))
            errs.append(np.abs(to_numpy(favor(x, y)) - expected).max() / np.abs(expected).max())
        errors[m] = float(np.mean(errs))
    assert errors[2048] < 0.06, errors
    assert errors[2048] < errors[16] / 3, errors


@pytest.mark.heavy
def test_trained_multi_head_attention_swap():
    """The paper's backward compatibility: train with MHA, swap in FAVOR+ with the same weights,
    the loss stays near MHA's (far below an untrained model's)."""
    rng = np.random.default_rng(0)
    x = rng.normal(scale=0.5, size=(64, 8, 8)).astype("float32")
    y = np.cumsum(x, axis=1)[:, :, :4] / np.arange(1, 9)[None, :, None]  # causal running mean

    def model(attention):
        inputs = keras.Input((8, 8))
        h = attention(inputs, inputs, use_causal_mask=True)
        return keras.Model(inputs, keras.layers.Dense(4)(h))

    keras.utils.set_random_seed(0)
    mha_model = model(keras.layers.MultiHeadAttention(2, 4))
    mha_model.compile(keras.optimizers.Adam(0.01), "mse")
    untrained = mha_model.evaluate(x, y, verbose=0)
    mha_model.fit(x, y, epochs=30, batch_size=16, verbose=0)
    mha_loss = mha_model.evaluate(x, y, verbose=0)
    favor_model = model(FavorAttention(2, 4, num_random_features=512, seed=0))
    favor_model.compile(keras.optimizers.Adam(0.01), "mse")
    n = len(mha_model.layers[1].weights)
    favor_layer = favor_model.layers[1]
    favor_layer.set_weights(mha_model.layers[1].get_weights() + favor_layer.get_weights()[n:])
    favor_model.layers[2].set_weights(mha_model.layers[2].get_weights())
    favor_loss = favor_model.evaluate(x, y, verbose=0)
    assert mha_loss < untrained / 4, (mha_loss, untrained)
    assert favor_loss < 0.02 * untrained, (favor_loss, mha_loss, untrained)


# ------------------------------------------------------------------------------------------
# Masks.


@pytest.mark.heavy
def test_implicit_mask_equals_key_mask_equals_truncation():
    tokens = np.array([[3, 1, 4, 1, 5, 0, 0], [2, 7, 1, 8, 2, 8, 1]])
    embedding = keras.layers.Embedding(10, 8, mask_zero=True)
    layer = FavorAttention(2, 4, num_random_features=16, seed=0)
    x = embedding(tokens)
    implicit = to_numpy(layer(x, x))  # Embedding's mask reaches value_mask
    explicit = to_numpy(layer(x, x, value_mask=tokens != 0))
    keyed = to_numpy(layer(x, x, key_mask=tokens != 0))
    broadcast = to_numpy(layer(x, x, attention_mask=(tokens != 0)[:, None, :]))
    np.testing.assert_array_equal(implicit, explicit)
    np.testing.assert_array_equal(keyed, explicit)
    np.testing.assert_array_equal(broadcast, explicit)
    # Calling the layer leaves the input's mask in place: a second call masks the same way.
    np.testing.assert_array_equal(to_numpy(layer(x, x)), implicit)
    truncated = to_numpy(layer(x[:1, :5], x[:1, :5]))
    np.testing.assert_allclose(explicit[:1, :5], truncated, rtol=1e-5, atol=1e-6)
    unmasked = to_numpy(layer(x[:1], x[:1]))
    assert np.abs(unmasked[:, :5] - truncated).max() > 1e-3  # the mask mattered


@pytest.mark.parametrize("causal", [False, True])
def test_implicit_mask_in_functional_model(causal):
    # Causal: left padding, so that the padded keys lie in the real queries' past.
    tokens = np.array(
        [[0, 0, 3, 1, 4], [2, 7, 1, 8, 2]] if causal else [[3, 1, 4, 0, 0], [2, 7, 1, 8, 2]]
    )
    real = slice(2, 5) if causal else slice(0, 3)
    inputs = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(10, 8, mask_zero=True)(inputs)
    y = FavorAttention(2, 4, num_random_features=16, seed=0)(x, x, use_causal_mask=causal)
    pooled = keras.layers.GlobalAveragePooling1D()(y)  # honours the query mask passed on
    model = keras.Model(inputs, [y, pooled])
    out, pool = model.predict(tokens, verbose=0)
    truncated, _ = model.predict(tokens[:1, real], verbose=0)
    np.testing.assert_allclose(out[:1, real], truncated, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pool[0], out[0, real].mean(0), rtol=1e-5, atol=1e-6)


def test_value_and_key_masks_combine():
    layer = FavorAttention(2, 4, num_random_features=16, seed=0)
    q, v = data(1, 4, 8), data(1, 6, 8, seed=1)
    value_mask = np.array([[1, 1, 1, 1, 0, 1]], bool)
    key_mask = np.array([[1, 0, 1, 1, 1, 1]], bool)
    both = to_numpy(layer(q, v, value_mask=value_mask, key_mask=key_mask))
    kept = [0, 2, 3, 5]
    np.testing.assert_allclose(both, to_numpy(layer(q, v[:, kept])), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Causality and decoding.


@pytest.mark.parametrize("feature_map", ["softmax_positive", "softmax_optimal", "elu"])
def test_causal_no_leak(feature_map):
    layer = FavorAttention(
        2, 4, feature_map=feature_map, num_random_features=16, seed=0, causal_chunk_size=4
    )
    x = data(2, 11, 8)
    base = to_numpy(layer(x, x, use_causal_mask=True))
    for t in (0, 3, 4, 9):
        changed = x.copy()
        changed[:, t + 1 :] = data(2, 10 - t, 8, seed=t + 1, scale=3.0)
        out = to_numpy(layer(changed, changed, use_causal_mask=True))
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], rtol=1e-6, atol=1e-7)
        assert np.abs(out[:, t + 1 :] - base[:, t + 1 :]).max() > 1e-3


@pytest.mark.parametrize("feature_map", ["softmax_positive", "softmax_hyperbolic", "elu"])
def test_decode_steps_equal_causal_call(feature_map):
    layer = FavorAttention(
        2,
        4,
        value_dim=3,
        output_shape=5,
        feature_map=feature_map,
        num_random_features=16,
        causal_chunk_size=3,
        seed=0,
    )
    x = data(2, 8, 6)
    full = to_numpy(layer(x, x, use_causal_mask=True))
    state = layer.get_initial_state(2)
    for t in range(8):
        out, state = layer.step(x[:, t], x[:, t], state)
        np.testing.assert_allclose(to_numpy(out), full[:, t], rtol=1e-4, atol=1e-5)
    assert tuple(state[0].shape) == (2, 2, layer.feature_map.output_dim(4, 16), 3)


def test_decode_builds_the_layer():
    layer = FavorAttention(2, 4, num_random_features=8, seed=0)
    out, _ = layer.step(data(3, 6), data(3, 6, seed=1), layer.get_initial_state(3))
    assert layer.built and tuple(out.shape) == (3, 6)


# ------------------------------------------------------------------------------------------
# Shapes, dropout, mixed precision, training.


def test_compute_output_shape_and_symbolic_call():
    layer = FavorAttention(2, 4, output_shape=(3, 2), num_random_features=8)
    assert layer.compute_output_shape((None, 5, 8), (None, 7, 6)) == (None, 5, 3, 2)
    q, v = keras.Input((None, 8)), keras.Input((7, 6))
    y = layer(q, v)
    assert tuple(y.shape) == (None, None, 3, 2)
    assert tuple(layer(data(2, 5, 8), data(2, 7, 6)).shape) == (2, 5, 3, 2)


def test_dropout_on_head_outputs_in_training_only():
    layer = FavorAttention(2, 4, dropout=0.5, num_random_features=8, seed=0)
    x = data(2, 6, 8)
    inference = to_numpy(layer(x, x))
    np.testing.assert_array_equal(to_numpy(layer(x, x, training=False)), inference)
    trained = to_numpy(layer(x, x, training=True))
    assert np.abs(trained - inference).max() > 1e-3
    no_dropout = FavorAttention(2, 4, num_random_features=8, seed=0)
    no_dropout(x, x)
    no_dropout.set_weights(layer.get_weights())
    np.testing.assert_allclose(to_numpy(no_dropout(x, x, training=True)), inference, rtol=1e-6)


@pytest.mark.parametrize("redraw", [False, True])
def test_tiny_model_loss_falls(redraw):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 10, 8)).astype("float32")
    y = np.cumsum(x, axis=1)[..., :2] / np.arange(1, 11)[None, :, None]
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10, 8))
    layer = FavorAttention(2, 8, num_random_features=32, seed=0)
    h = layer(inputs, inputs, use_causal_mask=True)
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    model.compile(keras.optimizers.Adam(0.02), "mse")
    callbacks = []
    if redraw:
        callbacks = [
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: layer.redraw_random_features()
            )
        ]
    history = model.fit(x, y, epochs=8, batch_size=8, verbose=0, callbacks=callbacks)
    losses = history.history["loss"]
    assert losses[-1] < 0.6 * losses[0], losses
    assert int(to_numpy(layer.redraw_count)) == (8 if redraw else 0)


# ------------------------------------------------------------------------------------------
# Random projection: seeds, redraws, saving.


def test_seeds():
    x = data(1, 4, 8)

    def projection(**kwargs):
        layer = FavorAttention(2, 4, num_random_features=8, **kwargs)
        layer(x, x)
        return to_numpy(layer.projection_matrix)

    np.testing.assert_array_equal(
        projection(seed=5), to_numpy(random_features_matrix(8, 4, seed=5))
    )
    np.testing.assert_array_equal(
        projection(seed=5, orthogonal=False, row_norms="sqrt_dim"),
        to_numpy(random_features_matrix(8, 4, orthogonal=False, row_norms="sqrt_dim", seed=5)),
    )
    assert not np.array_equal(projection(seed=5), projection(seed=6))
    assert not np.array_equal(projection(), projection())  # seed=None: each layer its own


def test_redraw():
    x = data(2, 5, 8)
    layer = FavorAttention(2, 4, num_random_features=8, seed=3)
    before_out = to_numpy(layer(x, x))
    before = to_numpy(layer.projection_matrix)
    assert int(to_numpy(layer.redraw_count)) == 0
    if keras.backend.backend() == "tensorflow":
        assert layer.redraw_count.dtype == "int64"
    layer.redraw_random_features()
    assert int(to_numpy(layer.redraw_count)) == 1
    assert not np.array_equal(to_numpy(layer.projection_matrix), before)
    assert np.abs(to_numpy(layer(x, x)) - before_out).max() > 1e-5  # the call reads the variable
    layer.redraw_random_features(seed=11)
    np.testing.assert_array_equal(
        to_numpy(layer.projection_matrix), to_numpy(random_features_matrix(8, 4, seed=11))
    )
    assert int(to_numpy(layer.redraw_count)) == 2
    # A seeded layer's redraws are a function of (seed, count): a twin repeats them.
    twin = FavorAttention(2, 4, num_random_features=8, seed=3)
    twin(x, x)
    for _ in range(2):
        twin.redraw_random_features()
    layer.redraw_random_features()
    twin.redraw_random_features()
    np.testing.assert_array_equal(
        to_numpy(twin.projection_matrix), to_numpy(layer.projection_matrix)
    )
    # Without a layer seed, redraws differ.
    a, b = FavorAttention(2, 4, num_random_features=8), FavorAttention(2, 4, num_random_features=8)
    for unseeded in (a, b):
        unseeded(x, x)
        unseeded.redraw_random_features()
    assert not np.array_equal(to_numpy(a.projection_matrix), to_numpy(b.projection_matrix))


def test_redraw_is_a_no_op_without_random_features():
    layer = FavorAttention(2, 4, feature_map="elu")
    x = data(1, 3, 8)
    before = to_numpy(layer(x, x))
    layer.redraw_random_features()
    assert layer.projection_matrix is None
    assert int(to_numpy(layer.redraw_count)) == 0
    np.testing.assert_array_equal(to_numpy(layer(x, x)), before)


def _save_load(model):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        return keras.saving.load_model(path)


@pytest.mark.parametrize("feature_map", ["softmax_positive", "softmax_optimal", ScaledRelu(0.5)])
def test_save_load_after_redraw(feature_map):
    inputs = keras.Input((None, 8))
    layer = FavorAttention(2, 4, num_random_features=8, feature_map=feature_map)
    model = keras.Model(inputs, layer(inputs, inputs, use_causal_mask=True))
    x = data(2, 6, 8)
    layer.redraw_random_features()
    layer.redraw_random_features()
    loaded = _save_load(model)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    loaded_layer = loaded.layers[1]
    np.testing.assert_array_equal(
        to_numpy(loaded_layer.projection_matrix), to_numpy(layer.projection_matrix)
    )
    assert int(to_numpy(loaded_layer.redraw_count)) == 2
    assert type(loaded_layer.feature_map) is type(layer.feature_map)
    assert loaded_layer.get_config() == layer.get_config()


# ------------------------------------------------------------------------------------------
# TensorFlow graphs and tf.distribute.


@tf_only
def test_inference_graph_has_no_random_or_qr_ops():
    import tensorflow as tf

    def op_types(fn, *specs):
        graph = tf.function(fn).get_concrete_function(*specs).graph
        return {op.type for op in graph.get_operations()}

    # The check can fail: drawing a projection does put such ops in a graph.
    drawn = op_types(lambda: random_features_matrix(8, 4, seed=0))
    assert "Qr" in drawn and any("Random" in t for t in drawn)

    inputs = keras.Input((None, 8))
    layer = FavorAttention(2, 4, num_random_features=8, dropout=0.1)
    model = keras.Model(inputs, layer(inputs, inputs, use_causal_mask=True))
    types = op_types(lambda t: model(t, training=False), tf.TensorSpec((None, None, 8)))
    assert "ReadVariableOp" in types
    assert "Qr" not in types
    assert not [t for t in types if "Random" in t], types


@tf_only
def test_redraw_under_mirrored_strategy():
    """Build, fit and redraw (eagerly and from a callback) on 2 logical CPUs: replicas agree."""
    script = textwrap.dedent(
        """
        import numpy as np
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        devices = [tf.config.LogicalDeviceConfiguration()] * 2
        tf.config.set_logical_device_configuration(cpu, devices)
        import keras
        from keras_favor import FavorAttention

        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            inputs = keras.Input((None, 8))
            layer = FavorAttention(2, 4, num_random_features=8)
            model = keras.Model(inputs, layer(inputs, inputs, use_causal_mask=True))
            model.compile("sgd", "mse")

        def replicas(variable):
            return [v.numpy() for v in strategy.experimental_local_results(variable.value)]

        def check(count):
            p = replicas(layer.projection_matrix)
            assert len(p) == 2 and np.array_equal(p[0], p[1])
            assert [int(c) for c in replicas(layer.redraw_count)] == [count] * 2
            return p[0]

        first = check(0)
        layer.redraw_random_features()
        second = check(1)
        assert not np.array_equal(first, second)

        class Redraw(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                layer.redraw_random_features()

        x = np.random.default_rng(0).normal(size=(8, 5, 8)).astype("float32")
        model.fit(x, x, batch_size=4, epochs=1, verbose=0, callbacks=[Redraw()])
        assert not np.array_equal(check(3), second)
        print("OK")
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_initial_state_accepts_a_scalar_integer_tensor_batch_size():
    # Serving functions know the batch size only at run time.
    layer = FavorAttention(2, 4, num_random_features=8)
    x = data(3, 5, 8)
    layer(x, x)
    expected = layer.get_initial_state(3)
    state = layer.get_initial_state(keras.ops.convert_to_tensor(3, dtype="int32"))
    for got, want in zip(state, expected):
        assert tuple(got.shape) == tuple(want.shape)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), 0.0)
    out, _ = layer.step(x[:, 0], x[:, 0], state)
    assert tuple(out.shape) == (3, 8)


# ---------------------------------------------------------------------------------------------
# Decay of the causal state


def test_decay_equals_the_op_and_streams():
    layer = FavorAttention(num_heads=2, key_dim=4, num_random_features=16, seed=0, decay="retnet")
    x = data(2, 9, 6)
    full = to_numpy(layer(x, x, use_causal_mask=True))
    plain = FavorAttention(num_heads=2, key_dim=4, num_random_features=16, seed=0)
    plain(x, x, use_causal_mask=True)
    plain.set_weights(layer.get_weights())
    assert np.abs(to_numpy(plain(x, x, use_causal_mask=True)) - full).max() > 1e-3
    state = layer.get_initial_state(2)
    for t in range(9):
        out, state = layer.step(x[:, t], x[:, t], state)
        np.testing.assert_allclose(to_numpy(out), full[:, t], atol=1e-5)


def test_decay_without_causal_mask_names_both_arguments():
    layer = FavorAttention(num_heads=2, key_dim=4, num_random_features=8, decay=0.9)
    x = data(2, 5, 6)
    with pytest.raises(ValueError, match=r"`decay`.*`use_causal_mask=True`.*use_causal_mask=False"):
        layer(x, x)
    with pytest.raises(ValueError, match=r"`decay`.*use_causal_mask=False"):
        layer.compute_output_spec(keras.KerasTensor((2, 5, 6)), keras.KerasTensor((2, 5, 6)))


@pytest.mark.parametrize("decay", [0.0, 2.0, [0.9], "rwkv", [0.5, None]])
def test_invalid_decay(decay):
    with pytest.raises(ValueError, match=r"argument `decay`.*Received: decay="):
        FavorAttention(num_heads=2, key_dim=4, decay=decay)


# ---------------------------------------------------------------------------------------------
# Local exact window


@pytest.mark.parametrize("feature_map", ["softmax_positive", "hedgehog"])
def test_local_window_equals_the_op_streams_and_saves(feature_map, tmp_path):
    layer = FavorAttention(
        2, 4, num_random_features=16, seed=0, feature_map=feature_map, local_window=3
    )
    x = data(2, 9, 6)
    inputs = keras.Input((None, 6))
    model = keras.Model(inputs, layer(inputs, inputs, use_causal_mask=True))
    full = to_numpy(model(x))
    plain = FavorAttention(2, 4, num_random_features=16, seed=0, feature_map=feature_map)
    plain(x, x)
    plain.set_weights(layer.get_weights())
    assert np.abs(to_numpy(plain(x, x, use_causal_mask=True)) - full).max() > 1e-3
    assert layer.state_size == 4 and plain.state_size == 2
    state = layer.get_initial_state(2)
    for t in range(9):
        out, state = layer.step(x[:, t], x[:, t], state)
        np.testing.assert_allclose(to_numpy(out), full[:, t], atol=1e-5)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(to_numpy(loaded(x)), full)
    with pytest.raises(ValueError, match=r"`state` must be the 4 arrays.*of length 2"):
        layer.step(x[:, 0], x[:, 0], plain.get_initial_state(2))


def test_local_window_refuses_cross_attention_of_other_lengths():
    layer = FavorAttention(2, 4, num_random_features=8, local_window=2)
    with pytest.raises(ValueError, match=r"`local_window`.*same length.*local_window=2"):
        layer(data(2, 5, 6), data(2, 7, 6))


@pytest.mark.parametrize("local_window", [0, -1, 1.5, "4"])
def test_invalid_local_window(local_window):
    with pytest.raises(ValueError, match=r"local_window.*Received: local_window="):
        FavorAttention(num_heads=2, key_dim=4, local_window=local_window)

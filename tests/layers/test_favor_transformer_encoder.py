"""Tests of `FavorTransformerEncoder`: the harness with every argument non-default (config, calls,
fit, mixed precision, `.keras` saving), padding = truncation, implicit masks, RoPE on the projected
queries and keys (exact composition, so attention stays linear), seeds, bad arguments."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_favor.feature_maps import SoftmaxOptimal
from keras_favor.layers import FavorTransformerEncoder, RotaryEmbedding
from keras_favor.ops import favor_attention
from tests.layers import softmax_reference
from tests.testing import TestCase, data, init_arguments, to_numpy

ALL_ARGUMENTS = dict(
    intermediate_dim=12,
    num_heads=2,
    dropout=0.1,
    activation="gelu",
    layer_norm_epsilon=1e-3,
    kernel_initializer="he_normal",
    bias_initializer="ones",
    normalize_first=True,
    feature_map=SoftmaxOptimal(rho=0.5),
    num_random_features=8,
    orthogonal=False,
    row_norms="sqrt_dim",
    causal_chunk_size=4,
    use_rotary_embedding=True,
    rotary_max_wavelength=100,
    seed=3,
)

SMALL = dict(intermediate_dim=16, num_heads=2, num_random_features=16, seed=0)


class TestHarness(TestCase):
    @pytest.mark.heavy
    @pytest.mark.parametrize("attention_type", ["favor", "softmax"])
    def test_all_arguments_non_default(self, attention_type):
        # "softmax" is the only non-default attention_type: with it every argument but
        # local_window (which a softmax block refuses) is non-default (the other FAVOR options
        # are unused but still serialized); with "favor", local_window is set too.
        kwargs = dict(ALL_ARGUMENTS, attention_type=attention_type)
        if attention_type == "favor":
            kwargs["local_window"] = 2
        defaults = {
            name
            for name, default in init_arguments(FavorTransformerEncoder).items()
            if name not in kwargs or kwargs[name] == default
        }
        assert defaults == ({"attention_type"} if attention_type == "favor" else {"local_window"})
        self.run_layer_test(
            FavorTransformerEncoder,
            kwargs,
            data(2, 6, 8),
            (2, 6, 8),
            expected_num_trainable_weights=16,  # 4 projections, 2 norms, 2 dense: kernel + bias
            # FAVOR: the projection ω and the redraw count; softmax: none.
            expected_num_non_trainable_weights=2 if attention_type == "favor" else 0,
        )

    @pytest.mark.heavy
    def test_softmax_defaults_post_norm(self):
        self.run_layer_test(
            FavorTransformerEncoder,
            dict(SMALL, attention_type="softmax"),
            data(2, 5, 8),
            (2, 5, 8),
            call_kwargs={"padding_mask": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)},
            expected_num_non_trainable_weights=0,
        )

    @pytest.mark.parametrize("feature_map", ["softmax_positive", "elu"])
    def test_defaults_post_norm(self, feature_map):
        self.run_layer_test(
            FavorTransformerEncoder,
            dict(SMALL, feature_map=feature_map),
            data(2, 5, 8),
            (2, 5, 8),
            call_kwargs={"padding_mask": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)},
            run_mixed_precision_check=False,
        )


@pytest.mark.heavy
def test_feature_map_is_stored_as_instance_and_passed_through():
    encoder = FavorTransformerEncoder(**ALL_ARGUMENTS)
    encoder.build((None, None, 8))
    attention = encoder._self_attention_layer
    assert type(attention.feature_map).__name__ == "SoftmaxOptimal"
    assert attention.feature_map.rho == 0.5
    assert attention.num_random_features == 8 and attention.orthogonal is False
    assert attention.row_norms == "sqrt_dim" and attention.causal_chunk_size == 4
    assert attention.key_dim == 4 and attention.num_heads == 2 and attention.dropout == 0.1


@pytest.mark.parametrize("use_rotary_embedding", [False, True])
@pytest.mark.parametrize("normalize_first", [False, True])
def test_padding_equals_truncation(use_rotary_embedding, normalize_first):
    encoder = FavorTransformerEncoder(
        **SMALL, use_rotary_embedding=use_rotary_embedding, normalize_first=normalize_first
    )
    x = data(2, 7, 8)
    mask = np.array([[1, 1, 1, 1, 0, 0, 0], [1] * 7], bool)
    out = to_numpy(encoder(x, padding_mask=mask))
    np.testing.assert_allclose(out[0, :4], to_numpy(encoder(x[:1, :4]))[0], atol=1e-5)
    np.testing.assert_allclose(out[1], to_numpy(encoder(x[1:]))[0], atol=1e-5)
    # What the padding holds does not matter.
    x2 = x.copy()
    x2[0, 4:] = 100.0
    np.testing.assert_allclose(
        to_numpy(encoder(x2, padding_mask=mask))[0, :4], out[0, :4], atol=1e-5
    )


def test_attention_mask_of_keys_equals_padding_mask():
    # keras-hub's call argument: a (B, 1, T) attention_mask is a key padding mask.
    encoder = FavorTransformerEncoder(**SMALL)
    x = data(2, 6, 8)
    mask = np.array([[1, 1, 1, 0, 1, 0], [1] * 6], bool)
    expected = to_numpy(encoder(x, padding_mask=mask))
    got = to_numpy(encoder(x, attention_mask=mask[:, None, :]))
    both = to_numpy(encoder(x, padding_mask=mask, attention_mask=np.ones((2, 1, 6), bool)))
    # The padding mask also masks the outputs' queries; the attention mask only the keys, so
    # compare the real positions.
    np.testing.assert_allclose(got[mask], expected[mask], atol=1e-6)
    np.testing.assert_allclose(both, expected, atol=1e-6)


def test_dense_attention_mask_raises_for_favor_and_applies_for_softmax():
    x = data(2, 4, 8)
    dense = np.tril(np.ones((4, 4), bool))[None].repeat(2, 0)  # (B, T, T)
    with pytest.raises(ValueError, match=r"`attention_mask`.*attention_mask.shape=\(2, 4, 4\)"):
        FavorTransformerEncoder(**SMALL)(x, attention_mask=dense)
    softmax = FavorTransformerEncoder(**SMALL, attention_type="softmax")
    assert np.abs(to_numpy(softmax(x, attention_mask=dense)) - to_numpy(softmax(x))).max() > 1e-3


def test_implicit_mask_equals_padding_mask_and_propagates():
    ids = np.array([[4, 2, 7, 0, 0], [1, 3, 3, 8, 9]], "int32")
    embedding = keras.layers.Embedding(10, 8, mask_zero=True)
    encoder = FavorTransformerEncoder(**SMALL)
    inputs = keras.Input((None,), dtype="int32")
    outputs = encoder(embedding(inputs))
    assert getattr(outputs, "_keras_mask", None) is not None  # the mask flows on
    model = keras.Model(inputs, outputs)
    explicit = encoder(embedding.embeddings.numpy()[ids], padding_mask=ids != 0)
    np.testing.assert_allclose(model.predict(ids, verbose=0), to_numpy(explicit), atol=1e-5)
    # An implicit mask and an explicit one combine (logical and).
    partial = np.array([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]], bool)
    both = encoder(embedding(ids), padding_mask=partial)
    alone = encoder(embedding.embeddings.numpy()[ids], padding_mask=partial & (ids != 0))
    np.testing.assert_allclose(to_numpy(both), to_numpy(alone), atol=1e-6)


def test_rotary_attention_is_linear_attention_of_rotated_projections():
    # With RoPE the self-attention is exactly favor_attention(R q, R k, v): the rotation acts on
    # each projected query and key before the feature map, so nothing quadratic is formed.
    encoder = FavorTransformerEncoder(**SMALL, use_rotary_embedding=True, rotary_max_wavelength=50)
    x = data(2, 9, 8)
    encoder(x)
    attention = encoder._self_attention_layer

    def project(dense):
        return ops.einsum("btE,ENH->btNH", x, dense.kernel) + dense.bias

    rotary = RotaryEmbedding(max_wavelength=50)
    q, k = rotary(project(attention.query_dense)), rotary(project(attention.key_dense))
    v = project(attention.value_dense)
    mask = np.array([[1] * 6 + [0] * 3, [1] * 9], bool)
    heads = favor_attention(
        q, k, v, attention.feature_map, attention.projection_matrix, key_padding_mask=mask
    )
    expected = attention.output_dense(heads)
    np.testing.assert_allclose(
        to_numpy(attention(x, x, value_mask=mask)), to_numpy(expected), atol=1e-5
    )
    # And RoPE changes the result (it is applied at all).
    plain = favor_attention(
        project(attention.query_dense),
        project(attention.key_dense),
        v,
        attention.feature_map,
        attention.projection_matrix,
        key_padding_mask=mask,
    )
    assert np.abs(to_numpy(attention.output_dense(plain)) - to_numpy(expected)).max() > 1e-3


def test_rope_makes_the_encoder_depend_on_order():
    # Without positions a bidirectional block is permutation-equivariant; RoPE breaks that.
    x = data(1, 6, 8)
    perm = np.array([3, 0, 5, 1, 4, 2])
    plain = FavorTransformerEncoder(**SMALL)
    np.testing.assert_allclose(to_numpy(plain(x[:, perm])), to_numpy(plain(x))[:, perm], atol=1e-5)
    rope = FavorTransformerEncoder(**SMALL, use_rotary_embedding=True)
    assert np.abs(to_numpy(rope(x[:, perm])) - to_numpy(rope(x))[:, perm]).max() > 1e-3


def test_seeds_are_derived_and_distinct():
    a, b, a2 = (FavorTransformerEncoder(**dict(SMALL, seed=s)) for s in (0, 1, 0))
    x = data(1, 4, 8)
    for layer in (a, b, a2):
        layer(x)
    pa, pb, pa2 = (to_numpy(e._self_attention_layer.projection_matrix) for e in (a, b, a2))
    np.testing.assert_array_equal(pa, pa2)
    assert not np.allclose(pa, pb)
    seeds = {
        a._self_attention_layer.seed,
        a._self_attention_dropout.seed,
        a._feedforward_dropout.seed,
        b._self_attention_layer.seed,
    }
    assert len(seeds) == 4 and 0 not in seeds
    unseeded = FavorTransformerEncoder(**dict(SMALL, seed=None))
    unseeded(x)
    assert unseeded._self_attention_layer.seed is None


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"intermediate_dim": 0}, "intermediate_dim"),
        ({"num_heads": 1.0}, "num_heads"),
        ({"dropout": 1.0}, "dropout"),
        ({"activation": "no_such_activation"}, "activation"),
        ({"layer_norm_epsilon": 0}, "layer_norm_epsilon"),
        ({"kernel_initializer": "no_such_init"}, "kernel_initializer"),
        ({"bias_initializer": 3}, "bias_initializer"),
        ({"normalize_first": "yes"}, "normalize_first"),
        ({"feature_map": "softmax"}, "feature_map"),
        ({"num_random_features": -1}, "num_random_features"),
        ({"orthogonal": None}, "orthogonal"),
        ({"row_norms": "unit"}, "row_norms"),
        ({"causal_chunk_size": 0}, "causal_chunk_size"),
        ({"use_rotary_embedding": 1}, "use_rotary_embedding"),
        ({"rotary_max_wavelength": 0}, "rotary_max_wavelength"),
        ({"seed": -1}, "seed"),
        ({"attention_type": "exact"}, "attention_type"),
        ({"attention_type": None}, "attention_type"),
    ],
)
def test_bad_constructor_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FavorTransformerEncoder(**{**SMALL, **kwargs})


def test_bad_shapes():
    with pytest.raises(ValueError, match="num_heads"):
        FavorTransformerEncoder(16, 3)(data(1, 4, 8))
    with pytest.raises(ValueError, match="use_rotary_embedding"):
        FavorTransformerEncoder(16, 4, use_rotary_embedding=True)(data(1, 4, 12))
    with pytest.raises(ValueError, match="padding_mask"):
        FavorTransformerEncoder(**SMALL)(data(2, 4, 8), padding_mask=np.ones((2, 5), bool))


# ---------------------------------------------------------------------------------------------
# attention_type="softmax": exact attention with the same weights.


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"normalize_first": True, "activation": "gelu"},
        {"use_rotary_embedding": True, "rotary_max_wavelength": 50},
    ],
    ids=["post_norm", "pre_norm_gelu", "rope"],
)
def test_softmax_block_equals_numpy_softmax_attention(kwargs):
    encoder = FavorTransformerEncoder(**SMALL, attention_type="softmax", **kwargs)
    x = data(2, 7, 8)
    mask = np.array([[1, 1, 1, 1, 0, 0, 0], [1] * 7], bool)
    out = to_numpy(encoder(x, padding_mask=mask))
    assert isinstance(encoder._self_attention_layer, keras.layers.MultiHeadAttention)
    expected = softmax_reference.encoder_block(encoder, x, mask)
    np.testing.assert_allclose(out, expected, atol=2e-5)
    # Padding equals truncation, as for FAVOR.
    np.testing.assert_allclose(out[0, :4], to_numpy(encoder(x[:1, :4]))[0], atol=2e-5)


def test_softmax_block_honours_implicit_masks():
    ids = np.array([[4, 2, 7, 0, 0], [1, 3, 3, 8, 9]], "int32")
    embedding = keras.layers.Embedding(10, 8, mask_zero=True)
    encoder = FavorTransformerEncoder(**SMALL, attention_type="softmax")
    inputs = keras.Input((None,), dtype="int32")
    outputs = encoder(embedding(inputs))
    assert getattr(outputs, "_keras_mask", None) is not None
    model = keras.Model(inputs, outputs)
    vectors = embedding.embeddings.numpy()[ids]
    real = ids != 0
    np.testing.assert_allclose(
        model.predict(ids, verbose=0)[real],
        softmax_reference.encoder_block(encoder, vectors, real)[real],
        atol=2e-5,
    )


def load_by_path(target, source):
    """Assigns every weight of `source` to the weight of `target` with the same path."""
    by_path = {w.path: w for w in target.weights}
    for w in source.weights:
        assert tuple(by_path[w.path].shape) == tuple(w.shape), w.path
        by_path[w.path].assign(w)


@pytest.mark.parametrize("use_rotary_embedding", [False, True])
def test_softmax_weights_load_into_favor_block(use_rotary_embedding):
    # The same sub-layers and weight paths; FAVOR only adds ω and the redraw count. With many
    # random features and inputs of small norm (FAVOR's low-variance regime; fixed seeds), the FAVOR
    # block then approximates the softmax block it was loaded from (measured max error 0.013 to
    # 0.036 on TF and JAX, vs about 2 for unrelated weights).
    keras.utils.set_random_seed(1)  # the initial weights
    x = 0.25 * data(2, 6, 8)
    options = dict(SMALL, use_rotary_embedding=use_rotary_embedding, name="block")
    softmax = FavorTransformerEncoder(**dict(options, attention_type="softmax", seed=7))
    favor = FavorTransformerEncoder(**dict(options, num_random_features=2048))
    exact = to_numpy(softmax(x))
    unloaded_error = np.abs(to_numpy(favor(x)) - exact).max()
    softmax_paths = [w.path for w in softmax.weights]
    favor_paths = [w.path for w in favor.weights]
    assert [p for p in favor_paths if p not in softmax_paths] == [
        "block/self_attention/projection_matrix",
        "block/self_attention/redraw_count",
    ]
    load_by_path(favor, softmax)
    for w in softmax.weights:
        np.testing.assert_array_equal(
            to_numpy(w), to_numpy(favor.weights[favor_paths.index(w.path)])
        )
    error = np.abs(to_numpy(favor(x)) - exact).max()
    assert error < 0.1 and error < unloaded_error / 10, (error, unloaded_error)
    # And set_weights works once ω and the count are spliced in after the attention's weights.
    attention_weights = len(softmax._self_attention_layer.weights)
    spliced = FavorTransformerEncoder(**dict(options, num_random_features=2048))
    spliced(x)
    own = spliced.get_weights()[attention_weights : attention_weights + 2]
    theirs = softmax.get_weights()
    spliced.set_weights(theirs[:attention_weights] + own + theirs[attention_weights:])
    np.testing.assert_array_equal(to_numpy(spliced(x)), to_numpy(favor(x)))


# ---------------------------------------------------------------------------------------------
# Local exact window


def test_local_window_padding_equals_truncation():
    encoder = FavorTransformerEncoder(**SMALL, local_window=2, feature_map="hedgehog")
    x = data(2, 7, 8)
    mask = np.ones((2, 7), bool)
    mask[1, 4:] = False
    out = to_numpy(encoder(x, padding_mask=mask))
    np.testing.assert_allclose(out[1, :4], to_numpy(encoder(x[1:, :4]))[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[0], to_numpy(encoder(x[:1]))[0], atol=1e-5, rtol=0)


def test_a_window_covering_the_sequence_equals_the_softmax_block():
    # Bidirectional: |t − s| < 6 covers every pair of 6 positions.
    softmax = FavorTransformerEncoder(**SMALL, attention_type="softmax")
    hybrid = FavorTransformerEncoder(**SMALL, local_window=6, feature_map="hedgehog")
    x = data(2, 6, 8)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
    softmax(x)
    hybrid(x)
    hybrid_weights = {w.path.split("/", 1)[1]: w for w in hybrid.weights}
    for w in softmax.weights:
        hybrid_weights[w.path.split("/", 1)[1]].assign(w)
    want = to_numpy(softmax(x, padding_mask=mask))
    np.testing.assert_allclose(to_numpy(hybrid(x, padding_mask=mask)), want, atol=2e-6)
    narrow = FavorTransformerEncoder.from_config({**hybrid.get_config(), "local_window": 2})
    narrow(x)
    narrow.set_weights(hybrid.get_weights())
    assert np.abs(to_numpy(narrow(x, padding_mask=mask)) - want).max() > 1e-3

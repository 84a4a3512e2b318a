"""Tests of `FavorTransformerDecoder`: the harness with every argument non-default (self- and
cross-attention), no causal leak through a whole stack, `step` equal to the full call, padding of
the decoder and of the encoder (= truncation), implicit masks, RoPE, seeds, bad arguments."""

import keras
import numpy as np
import pytest

from keras_favor.feature_maps import ReLU
from keras_favor.layers import (
    FavorTransformerDecoder,
    TokenAndPositionEmbedding,
    decode_plan,
    initial_decode_state,
)
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
    feature_map=ReLU(epsilon=1e-2),
    num_random_features=8,
    orthogonal=False,
    row_norms="sqrt_dim",
    causal_chunk_size=4,
    use_rotary_embedding=True,
    rotary_max_wavelength=100,
    seed=3,
    causal_conv_kernel_size=3,
)
# decay and local_window only apply to FAVOR: a softmax block refuses them.
FAVOR_ONLY = dict(decay=[0.9, 0.5], local_window=3)


def non_default_arguments(kwargs, attention_type):
    """ALL_ARGUMENTS for `attention_type`; every argument non-default but attention_type
    ('favor') or FAVOR_ONLY ('softmax'), which is checked here instead of by the harness."""
    kwargs = dict(kwargs, attention_type=attention_type)
    if attention_type == "favor":
        kwargs.update(FAVOR_ONLY)
    defaults = {
        name
        for name, default in init_arguments(FavorTransformerDecoder).items()
        if name not in kwargs or kwargs[name] == default
    }
    assert defaults == ({"attention_type"} if attention_type == "favor" else set(FAVOR_ONLY))
    return kwargs


SMALL = dict(intermediate_dim=16, num_heads=2, num_random_features=16, seed=0)


class TestHarness(TestCase):
    # "softmax" is the only non-default attention_type: with it every argument is non-default.
    @pytest.mark.heavy
    @pytest.mark.parametrize("attention_type", ["favor", "softmax"])
    def test_self_attention_all_arguments_non_default(self, attention_type):
        self.run_layer_test(
            FavorTransformerDecoder,
            non_default_arguments(ALL_ARGUMENTS, attention_type),
            {"decoder_sequence": data(2, 6, 8)},
            (2, 6, 8),
            expected_num_trainable_weights=18,
            expected_num_non_trainable_weights=2 if attention_type == "favor" else 0,
        )

    @pytest.mark.heavy
    @pytest.mark.parametrize("attention_type", ["favor", "softmax"])
    def test_cross_attention_all_arguments_non_default(self, attention_type):
        self.run_layer_test(
            FavorTransformerDecoder,
            non_default_arguments(ALL_ARGUMENTS, attention_type),
            {"decoder_sequence": data(2, 6, 8), "encoder_sequence": data(2, 5, 6, seed=1)},
            (2, 6, 8),
            expected_num_trainable_weights=28,  # + 4 projections and a norm
            expected_num_non_trainable_weights=4 if attention_type == "favor" else 0,
            # Exact softmax is invariant to the key bias (it adds q·b to every score of a
            # query), so without RoPE (never on cross-attention) its gradient is exactly zero.
            run_training_check=attention_type == "favor",
        )

    @pytest.mark.heavy
    def test_defaults_with_masks(self):
        self.run_layer_test(
            FavorTransformerDecoder,
            SMALL,
            {
                "decoder_sequence": data(2, 5, 8),
                "encoder_sequence": data(2, 4, 8, seed=1),
                "decoder_padding_mask": np.array([[1, 1, 1, 0, 0], [1] * 5], bool),
                "encoder_padding_mask": np.array([[1, 1, 0, 0], [1] * 4], bool),
            },
            (2, 5, 8),
            run_mixed_precision_check=False,
        )


def decoder_stack_model(num_layers=3, **kwargs):
    tokens = keras.Input((None,), dtype="int32")
    x = TokenAndPositionEmbedding(30, 32, 8)(tokens)
    for i in range(num_layers):
        x = FavorTransformerDecoder(**{**SMALL, "seed": i, **kwargs})(x)
    return keras.Model(tokens, keras.layers.Dense(30)(x))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_rotary_embedding": True, "normalize_first": True, "causal_chunk_size": 3},
        {"feature_map": "softmax_hyperbolic", "causal_chunk_size": 5},
        {"feature_map": "elu", "causal_chunk_size": 1},
        {"decay": "retnet", "causal_conv_kernel_size": 4, "causal_chunk_size": 3},
    ],
    ids=["default", "rope_prenorm_chunk3", "hyperbolic_chunk5", "elu_chunk1", "decay_conv"],
)
def test_no_causal_leak_through_the_stack(kwargs):
    model = decoder_stack_model(**kwargs)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30, size=(2, 12)).astype("int32")
    out = model.predict(ids, verbose=0)
    for t in (0, 4, 10):
        changed = ids.copy()
        changed[:, t + 1 :] = rng.integers(0, 30, size=changed[:, t + 1 :].shape)
        changed_out = model.predict(changed, verbose=0)
        np.testing.assert_allclose(changed_out[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-6)
        assert np.abs(changed_out[:, t + 1 :] - out[:, t + 1 :]).max() > 1e-3


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_rotary_embedding": True, "causal_chunk_size": 2},
        {"normalize_first": True, "feature_map": "relu"},
        {"feature_map": "softmax_trig", "causal_chunk_size": 4},
        {"feature_map": "softmax_optimal"},
    ],
    ids=["default", "rope_chunk2", "prenorm_relu", "trig_chunk4", "optimal"],
)
def test_step_equals_call(kwargs):
    decoder = FavorTransformerDecoder(**{**SMALL, **kwargs})
    x = data(2, 9, 8)
    full = to_numpy(decoder(x))
    state = decoder.get_initial_state(2)
    shapes = [tuple(s.shape) for s in state]
    # softmax_trig's signed features make the normaliser a difference of terms: relative input
    # perturbations reach the output ~10x more amplified than with positive features (66 vs 7,
    # measured), so float32 rounding in a different summation order (chunked prefix vs running
    # state; CPU- and XLA-version dependent) reaches 2.2e-5 on some CPUs. A wrong
    # state (one token skipped) is off by 0.09-1.8.
    atol = 1e-4 if kwargs.get("feature_map") == "softmax_trig" else 1e-5
    for t in range(9):
        out, state = decoder.step(x[:, t], state, position=t)
        np.testing.assert_allclose(to_numpy(out), full[:, t], atol=atol, rtol=0)
        assert [tuple(s.shape) for s in state] == shapes  # fixed size
    assert shapes == [
        (2, 2, decoder._self_attention_layer.feature_map.output_dim(4, 16), 4),
        (2, 2, decoder._self_attention_layer.feature_map.output_dim(4, 16)),
        (2, 3, 8),  # the default convolution's last k - 1 = 3 inputs
    ]


def test_step_with_cross_attention_and_padding_equals_call():
    decoder = FavorTransformerDecoder(**SMALL, use_rotary_embedding=True)
    x, encoder = data(2, 6, 8), data(2, 5, 8, seed=1)
    encoder_mask = np.array([[1, 1, 1, 0, 0], [1] * 5], bool)
    decoder_mask = np.array([[0, 0, 1, 1, 1, 1], [1] * 6], bool)  # left padding
    full = to_numpy(
        decoder(x, encoder, decoder_padding_mask=decoder_mask, encoder_padding_mask=encoder_mask)
    )
    state = decoder.get_initial_state(2)
    for t in range(6):
        out, state = decoder.step(
            x[:, t],
            state,
            position=t,
            encoder_sequence=encoder,
            decoder_padding_mask=decoder_mask[:, t],
            encoder_padding_mask=encoder_mask,
        )
        real = decoder_mask[:, t]
        np.testing.assert_allclose(to_numpy(out)[real], full[real, t], atol=1e-5)


@pytest.mark.parametrize("normalize_first", [pytest.param(False, marks=pytest.mark.heavy), True])
def test_encoder_padding_equals_truncation(normalize_first):
    decoder = FavorTransformerDecoder(**SMALL, normalize_first=normalize_first)
    x, encoder = data(2, 5, 8), data(2, 7, 6, seed=1)
    encoder_mask = np.array([[1, 1, 1, 0, 0, 0, 0], [1] * 7], bool)
    out = to_numpy(decoder(x, encoder, encoder_padding_mask=encoder_mask))
    np.testing.assert_allclose(out[:1], to_numpy(decoder(x[:1], encoder[:1, :3])), atol=1e-5)
    np.testing.assert_allclose(out[1:], to_numpy(decoder(x[1:], encoder[1:])), atol=1e-5)
    garbage = encoder.copy()
    garbage[0, 3:] = -50.0
    np.testing.assert_allclose(
        to_numpy(decoder(x, garbage, encoder_padding_mask=encoder_mask)), out, atol=1e-5
    )


def test_decoder_padding_equals_truncation():
    decoder = FavorTransformerDecoder(**SMALL)
    x, encoder = data(2, 6, 8), data(2, 4, 8, seed=1)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1] * 6], bool)
    out = to_numpy(decoder(x, encoder, decoder_padding_mask=mask))
    np.testing.assert_allclose(out[0, :4], to_numpy(decoder(x[:1, :4], encoder[:1]))[0], atol=1e-5)
    # Left padding: the real tokens see only real tokens.
    left = np.array([[0, 0, 1, 1, 1, 1], [1] * 6], bool)
    out = to_numpy(decoder(x, encoder, decoder_padding_mask=left))
    np.testing.assert_allclose(out[0, 2:], to_numpy(decoder(x[:1, 2:], encoder[:1]))[0], atol=1e-5)


def test_implicit_masks_of_both_sequences():
    decoder_ids = np.array([[3, 4, 5, 0], [1, 2, 3, 4]], "int32")
    encoder_ids = np.array([[7, 8, 0, 0, 0], [6, 5, 4, 3, 2]], "int32")
    dec_embedding = keras.layers.Embedding(10, 8, mask_zero=True)
    enc_embedding = keras.layers.Embedding(10, 8, mask_zero=True)
    decoder = FavorTransformerDecoder(**SMALL)
    dec_in = keras.Input((None,), dtype="int32")
    enc_in = keras.Input((None,), dtype="int32")
    outputs = decoder(dec_embedding(dec_in), enc_embedding(enc_in))
    assert getattr(outputs, "_keras_mask", None) is not None
    model = keras.Model([dec_in, enc_in], outputs)
    explicit = decoder(
        dec_embedding.embeddings.numpy()[decoder_ids],
        enc_embedding.embeddings.numpy()[encoder_ids],
        decoder_padding_mask=decoder_ids != 0,
        encoder_padding_mask=encoder_ids != 0,
    )
    np.testing.assert_allclose(
        model.predict([decoder_ids, encoder_ids], verbose=0), to_numpy(explicit), atol=1e-5
    )


def test_cross_attention_seed_differs_from_self_attention():
    decoder = FavorTransformerDecoder(**SMALL)
    decoder(data(1, 3, 8), data(1, 4, 8))
    self_w = to_numpy(decoder._self_attention_layer.projection_matrix)
    cross_w = to_numpy(decoder._cross_attention_layer.projection_matrix)
    assert decoder._self_attention_layer.seed != decoder._cross_attention_layer.seed
    assert not np.allclose(self_w, cross_w)


def test_cross_attention_consistency_errors():
    decoder = FavorTransformerDecoder(**SMALL)
    decoder(data(1, 3, 8))
    assert decoder.has_cross_attention is False
    with pytest.raises(ValueError, match="encoder_sequence"):
        decoder(data(1, 3, 8), data(1, 4, 8))
    crossed = FavorTransformerDecoder(**SMALL)
    crossed(data(1, 3, 8), data(1, 4, 8))
    assert crossed.has_cross_attention is True
    with pytest.raises(ValueError, match="encoder_sequence"):
        crossed(data(1, 3, 8))
    with pytest.raises(ValueError, match="encoder_sequence"):
        crossed.step(data(1, 8), crossed.get_initial_state(1), position=0)
    with pytest.raises(ValueError, match="encoder_padding_mask"):
        crossed(data(1, 3, 8), data(1, 4, 8), encoder_padding_mask=np.ones((1, 3), bool))


def test_bad_step_arguments():
    unbuilt = FavorTransformerDecoder(**SMALL)
    assert unbuilt.has_cross_attention is None
    with pytest.raises(ValueError, match="built"):
        unbuilt.get_initial_state(1)
    rope = FavorTransformerDecoder(**SMALL, use_rotary_embedding=True)
    rope(data(1, 3, 8))
    with pytest.raises(ValueError, match="position"):
        rope.step(data(1, 8), rope.get_initial_state(1))
    with pytest.raises(ValueError, match="inputs"):
        rope.step(data(1, 1, 8), rope.get_initial_state(1), position=0)
    with pytest.raises(ValueError, match="batch_size"):
        rope.get_initial_state(0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"intermediate_dim": None}, "intermediate_dim"),
        ({"num_heads": 0}, "num_heads"),
        ({"dropout": -0.1}, "dropout"),
        ({"layer_norm_epsilon": "small"}, "layer_norm_epsilon"),
        ({"normalize_first": 0}, "normalize_first"),
        ({"feature_map": 3}, "feature_map"),
        ({"num_random_features": 0}, "num_random_features"),
        ({"row_norms": None}, "row_norms"),
        ({"causal_chunk_size": 2.5}, "causal_chunk_size"),
        ({"rotary_max_wavelength": -5}, "rotary_max_wavelength"),
        ({"seed": 1.5}, "seed"),
        ({"attention_type": "linear"}, "attention_type"),
        ({"decay": 1.5}, "decay"),
        ({"decay": [0.9, 0.9, 0.9]}, "decay"),
        ({"causal_conv_kernel_size": 1}, "causal_conv_kernel_size"),
        ({"causal_conv_kernel_size": 2.0}, "causal_conv_kernel_size"),
    ],
)
def test_bad_constructor_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FavorTransformerDecoder(**{**SMALL, **kwargs})


def test_keras_hub_call_arguments():
    """decoder_attention_mask / encoder_attention_mask (B, 1, ·) act as key padding masks;
    use_causal_mask=False gives bidirectional self-attention; dense masks raise (FAVOR)."""
    decoder = FavorTransformerDecoder(**SMALL)
    x, encoder = data(2, 6, 8), data(2, 5, 8, seed=1)
    decoder_keys = np.array([[1, 1, 1, 1, 1, 0], [1] * 6], bool)
    encoder_keys = np.array([[1, 1, 0, 1, 1], [1, 1, 1, 1, 0]], bool)
    expected = to_numpy(
        decoder(x, encoder, decoder_padding_mask=decoder_keys, encoder_padding_mask=encoder_keys)
    )
    got = to_numpy(
        decoder(
            x,
            encoder,
            decoder_attention_mask=decoder_keys[:, None],
            encoder_attention_mask=encoder_keys[:, None],
        )
    )
    # decoder_padding_mask also masks the queries passed on; compare real positions.
    np.testing.assert_allclose(got[decoder_keys], expected[decoder_keys], atol=1e-5)
    causal = to_numpy(decoder(x, encoder))
    bidirectional = to_numpy(decoder(x, encoder, use_causal_mask=False))
    np.testing.assert_allclose(bidirectional[:, -1], causal[:, -1], atol=1e-5)  # sees all keys
    assert np.abs(bidirectional[:, 0] - causal[:, 0]).max() > 1e-3
    softmax_block = FavorTransformerDecoder(**SMALL, attention_type="softmax")
    exact = to_numpy(softmax_block(x, use_causal_mask=False))
    np.testing.assert_allclose(exact[:, -1], to_numpy(softmax_block(x))[:, -1], atol=1e-5)
    assert np.abs(exact[:, 0] - to_numpy(softmax_block(x))[:, 0]).max() > 1e-3
    dense = np.ones((2, 6, 6), bool)
    with pytest.raises(ValueError, match=r"decoder_attention_mask.shape=\(2, 6, 6\)"):
        decoder(x, encoder, decoder_attention_mask=dense)
    with pytest.raises(ValueError, match=r"encoder_attention_mask.shape=\(2, 1, 4\)"):
        decoder(x, encoder, encoder_attention_mask=np.ones((2, 1, 4), bool))
    with pytest.raises(ValueError, match="use_causal_mask"):
        decoder(x, encoder, use_causal_mask="yes")


@pytest.mark.heavy
@pytest.mark.filterwarnings("ignore:Layer .* does not have a `quantize` method")
@pytest.mark.parametrize("use_rotary_embedding", [False, True])
def test_int8_quantized_block_still_streams(use_rotary_embedding):
    decoder = FavorTransformerDecoder(**SMALL, use_rotary_embedding=use_rotary_embedding)
    inputs = keras.Input((None, 8))
    model = keras.Model(inputs, decoder(inputs))
    x = data(2, 5, 8)
    before = model.predict(x, verbose=0)
    model.quantize("int8")
    attention = decoder._self_attention_layer
    projections = (attention.query_dense, attention.key_dense, attention.value_dense)
    assert all(p.quantization_mode == "int8" for p in projections)  # RoPE ones included
    full = model.predict(x, verbose=0)
    assert 0 < np.abs(full - before).max() < 0.1
    state = decoder.get_initial_state(2)
    for t in range(5):
        out, state = decoder.step(x[:, t], state, position=t)
        np.testing.assert_allclose(to_numpy(out), full[:, t], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# attention_type="softmax": exact causal attention with the same weights.


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"normalize_first": True, "activation": "gelu"},
        {"use_rotary_embedding": True, "rotary_max_wavelength": 50},
    ],
    ids=["post_norm", "pre_norm_gelu", "rope"],
)
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_softmax_block_equals_numpy_causal_softmax_attention(kwargs, cross):
    decoder = FavorTransformerDecoder(**SMALL, attention_type="softmax", **kwargs)
    x = data(2, 6, 8)
    encoder = data(2, 5, 6, seed=1) if cross else None
    decoder_mask = np.array([[1, 1, 1, 1, 0, 0], [1] * 6], bool)
    encoder_mask = np.array([[1, 1, 1, 0, 0], [1] * 5], bool) if cross else None
    out = to_numpy(
        decoder(
            x,
            encoder,
            decoder_padding_mask=decoder_mask,
            encoder_padding_mask=encoder_mask,
        )
    )
    assert isinstance(decoder._self_attention_layer, keras.layers.MultiHeadAttention)
    expected = softmax_reference.decoder_block(decoder, x, encoder, decoder_mask, encoder_mask)
    real = decoder_mask  # padded queries are free in a causal block (they may see no key)
    np.testing.assert_allclose(out[real], expected[real], atol=2e-5)


@pytest.mark.heavy
def test_softmax_block_has_no_causal_leak():
    model = decoder_stack_model(attention_type="softmax")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30, size=(2, 10)).astype("int32")
    out = model.predict(ids, verbose=0)
    changed = ids.copy()
    changed[:, 5:] = (changed[:, 5:] + 1) % 30
    changed_out = model.predict(changed, verbose=0)
    np.testing.assert_allclose(changed_out[:, :5], out[:, :5], rtol=0, atol=1e-6)
    assert np.abs(changed_out[:, 5:] - out[:, 5:]).max() > 1e-3


@pytest.mark.heavy
def test_softmax_block_cannot_stream():
    decoder = FavorTransformerDecoder(**SMALL, attention_type="softmax")
    x = data(1, 3, 8)
    decoder(x)
    with pytest.raises(ValueError, match="attention_type"):
        decoder.get_initial_state(1)
    with pytest.raises(ValueError, match="attention_type"):
        decoder.step(x[:, 0], None)
    model = decoder_stack_model(num_layers=2, attention_type="softmax")
    model.predict(np.zeros((1, 3), "int32"), verbose=0)
    with pytest.raises(ValueError, match="attention_type"):
        decode_plan(model)
    with pytest.raises(ValueError, match="attention_type"):
        initial_decode_state(model, 1)


# ---------------------------------------------------------------------------------------------
# Decay and causal convolution


def perturbed_conv(decoder, seed=0):
    # The convolution starts as the identity; random filters make every test below able to fail.
    conv = decoder._causal_conv
    conv.kernel.assign(np.random.default_rng(seed).normal(size=conv.kernel.shape))
    conv.bias.assign(np.random.default_rng(seed + 1).normal(size=conv.bias.shape))


def streamed(kwargs):
    """A decoder with `kwargs` (random convolution filters) whose every `step` equals its full
    call at that position, with a state of fixed size; returns it and its state's shapes."""
    decoder = FavorTransformerDecoder(**{**SMALL, **kwargs})
    x = data(2, 9, 8)
    decoder(x)
    if decoder._causal_conv is not None:
        perturbed_conv(decoder)
    full = to_numpy(decoder(x))
    state = decoder.get_initial_state(2)
    shapes = [tuple(s.shape) for s in state]
    for t in range(9):
        out, state = decoder.step(x[:, t], state, position=t)
        np.testing.assert_allclose(to_numpy(out), full[:, t], atol=1e-5, rtol=0)
        assert [tuple(s.shape) for s in state] == shapes  # fixed size
    return decoder, shapes


@pytest.mark.parametrize(
    "kwargs",
    [
        {"decay": "retnet", "causal_chunk_size": 3},
        {"causal_conv_kernel_size": 3, "causal_chunk_size": 4},
        {"decay": [0.6, 0.99], "causal_conv_kernel_size": 4, "use_rotary_embedding": True},
        {"decay": 0.8, "causal_conv_kernel_size": 2, "normalize_first": True},
    ],
    ids=["decay", "conv", "decay_conv_rope", "decay_conv_prenorm"],
)
def test_decay_and_conv_step_equals_call(kwargs):
    decoder, shapes = streamed(kwargs)
    conv = kwargs.get("causal_conv_kernel_size", 4)  # 4: the default
    assert shapes[2:] == ([] if conv is None else [(2, conv - 1, 8)])


@pytest.mark.heavy
def test_conv_starts_as_the_identity():
    x = data(2, 7, 8)
    plain = FavorTransformerDecoder(**SMALL)
    conv = FavorTransformerDecoder(**SMALL, causal_conv_kernel_size=3)
    want = to_numpy(plain(x))
    conv(x)
    for name in (
        "_self_attention_layer",
        "_self_attention_layer_norm",
        "_feedforward_layer_norm",
        "_feedforward_intermediate_dense",
        "_feedforward_output_dense",
    ):
        getattr(conv, name).set_weights(getattr(plain, name).get_weights())
    np.testing.assert_array_equal(to_numpy(conv(x)), want)


@pytest.mark.parametrize("left", [False, True])
def test_decay_and_conv_padding_equals_truncation(left):
    decoder = FavorTransformerDecoder(**SMALL, decay="retnet", causal_conv_kernel_size=3)
    x = data(2, 7, 8)
    decoder(x)
    perturbed_conv(decoder)
    real = slice(3, None) if left else slice(None, 4)
    mask = np.zeros((2, 7), bool)
    mask[:, real] = True
    out = to_numpy(decoder(x, decoder_padding_mask=mask))
    np.testing.assert_allclose(out[:, real], to_numpy(decoder(x[:, real])), atol=1e-5, rtol=0)


def test_decay_refuses_bidirectional_use_and_softmax_blocks():
    decoder = FavorTransformerDecoder(**SMALL, decay=0.9)
    with pytest.raises(ValueError, match=r"`decay`.*use_causal_mask=False"):
        decoder(data(2, 5, 8), use_causal_mask=False)
    with pytest.raises(ValueError, match=r"`decay`.*attention_type='softmax'"):
        FavorTransformerDecoder(**SMALL, decay=0.9, attention_type="softmax")


def test_step_refuses_a_state_without_the_conv_buffer():
    decoder = FavorTransformerDecoder(**SMALL, causal_conv_kernel_size=3)
    x = data(2, 5, 8)
    decoder(x)
    state = decoder.get_initial_state(2)
    with pytest.raises(ValueError, match=r"`state`.*3 arrays.*Received: a state of 2 arrays"):
        decoder.step(x[:, 0], state[:2])


def test_convolution_by_default_and_configs_saved_without_it_load_without_it():
    decoder = FavorTransformerDecoder(**SMALL)
    config = decoder.get_config()
    assert config["causal_conv_kernel_size"] == 4
    assert FavorTransformerDecoder.from_config(config).causal_conv_kernel_size == 4
    # A config written before the option existed describes a block without a convolution.
    older = {k: v for k, v in config.items() if k != "causal_conv_kernel_size"}
    loaded = FavorTransformerDecoder.from_config(older)
    assert loaded.causal_conv_kernel_size is None
    loaded.build((2, 5, 8))
    assert not any("causal_conv" in w.path for w in loaded.weights)
    assert (
        FavorTransformerDecoder(**SMALL, causal_conv_kernel_size=None).causal_conv_kernel_size
        is None
    )


# ---------------------------------------------------------------------------------------------
# Local exact window


@pytest.mark.parametrize(
    "kwargs",
    [
        {"local_window": 3, "feature_map": "hedgehog", "causal_chunk_size": 2},
        # The JAX pass (compiling every shape) runs the first; TensorFlow all of them.
        pytest.param(
            {"local_window": 1, "use_rotary_embedding": True, "decay": "retnet"},
            marks=pytest.mark.heavy,
        ),
        pytest.param(
            {"local_window": 4, "feature_map": "elu", "causal_conv_kernel_size": None},
            marks=pytest.mark.heavy,
        ),
    ],
    ids=["hedgehog_conv", "rope_decay_conv", "elu_noconv"],
)
def test_local_window_step_equals_call(kwargs):
    decoder, shapes = streamed(kwargs)
    window = kwargs["local_window"]
    assert shapes[2:4] == [(2, 2, window, 4), (2, 2, window, 5)]  # last keys, values + 1
    assert len(shapes) == 4 + (decoder._causal_conv is not None)


@pytest.mark.parametrize("left", [False, True])
def test_local_window_padding_equals_truncation(left):
    decoder = FavorTransformerDecoder(**SMALL, local_window=2, feature_map="hedgehog")
    x = data(2, 7, 8)
    real = slice(3, None) if left else slice(None, 4)
    mask = np.zeros((2, 7), bool)
    mask[:, real] = True
    out = to_numpy(decoder(x, decoder_padding_mask=mask))
    np.testing.assert_allclose(out[:, real], to_numpy(decoder(x[:, real])), atol=1e-5, rtol=0)


@pytest.mark.heavy
@pytest.mark.parametrize("use_rotary_embedding", [False, True])
def test_a_window_covering_the_sequence_equals_the_softmax_block(use_rotary_embedding):
    kwargs = dict(SMALL, use_rotary_embedding=use_rotary_embedding)
    softmax = FavorTransformerDecoder(**kwargs, attention_type="softmax")
    hybrid = FavorTransformerDecoder(**kwargs, local_window=6, feature_map="hedgehog")
    x = data(2, 6, 8)
    softmax(x)
    hybrid(x)
    hybrid_weights = {w.path.split("/", 1)[1]: w for w in hybrid.weights}
    for w in softmax.weights:  # the hybrid has the map's weights besides
        hybrid_weights[w.path.split("/", 1)[1]].assign(w)
    np.testing.assert_allclose(to_numpy(hybrid(x)), to_numpy(softmax(x)), atol=2e-6)
    assert FavorTransformerDecoder.from_config(hybrid.get_config()).local_window == 6


def test_local_window_needs_favor_attention():
    with pytest.raises(ValueError, match=r"`local_window`.*attention_type='softmax'"):
        FavorTransformerDecoder(**SMALL, local_window=4, attention_type="softmax")
    with pytest.raises(ValueError, match=r"local_window.*Received: local_window=0"):
        FavorTransformerDecoder(**SMALL, local_window=0)

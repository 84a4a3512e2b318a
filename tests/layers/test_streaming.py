"""Tests of streaming decoding over whole models (`initial_decode_state`, `decode_step`): equal to
the full causal forward at every position for functional, Sequential and list-of-layers models
(every position type, RoPE, pre/post norm), left-padded batches, per-sequence positions,
fixed-size state, saved and loaded models, traced steps with run-time batch sizes, and models it
must refuse."""

import os
import tempfile

import keras
import numpy as np
import pytest

from keras_favor.layers import (
    FavorTransformerDecoder,
    FavorTransformerEncoder,
    TokenAndPositionEmbedding,
    decode_plan,
    decode_step,
    initial_decode_state,
)
from tests.testing import assert_close_to_scale, to_numpy

tf_only = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow-specific")

VOCAB, WIDTH = 40, 8


def block(i, **kwargs):
    return FavorTransformerDecoder(
        **{"intermediate_dim": 16, "num_heads": 2, "num_random_features": 16, "seed": i, **kwargs}
    )


def language_model(
    num_layers=2, position_embedding_type="learned", mask_zero=False, final_norm=False, **kwargs
):
    tokens = keras.Input((None,), dtype="int32")
    x = TokenAndPositionEmbedding(
        VOCAB, 32, WIDTH, position_embedding_type=position_embedding_type, mask_zero=mask_zero
    )(tokens)
    for i in range(num_layers):
        x = block(i, **kwargs)(x)
    if final_norm:
        x = keras.layers.LayerNormalization()(x)
    x = keras.layers.Dropout(0.5)(x)  # inference: a no-op in both paths
    return keras.Model(tokens, keras.layers.Dense(VOCAB)(x))


def token_ids(batch, length, seed=0):
    return np.random.default_rng(seed).integers(1, VOCAB, size=(batch, length)).astype("int32")


def decode_all(model, ids, positions=None):
    state = initial_decode_state(model, ids.shape[0])
    outputs = []
    for t in range(ids.shape[1]):
        position = t if positions is None else positions + t
        logits, state = decode_step(model, ids[:, t], position, state)
        outputs.append(to_numpy(logits))
    return np.stack(outputs, axis=1), state


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"position_embedding_type": "sine", "normalize_first": True, "final_norm": True},
        {"position_embedding_type": None, "use_rotary_embedding": True, "causal_chunk_size": 3},
        {"num_layers": 3, "feature_map": "softmax_hyperbolic", "causal_chunk_size": 4},
        {"feature_map": "elu", "activation": "gelu"},
    ],
    ids=["learned", "sine_prenorm", "rope", "hyperbolic_3_layers", "elu"],
)
def test_decode_equals_full_forward_at_every_position(kwargs):
    model = language_model(**kwargs)
    ids = token_ids(3, 11)
    full = model.predict(ids, verbose=0)
    decoded, state = decode_all(model, ids)
    np.testing.assert_allclose(decoded, full, atol=1e-5)
    assert len(state) == kwargs.get("num_layers", 2)
    fresh = initial_decode_state(model, 3)
    for block_state, block_fresh in zip(state, fresh):  # the state does not grow with the context
        assert [t.shape for t in block_state] == [t.shape for t in block_fresh]
        assert all(t.dtype == "float32" for t in block_state)


def test_state_structure():
    model = language_model(num_layers=3)
    state = initial_decode_state(model, 5)
    assert isinstance(state, list) and len(state) == 3
    for s, z, inputs in state:  # (S, z) and the convolution's last k - 1 = 3 inputs
        assert tuple(s.shape) == (5, 2, 16, 4) and tuple(z.shape) == (5, 2, 16)
        assert tuple(inputs.shape) == (5, 3, WIDTH)
        assert not np.any(to_numpy(s)) and not np.any(to_numpy(z)) and not np.any(to_numpy(inputs))


def test_sequential_and_list_of_layers():
    layers = [
        TokenAndPositionEmbedding(VOCAB, 32, WIDTH),
        block(0),
        block(1),
        keras.layers.Dense(VOCAB),
    ]
    model = keras.Sequential([keras.Input((None,), dtype="int32")] + layers)
    ids = token_ids(2, 7)
    full = model.predict(ids, verbose=0)
    np.testing.assert_allclose(decode_all(model, ids)[0], full, atol=1e-5)
    np.testing.assert_allclose(decode_all(layers, ids)[0], full, atol=1e-5)
    assert decode_plan(model) == layers


def test_model_without_embedding_takes_vectors():
    inputs = keras.Input((None, WIDTH))
    model = keras.Model(inputs, block(1, use_rotary_embedding=True)(block(0)(inputs)))
    x = np.random.default_rng(0).normal(size=(2, 6, WIDTH)).astype("float32")
    np.testing.assert_allclose(decode_all(model, x)[0], model.predict(x, verbose=0), atol=1e-5)


@pytest.mark.parametrize("use_rotary_embedding", [False, True])
def test_left_padded_batch(use_rotary_embedding):
    model = language_model(mask_zero=True, use_rotary_embedding=use_rotary_embedding)
    ids = token_ids(3, 8)
    ids[0, :3] = 0
    ids[1, :1] = 0
    full = model.predict(ids, verbose=0)
    decoded, _ = decode_all(model, ids)
    real = ids != 0
    np.testing.assert_allclose(decoded[real], full[real], atol=1e-5)


@pytest.mark.parametrize("position_embedding_type", ["learned", "sine", None])
def test_per_sequence_positions(position_embedding_type):
    # One decode call advances streams that sit at different offsets.
    model = language_model(
        position_embedding_type=position_embedding_type,
        use_rotary_embedding=position_embedding_type is None,
    )
    ids = token_ids(2, 5)
    together, _ = decode_all(model, ids, positions=np.array([0, 4], "int32"))
    first, _ = decode_all(model, ids[:1])
    second, _ = decode_all(model, ids[1:], positions=np.array([4], "int32"))
    assert_close_to_scale(together[:1], first, 1e-5)
    assert_close_to_scale(together[1:], second, 1e-5)
    # ... and the offset matters.
    assert np.abs(together[1:] - decode_all(model, ids[1:])[0]).max() > 1e-4


def test_saved_model_decodes_identically():
    model = language_model(use_rotary_embedding=True, position_embedding_type="sine")
    ids = token_ids(2, 6)
    expected, _ = decode_all(model, ids)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lm.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(decode_all(loaded, ids)[0], expected)
    np.testing.assert_array_equal(loaded.predict(ids, verbose=0), model.predict(ids, verbose=0))


@tf_only
def test_traced_step_with_run_time_batch_size():
    import tensorflow as tf

    model = language_model(use_rotary_embedding=True)
    flat_state = keras.tree.flatten(initial_decode_state(model, 1))
    specs = [tf.TensorSpec((None,) + tuple(s.shape[1:]), s.dtype) for s in flat_state]
    structure = initial_decode_state(model, 1)

    @tf.function(input_signature=[tf.TensorSpec((), tf.int32)])
    def initial(batch_size):
        return keras.tree.flatten(initial_decode_state(model, batch_size))

    @tf.function(
        input_signature=[tf.TensorSpec((None,), tf.int32), tf.TensorSpec((None,), tf.int32)] + specs
    )
    def step(token, position, *flat):
        logits, state = decode_step(
            model, token, position, keras.tree.pack_sequence_as(structure, list(flat))
        )
        return [logits] + keras.tree.flatten(state)

    ids = token_ids(3, 6)
    flat = initial(tf.constant(3))
    outputs = []
    for t in range(6):
        logits, *flat = step(tf.constant(ids[:, t]), tf.fill([3], t), *flat)
        outputs.append(logits.numpy())
    np.testing.assert_allclose(np.stack(outputs, 1), model.predict(ids, verbose=0), atol=1e-5)


def _embedded(length=None):
    tokens = keras.Input((length,), dtype="int32")
    return tokens, TokenAndPositionEmbedding(VOCAB, 32, WIDTH)(tokens)


def _residual():
    tokens, x = _embedded()
    return keras.Model(tokens, keras.layers.Dense(VOCAB)(keras.layers.Add()([x, block(0)(x)])))


def _two_outputs():
    tokens, x = _embedded()
    x = block(1)(x)
    return keras.Model(tokens, [x, keras.layers.Dense(VOCAB)(x)])


def _encoder():
    tokens, x = _embedded()
    return keras.Model(tokens, FavorTransformerEncoder(16, 2, num_random_features=16)(x))


def _mha():
    tokens, x = _embedded()
    return keras.Model(tokens, keras.layers.MultiHeadAttention(2, 4)(x, x))


def _conv():
    tokens, x = _embedded()
    return keras.Model(tokens, keras.layers.Conv1D(WIDTH, 3, padding="causal")(x))


def _norm_over_time():
    tokens, x = _embedded(length=12)
    return keras.Model(tokens, keras.layers.LayerNormalization(axis=1)(x))


def _embedding_not_first():
    inputs = keras.Input((None, WIDTH))
    x = keras.layers.Dense(WIDTH)(inputs)
    x = keras.layers.Embedding(VOCAB, WIDTH)(x)
    return keras.Model(inputs, x)


def _cross():
    decoder_in, encoder_in = keras.Input((None, WIDTH)), keras.Input((None, WIDTH))
    return keras.Model([decoder_in, encoder_in], block(3)(decoder_in, encoder_in))


def _mask_branch():
    tokens, x = _embedded()
    mask = keras.layers.Lambda(lambda t: t > 0)(tokens)
    return keras.Model(tokens, block(4)(x, decoder_padding_mask=mask))


@pytest.mark.parametrize(
    "make, match",
    [
        (_residual, "Add"),
        (_two_outputs, "outputs"),
        (_encoder, "FavorTransformerEncoder"),
        (_mha, "MultiHeadAttention"),
        (_conv, "Conv1D"),
        (_norm_over_time, "axis"),
        (_embedding_not_first, "first"),
        (_cross, "inputs"),
        (_mask_branch, "Lambda"),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_refuses_models_that_are_not_causal_chains(make, match):
    with pytest.raises(ValueError, match=match):
        initial_decode_state(make(), 1)


def test_refuses_other_inputs():
    crossed = block(0)
    crossed(np.zeros((1, 2, WIDTH), "float32"), np.zeros((1, 3, WIDTH), "float32"))
    with pytest.raises(ValueError, match="cross-attention"):
        decode_plan([crossed])
    with pytest.raises(ValueError, match="not built"):
        decode_plan([block(1)])
    with pytest.raises(ValueError, match="list"):
        decode_plan("model")
    with pytest.raises(ValueError, match="Keras layer"):
        decode_plan([lambda x: x])

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.inner = keras.layers.Dense(3)

        def call(self, x):
            return self.inner(x)

    with pytest.raises(ValueError, match="subclassed"):
        decode_plan(Subclassed())
    model = language_model()
    with pytest.raises(ValueError, match="state"):
        decode_step(model, np.array([1]), 0, initial_decode_state(model, 1)[:1])

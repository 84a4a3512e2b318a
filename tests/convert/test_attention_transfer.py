"""Tests of `keras_favor.convert.attention_transfer`: only the feature maps train, each FAVOR
layer gets closer to the softmax layer it replaced, the softmax model is left unchanged, and
mismatched layers, maps without weights and data the models reject raise before training."""

import keras
import numpy as np
import pytest

from keras_favor import FavorAttention, FavorTransformerEncoder
from keras_favor.convert import attention_transfer, to_favor
from keras_favor.convert.attention_transfer import attention_layers
from tests.testing import data, to_numpy

WIDTH = 8


def softmax_model(causal=True):
    keras.utils.set_random_seed(0)
    x = keras.Input((None, WIDTH), name="x")
    h = keras.layers.MultiHeadAttention(2, 4, name="attention_0")(x, x, use_causal_mask=causal)
    h = keras.layers.LayerNormalization(name="norm")(h + x)
    h = keras.layers.MultiHeadAttention(2, 4, name="attention_1")(h, h, use_causal_mask=causal)
    return keras.Model(x, keras.layers.Dense(3, name="head")(h))


def attention_errors(favor, softmax, x):
    """Per layer pair, the mean squared difference of the outputs on the softmax inputs."""
    probe = keras.Model(softmax.input, [softmax.get_layer("norm").output])
    h = to_numpy(probe(x))
    errors = []
    for name, inputs in (("attention_0", x), ("attention_1", h)):
        causal = {"use_causal_mask": True}
        want = to_numpy(softmax.get_layer(name)(inputs, inputs, **causal))
        got = to_numpy(favor.get_layer(name)(inputs, inputs, **causal))
        errors.append(float(np.mean((got - want) ** 2)))
    return errors


def test_only_the_maps_train_and_each_layer_gets_closer():
    softmax = softmax_model()
    favor = to_favor(softmax, feature_map="hedgehog", seed=0)
    train, held_out = data(64, 10, WIDTH), data(16, 10, WIDTH, seed=1)
    before_softmax = [to_numpy(w) for w in softmax.weights]
    before = {w.path: to_numpy(w) for w in favor.weights}
    errors_before = attention_errors(favor, softmax, held_out)
    history = attention_transfer(favor, softmax, train, epochs=10, batch_size=16, verbose=0)
    losses = history.history["loss"]
    assert len(losses) == 10 and losses[-1] < 0.7 * losses[0]
    errors_after = attention_errors(favor, softmax, held_out)
    assert all(a < 0.7 * b for a, b in zip(errors_after, errors_before)), (
        errors_before,
        errors_after,
    )
    for w in favor.weights:
        moved = not np.array_equal(to_numpy(w), before[w.path])
        assert moved == ("hedgehog" in w.path), w.path
    for w, value in zip(softmax.weights, before_softmax):
        np.testing.assert_array_equal(to_numpy(w), value)
    # Trainability is restored: end-to-end fine-tuning afterwards trains everything.
    assert softmax.trainable and all(layer.trainable for layer in favor._flatten_layers())
    assert len(favor.trainable_weights) == len(softmax.trainable_weights) + 2 * 4


def test_loss_is_the_sum_of_layer_mses_over_real_queries():
    # With lr 0 nothing moves: the first epoch's loss is the mean over batches of the summed
    # per-layer MSE, which a single full batch makes exact. Padded queries (Keras masks from the
    # blocks' padding_mask) are left out.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, WIDTH), name="x")
    mask = keras.Input((None,), dtype="bool", name="mask")
    h = FavorTransformerEncoder(16, 2, attention_type="softmax", seed=0, name="block")(
        inputs, padding_mask=mask
    )
    softmax = keras.Model({"x": inputs, "mask": mask}, h)
    favor = to_favor(softmax, feature_map="hedgehog", seed=0)
    x = data(4, 6, WIDTH)
    m = np.ones((4, 6), bool)
    m[:, 4:] = False
    history = attention_transfer(
        favor, softmax, {"x": x, "mask": m}, batch_size=4, learning_rate=0.0, verbose=0
    )
    teacher = softmax.get_layer("block")._self_attention_layer
    student = favor.get_layer("block")._self_attention_layer
    want = to_numpy(teacher(x, x, value_mask=m))[:, :4]
    got = to_numpy(student(x, x, value_mask=m))[:, :4]
    # The block's attention sees its input after nothing (post-LN): x itself.
    np.testing.assert_allclose(history.history["loss"][0], np.mean((got - want) ** 2), rtol=1e-4)


def test_attention_layers_in_model_order():
    model = softmax_model()
    assert [a.name for a in attention_layers(model, keras.layers.MultiHeadAttention)] == [
        "attention_0",
        "attention_1",
    ]


def test_layers_that_do_not_correspond_are_listed():
    softmax = softmax_model()
    x = keras.Input((None, WIDTH))
    one = keras.Model(x, FavorAttention(2, 4, feature_map="hedgehog", name="only")(x, x))
    with pytest.raises(
        ValueError,
        match=r"one to one.*favor_model layers \['only \(FavorAttention, num_heads=2, key_dim=4, "
        r"value_dim=4\)'\], softmax_model layers \['attention_0 \(MultiHeadAttention.*"
        r"'attention_1 ",
    ):
        attention_transfer(one, softmax, data(4, 5, WIDTH))
    wider = to_favor(softmax, feature_map="hedgehog")
    other = keras.Model(x, keras.layers.MultiHeadAttention(2, 5)(x, x))
    with pytest.raises(ValueError, match=r"one to one.*key_dim=5"):
        attention_transfer(wider, other, data(4, 5, WIDTH))


def test_maps_without_weights_are_refused():
    softmax = softmax_model()
    favor = to_favor(softmax, num_random_features=8)
    with pytest.raises(ValueError, match=r"have none.*attention_0: feature_map=SoftmaxPositive"):
        attention_transfer(favor, softmax, data(4, 5, WIDTH))


def test_data_the_models_reject_fails_before_training():
    softmax = softmax_model()
    favor = to_favor(softmax, feature_map="hedgehog", seed=0)
    before = [to_numpy(w) for w in favor.weights]
    with pytest.raises(ValueError, match=r"`softmax_model` does not accept.*shapes \(4, 5, 7\)"):
        attention_transfer(favor, softmax, data(4, 5, 7))
    for w, value in zip(favor.weights, before):
        np.testing.assert_array_equal(to_numpy(w), value)
    with pytest.raises(ValueError, match="`epochs`.*Received: epochs=0"):
        attention_transfer(favor, softmax, data(4, 5, WIDTH), epochs=0)
    with pytest.raises(ValueError, match="`softmax_model`.*Received: softmax_model='model'"):
        attention_transfer(favor, "model", data(4, 5, WIDTH))


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.data")
def test_tf_data_with_targets():
    import tensorflow as tf

    softmax = softmax_model(causal=False)
    favor = to_favor(softmax, feature_map="hedgehog", seed=0)
    x = data(16, 6, WIDTH)
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros((16, 6, 3), "float32"))).batch(8)
    history = attention_transfer(favor, softmax, dataset, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    assert history.history["loss"][1] < history.history["loss"][0]

"""Tests of `RedrawRandomFeatures`: bad arguments, the schedule (steps, with steps_per_execution 1
and 3, and epochs; a redraw happens before the step or epoch that needs it, never after the last
one), data of unknown length (generators, filtered `tf.data`: the schedule counts real steps),
warnings when executions cannot follow the schedule, never at evaluate / predict, layer discovery
in nested models, seeds, verbose logs, training with redraws, and resuming from `.keras` files
and checkpoints.

The redrawn projections are checked exactly: redraw i of layer j must hold
`random_features_matrix(M, H, seed=redraw_seed(seed, i, j))`, the layer's documented draw.
Everything runs on TensorFlow and JAX except the test marked as TensorFlow-only; the
tf.distribute tests are in `test_distributed.py`.
"""

import os
import warnings

import keras
import numpy as np
import pytest

from keras_favor import FavorAttention, FavorTransformerEncoder, RedrawRandomFeatures
from keras_favor.callbacks import redraw_seed
from keras_favor.ops import random_features_matrix

LENGTH, EMBED, HEADS, KEY_DIM, FEATURES = 6, 8, 2, 4, 8

tf_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="tf.train.Checkpoint is TensorFlow-only"
)


def attention(**kwargs):
    kwargs.setdefault("num_random_features", FEATURES)
    return FavorAttention(num_heads=HEADS, key_dim=KEY_DIM, **kwargs)


def small_model(layer_seed=0, steps_per_execution=1, feature_map="softmax_positive"):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((LENGTH, EMBED))
    layer = attention(seed=layer_seed, feature_map=feature_map)
    hidden = layer(inputs, inputs)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(hidden))
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss="mse",
        steps_per_execution=steps_per_execution,
    )
    return model, layer


def data(num_samples, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_samples, LENGTH, EMBED)).astype("float32")
    y = (x[..., :2].sum(axis=-1).mean(axis=1, keepdims=True)).astype("float32")
    return x, y


def to_numpy(x):
    # (`ops.convert_to_numpy` works too, but warns on TensorFlow with numpy 2.)
    x = x.value if isinstance(x, keras.Variable) else x
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def projection(layer):
    return to_numpy(layer.projection_matrix)


def count(layer):
    return int(layer.redraw_count)


def iterations(model):
    return int(model.optimizer.iterations)


def expected_projection(seed, redraw_index, layer_index):
    return to_numpy(
        random_features_matrix(FEATURES, KEY_DIM, seed=redraw_seed(seed, redraw_index, layer_index))
    )


def redraw_once(callback, model):
    """What `fit` does from the start of training to the start of its second epoch."""
    callback.set_model(model)
    callback.on_train_begin()
    callback.on_epoch_begin(0)
    callback.on_epoch_end(0)
    callback.on_epoch_begin(1)


class Probe(keras.callbacks.Callback):
    """Records the step, the counts and the projections each execution (and epoch) trains with.

    Put it after `RedrawRandomFeatures` in the callback list: it records at the start of every
    execution and epoch, after the redraw callback ran, and once more when training ends.
    """

    def __init__(self, layers):
        super().__init__()
        self.layers = layers
        self.batches, self.epochs, self.ends = [], [], []
        self.ran = []  # per entry of `batches`: whether the execution ran (it found data)

    def snapshot(self):
        return (
            iterations(self.model),
            [count(x) for x in self.layers],
            [projection(x) for x in self.layers],
        )

    def on_train_batch_begin(self, batch, logs=None):
        self.batches.append(self.snapshot())
        self.ran.append(False)

    def on_train_batch_end(self, batch, logs=None):
        self.ran[-1] = True

    def real_batches(self):
        return [snapshot for snapshot, ran in zip(self.batches, self.ran) if ran]

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(self.snapshot())

    def on_train_end(self, logs=None):
        self.ends.append(self.snapshot())


def schedule_warnings(caught):
    return [
        str(w.message) for w in caught if "RedrawRandomFeatures(every_n_steps" in str(w.message)
    ]


# ------------------------------------------------------------------------------------------------
# Arguments.


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": -2}, "every_n_steps"),
        ({"every_n_steps": 1.5}, "every_n_steps"),
        ({"every_n_steps": True}, "every_n_steps"),
        ({"every_n_steps": "10"}, "every_n_steps"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"every_n_epochs": 2.0}, "every_n_epochs"),
        ({}, "every_n_steps"),
        ({"every_n_steps": 2, "every_n_epochs": 1}, "every_n_epochs"),
        ({"every_n_steps": 2, "seed": 1.5}, "seed"),
        ({"every_n_steps": 2, "seed": "0"}, "seed"),
        ({"every_n_steps": 2, "verbose": -1}, "verbose"),
        ({"every_n_steps": 2, "verbose": "loud"}, "verbose"),
        ({"every_n_steps": 2, "layers": []}, "layers"),
        ({"every_n_steps": 2, "layers": "attention"}, "layers"),
        ({"every_n_steps": 2, "layers": keras.layers.Dense(2)}, "layers"),
        ({"every_n_steps": 2, "layers": [keras.layers.MultiHeadAttention(2, 4)]}, "layers"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        RedrawRandomFeatures(**kwargs)


def test_arguments_are_attributes():
    layer = attention()
    callback = RedrawRandomFeatures(every_n_epochs=3, layers=layer, seed=7, verbose=1)
    assert callback.every_n_steps is None
    assert callback.every_n_epochs == 3
    assert callback.layers == [layer]
    assert callback.seed == 7
    assert callback.verbose == 1


def test_redraw_seed_is_a_pure_function_of_its_arguments():
    seeds = {redraw_seed(s, i, j) for s in (0, 1) for i in (1, 2) for j in (0, 1)}
    assert len(seeds) == 8
    assert redraw_seed(3, 2, 1) == redraw_seed(3, 2, 1)
    assert all(0 <= s < 2**31 for s in seeds)


# ------------------------------------------------------------------------------------------------
# Schedule.


@pytest.mark.parametrize(
    "every_n_steps, steps_per_execution, steps",
    [(2, 1, 7), (2, 1, 8), (2, 3, 9), (5, 3, 12), (3, 3, 9), (6, 3, 12)],
)
def test_every_n_steps_redraws_exactly_on_schedule(every_n_steps, steps_per_execution, steps):
    model, layer = small_model(steps_per_execution=steps_per_execution)
    initial = projection(layer)
    probe = Probe([layer])
    x, y = data(2 * steps)
    callback = RedrawRandomFeatures(every_n_steps=every_n_steps, seed=11)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            x, y, batch_size=2, epochs=1, shuffle=False, callbacks=[callback, probe], verbose=0
        )
    # Silent exactly when every multiple of n starts an execution.
    assert len(schedule_warnings(caught)) == (every_n_steps % steps_per_execution != 0)

    # Batch callbacks run once per execution: before steps 0, s, 2s, ... (counted from 0).
    checked = [snapshot[0] for snapshot in probe.batches]
    assert checked == list(range(0, steps, steps_per_execution))
    previous_count, previous_projection = 0, initial
    for step, (layer_count,), (layer_projection,) in probe.batches:
        # The execution starting at step i trains with redraw ⌊i / n⌋, so do all its steps when
        # s divides n; else one redraw covers every multiple of n reached since the last check.
        assert layer_count == step // every_n_steps
        if layer_count == previous_count:
            np.testing.assert_array_equal(layer_projection, previous_projection)
        else:
            np.testing.assert_array_equal(layer_projection, expected_projection(11, layer_count, 0))
            assert not np.array_equal(layer_projection, previous_projection)
        previous_count, previous_projection = layer_count, layer_projection
    # Nothing after the last execution: the model keeps what that execution trained with.
    assert count(layer) == checked[-1] // every_n_steps
    np.testing.assert_array_equal(projection(layer), previous_projection)


@pytest.mark.parametrize("same_callback", [True, False])
def test_fit_ending_on_a_multiple_keeps_the_projection_its_last_step_trained_with(same_callback):
    seed, every_n_steps = 7, 2
    model, layer = small_model()
    x, y = data(16)
    callback = RedrawRandomFeatures(every_n_steps=every_n_steps, seed=seed)
    probe = Probe([layer])
    model.fit(x[:12], y[:12], batch_size=2, shuffle=False, callbacks=[callback, probe], verbose=0)

    # 6 steps, the last one a multiple of 2: no redraw after it. The last step (5) trained with
    # redraw ⌊5 / 2⌋ = 2, and that is what the model keeps.
    assert iterations(model) == 6
    assert count(layer) == 2
    np.testing.assert_array_equal(projection(layer), expected_projection(seed, 2, 0))
    np.testing.assert_array_equal(projection(layer), probe.batches[-1][2][0])

    # The same training with the projections set by hand before steps 0, 2 and 4 gives the
    # same weights and the same predictions: the weights were trained with the kept projection.
    manual, manual_layer = small_model()
    for index in range(3):
        if index:
            manual_layer.projection_matrix.assign(expected_projection(seed, index, 0))
        part = slice(4 * index, 4 * index + 4)
        manual.fit(x[part], y[part], batch_size=2, shuffle=False, verbose=0)
    assert iterations(manual) == 6
    np.testing.assert_array_equal(projection(manual_layer), projection(layer))
    for weight, reference in zip(model.trainable_weights, manual.trainable_weights):
        np.testing.assert_allclose(to_numpy(weight), to_numpy(reference), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        to_numpy(model(x[12:])), to_numpy(manual(x[12:])), rtol=1e-5, atol=1e-6
    )

    # The next fit (with the same callback or a new one) redraws before its first step, 6.
    if not same_callback:
        callback = RedrawRandomFeatures(every_n_steps=every_n_steps, seed=seed)
    probe = Probe([layer])
    model.fit(x[12:], y[12:], batch_size=2, shuffle=False, callbacks=[callback, probe], verbose=0)
    assert [snapshot[0] for snapshot in probe.batches] == [6, 7]
    for _, (layer_count,), (layer_projection,) in probe.batches:
        assert layer_count == 3
        np.testing.assert_array_equal(layer_projection, expected_projection(seed, 3, 0))
    assert count(layer) == 3


@pytest.mark.filterwarnings(r"ignore:RedrawRandomFeatures\(every_n_steps=2\) cannot")
def test_projection_at_a_step_does_not_depend_on_steps_per_execution():
    seen = []
    for steps_per_execution in (1, 3):
        model, layer = small_model(steps_per_execution=steps_per_execution)
        x, y = data(18)
        callback = RedrawRandomFeatures(every_n_steps=2, seed=4)
        model.fit(x[:12], y[:12], batch_size=2, shuffle=False, callbacks=[callback], verbose=0)
        # The last check was before step 5 (⌊5 / 2⌋ = 2) or before step 3 (⌊3 / 2⌋ = 1).
        assert iterations(model) == 6 and count(layer) == (2 if steps_per_execution == 1 else 1)
        probe = Probe([layer])
        model.fit(
            x[12:], y[12:], batch_size=2, shuffle=False, callbacks=[callback, probe], verbose=0
        )
        # Both check before step 6 and bring the count to ⌊6 / 2⌋ = 3.
        step, (layer_count,), (layer_projection,) = probe.batches[0]
        assert step == 6 and layer_count == 3
        seen.append(layer_projection)
    np.testing.assert_array_equal(seen[0], seen[1])
    np.testing.assert_array_equal(seen[0], expected_projection(4, 3, 0))


def test_every_n_epochs_redraws_at_the_start_of_the_epoch_after_every_nth():
    seed = 5
    model, layer = small_model()
    initial = projection(layer)
    probe = Probe([layer])
    x, y = data(6)
    callback = RedrawRandomFeatures(every_n_epochs=2, seed=seed)
    model.fit(x, y, batch_size=2, epochs=5, shuffle=False, callbacks=[callback, probe], verbose=0)

    # Due after epochs 2 and 4 (counted from 1), done as epochs 3 and 5 start.
    assert [counts[0] for _, counts, _ in probe.epochs] == [0, 0, 1, 1, 2]
    # Never inside an epoch.
    assert [counts[0] for _, counts, _ in probe.batches] == [0] * 6 + [1] * 6 + [2] * 3
    np.testing.assert_array_equal(probe.epochs[1][2][0], initial)
    np.testing.assert_array_equal(probe.epochs[2][2][0], expected_projection(seed, 1, 0))
    np.testing.assert_array_equal(probe.epochs[4][2][0], expected_projection(seed, 2, 0))

    # Resuming with `initial_epoch` continues the epoch schedule: epoch 6 ends a pair, and its
    # redraw waits for the start of epoch 7, which this call does not run.
    model.fit(x, y, batch_size=2, epochs=6, initial_epoch=5, callbacks=[callback], verbose=0)
    assert count(layer) == 2
    np.testing.assert_array_equal(projection(layer), expected_projection(seed, 2, 0))


@pytest.mark.parametrize(
    "same_callback, initial_epoch, expected_count",
    [(True, 4, 2), (True, 0, 2), (False, 4, 2), (False, 0, 1)],
)
def test_epochs_a_multiple_of_n_leave_the_redraw_for_the_next_fit(
    same_callback, initial_epoch, expected_count
):
    seed = 3
    model, layer = small_model()
    x, y = data(6)
    callback = RedrawRandomFeatures(every_n_epochs=2, seed=seed)
    model.fit(x, y, batch_size=2, epochs=4, shuffle=False, callbacks=[callback], verbose=0)
    # Redrawn as epoch 3 (counted from 1) started; not after epoch 4, the last one.
    assert count(layer) == 1
    np.testing.assert_array_equal(projection(layer), expected_projection(seed, 1, 0))

    # The next fit redraws before its first step when the same callback left a redraw pending,
    # or when `initial_epoch=4` says that two pairs of epochs are done. A new callback without
    # `initial_epoch` counts epochs afresh (documented).
    if not same_callback:
        callback = RedrawRandomFeatures(every_n_epochs=2, seed=seed)
    probe = Probe([layer])
    model.fit(
        x,
        y,
        batch_size=2,
        epochs=initial_epoch + 1,
        initial_epoch=initial_epoch,
        shuffle=False,
        callbacks=[callback, probe],
        verbose=0,
    )
    assert [counts[0] for _, counts, _ in probe.batches] == [expected_count] * 3
    np.testing.assert_array_equal(
        probe.batches[0][2][0], expected_projection(seed, expected_count, 0)
    )


def test_never_redraws_during_evaluate_or_predict():
    model, layer = small_model()
    initial = projection(layer)
    x, y = data(8)
    callbacks = [
        RedrawRandomFeatures(every_n_steps=1, seed=0),
        RedrawRandomFeatures(every_n_epochs=1, seed=0),
    ]
    model.evaluate(x, y, batch_size=2, callbacks=callbacks, verbose=0)
    model.predict(x, batch_size=2, callbacks=callbacks, verbose=0)
    assert count(layer) == 0
    np.testing.assert_array_equal(projection(layer), initial)

    # Validation inside `fit` does not redraw either: one redraw between the two epochs.
    callback = RedrawRandomFeatures(every_n_epochs=1, seed=0)
    model.fit(x, y, batch_size=2, epochs=2, validation_data=(x, y), callbacks=[callback], verbose=0)
    assert count(layer) == 1


def test_every_n_steps_continues_across_fit_calls():
    model, layer = small_model()
    x, y = data(6)
    callback = RedrawRandomFeatures(every_n_steps=4, seed=2)
    for _ in range(4):  # 3 steps per call: redraws before steps 4 and 8 (counted from 0)
        model.fit(x, y, batch_size=2, epochs=1, callbacks=[callback], verbose=0)
    assert iterations(model) == 12
    assert count(layer) == 2
    np.testing.assert_array_equal(projection(layer), expected_projection(2, 2, 0))
    # The next call redraws before step 12.
    model.fit(x, y, batch_size=2, epochs=1, callbacks=[callback], verbose=0)
    assert count(layer) == 3
    np.testing.assert_array_equal(projection(layer), expected_projection(2, 3, 0))


def test_a_manual_redraw_does_not_stop_the_schedule():
    model, layer = small_model()
    x, y = data(8)
    layer.redraw_random_features()  # count 1 before any step
    callback = RedrawRandomFeatures(every_n_steps=2, seed=3)
    model.fit(x, y, batch_size=2, epochs=1, callbacks=[callback], verbose=0)
    # A redraw before step 2 (none before step 0: the count is ahead), one past the count.
    assert count(layer) == 2
    np.testing.assert_array_equal(projection(layer), expected_projection(3, 2, 0))


# ------------------------------------------------------------------------------------------------
# Data of unknown length, and executions that cannot follow the schedule.
#
# On TensorFlow, `fit` on data of unknown length (generators, `tf.data` with `filter`) ends every
# epoch with one more execution that finds no data: `on_train_batch_begin` without
# `on_train_batch_end`, and with `steps_per_execution=1` `optimizer.iterations` still moves. Such
# training must match the same steps on data of known length exactly.


def filtered(x, y):
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(2)
    return dataset.filter(lambda *_: True)  # the length becomes unknown


def generator(x, y):
    for start in range(0, len(x), 2):
        yield x[start : start + 2], y[start : start + 2]


@pytest.mark.parametrize(
    "source, every_n_steps, epochs, fits",
    [
        ("filter", 4, 1, 1),  # the reproducer: 4 steps, no redraw expected
        ("filter", 4, 2, 1),
        ("filter", 3, 1, 2),
        ("generator", 4, 1, 2),
        ("steps_per_epoch", 4, 2, 1),  # `steps_per_epoch=6` on 4 batches: runs out
    ],
)
def test_data_of_unknown_length_follows_the_schedule_in_real_steps(
    source, every_n_steps, epochs, fits
):
    x, y = data(8)
    reference_model, reference_layer = small_model()
    reference_callback = RedrawRandomFeatures(every_n_steps=every_n_steps, seed=5)
    for _ in range(fits):
        reference_model.fit(
            x,
            y,
            batch_size=2,
            epochs=epochs,
            shuffle=False,
            callbacks=[reference_callback],
            verbose=0,
        )

    model, layer = small_model()
    probe = Probe([layer])
    for _ in range(fits):
        if source == "generator":
            inputs, steps_per_epoch = generator(x, y), None
        else:
            inputs = filtered(x, y)
            steps_per_epoch = 6 if source == "steps_per_epoch" else None
        callback = RedrawRandomFeatures(every_n_steps=every_n_steps, seed=5)  # as when resuming
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Your input ran out of data")
            model.fit(
                inputs,
                epochs=epochs,
                steps_per_epoch=steps_per_epoch,
                shuffle=False,
                callbacks=[callback, probe],
                verbose=0,
            )

    # Every real step i trained with redraw ⌊i / n⌋, and the model keeps what the last one used.
    steps = 4 * epochs * fits
    assert [snapshot[0] for snapshot in probe.real_batches()] == list(range(steps))
    for step, (layer_count,), (layer_projection,) in probe.real_batches():
        assert layer_count == step // every_n_steps
        if layer_count:
            np.testing.assert_array_equal(layer_projection, expected_projection(5, layer_count, 0))
    assert count(layer) == (steps - 1) // every_n_steps
    np.testing.assert_array_equal(projection(layer), probe.real_batches()[-1][2][0])
    # The same state as the same steps on data of known length: iterations, features, weights.
    assert_same_training_state(model, layer, reference_model, reference_layer)


def test_validation_after_data_of_unknown_length_uses_the_trained_features(capsys):
    x, y = data(8)
    model, layer = small_model()
    callback = RedrawRandomFeatures(every_n_steps=4, seed=0, verbose=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Your input ran out of data")
        history = model.fit(
            filtered(x, y), validation_data=(x, y), shuffle=False, callbacks=[callback], verbose=0
        )
    # The validation ran with the features of step 3, which the model keeps.
    assert count(layer) == 0 and iterations(model) == 4
    loss = model.evaluate(x, y, verbose=0)  # batched as the validation was
    np.testing.assert_allclose(history.history["val_loss"][0], loss, rtol=1e-6)
    assert [line for line in capsys.readouterr().out.splitlines() if "Redraw" in line] == [
        "RedrawRandomFeatures: after 4 steps: redrew the random features of 1 layer.",
        "RedrawRandomFeatures: the execution after 4 steps found no data: undid its redraw.",
    ]


def test_steps_per_execution_larger_than_every_n_steps_warns_and_keeps_execution_starts():
    # The reproducer: s=4, n=2, 8 steps. Redraws due before steps 2 and 6 fall inside
    # executions; each execution trains with the redraw due at its first step (0, then ⌊4/2⌋=2).
    model, layer = small_model(steps_per_execution=4)
    probe = Probe([layer])
    x, y = data(16)
    callback = RedrawRandomFeatures(every_n_steps=2, seed=1)
    message = (
        r"every_n_steps=2\) cannot redraw on schedule with steps_per_execution=4.*"
        r"due before steps 2, 4, 6, 8, \.\.\. happen before steps 4, 4, 8, 8, \.\.\. "
        r"\(some are skipped\)"
    )
    with pytest.warns(UserWarning, match=message):
        model.fit(x, y, batch_size=2, shuffle=False, callbacks=[callback, probe], verbose=0)
    assert [(step, counts[0]) for step, counts, _ in probe.batches] == [(0, 0), (4, 2)]
    assert count(layer) == 2
    np.testing.assert_array_equal(projection(layer), expected_projection(1, 2, 0))


@pytest.mark.parametrize("source", ["arrays", "filter"])
def test_steps_per_execution_dividing_every_n_steps_stays_exact_and_silent(source):
    x, y = data(8)
    model, layer = small_model(steps_per_execution=2)
    probe = Probe([layer])
    callback = RedrawRandomFeatures(every_n_steps=4, seed=2)
    inputs = (x, y) if source == "arrays" else (filtered(x, y), None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(
            *inputs,
            batch_size=2 if source == "arrays" else None,
            epochs=2,
            shuffle=False,
            callbacks=[callback, probe],
            verbose=0,
        )
    assert schedule_warnings(caught) == []
    # Executions start before steps 0, 2, 4, 6 (and, for filtered data, one more that finds
    # no data at the end of each epoch): redrawn exactly before step 4, and not after step 7.
    assert [(step, counts[0]) for step, counts, _ in probe.real_batches()] == [
        (0, 0),
        (2, 0),
        (4, 1),
        (6, 1),
    ]
    assert iterations(model) == 8 and count(layer) == 1
    np.testing.assert_array_equal(projection(layer), expected_projection(2, 1, 0))


def test_epochs_that_move_executions_off_the_schedule_warn_at_the_first_late_redraw():
    # s=2, n=2, 3 steps per epoch: executions start before steps 0, 2 | 3, 5. The redraw due
    # before step 4 falls inside the execution of steps 3-4 and happens before step 5.
    model, layer = small_model(steps_per_execution=2)
    probe = Probe([layer])
    x, y = data(6)
    callback = RedrawRandomFeatures(every_n_steps=2, seed=3)
    with pytest.warns(UserWarning, match="redraw due before step 4 happens before step 5"):
        model.fit(
            x, y, batch_size=2, epochs=2, shuffle=False, callbacks=[callback, probe], verbose=0
        )
    assert [(step, counts[0]) for step, counts, _ in probe.batches] == [
        (0, 0),
        (2, 1),
        (3, 1),
        (5, 2),
    ]
    assert count(layer) == 2


# ------------------------------------------------------------------------------------------------
# Which layers.


class Holder(keras.layers.Layer):
    """A custom layer holding attention layers in a list and in a dict."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.in_list = [attention(seed=1)]
        self.in_dict = {"deterministic": attention(feature_map="elu"), "random": attention(seed=2)}

    def build(self, input_shape):
        for layer in (self.in_list[0], self.in_dict["deterministic"], self.in_dict["random"]):
            layer.build(input_shape, input_shape)

    def call(self, x):
        x = x + self.in_list[0](x, x)
        x = x + self.in_dict["deterministic"](x, x)
        return x + self.in_dict["random"](x, x)


def nested_model():
    keras.utils.set_random_seed(2)
    inner_inputs = keras.Input((LENGTH, EMBED))
    inner_attention = attention(seed=3)
    inner = keras.Model(inner_inputs, inner_attention(inner_inputs, inner_inputs))
    outer_inner = keras.Model(inner_inputs, inner(inner_inputs))  # a model in a model in a model
    holder = Holder()
    shared = attention(seed=4)
    encoder = FavorTransformerEncoder(
        intermediate_dim=8, num_heads=2, num_random_features=FEATURES, seed=5
    )

    inputs = keras.Input((LENGTH, EMBED))
    hidden = holder(outer_inner(inputs))
    hidden = shared(hidden, hidden)
    hidden = shared(hidden, hidden)  # used twice, redrawn once
    hidden = encoder(hidden)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(hidden))
    model = keras.Model(inputs, outputs)
    random_layers = [inner_attention, holder.in_list[0], holder.in_dict["random"], shared]
    return model, random_layers, holder.in_dict["deterministic"]


def test_finds_every_random_feature_layer_however_nested():
    model, random_layers, deterministic = nested_model()
    callback = RedrawRandomFeatures(every_n_epochs=1, seed=9)
    redraw_once(callback, model)

    found = callback.redrawn_layers
    found_ids = [id(layer) for layer in found]
    assert len(found_ids) == len(set(found_ids)) == 5  # 4 above + the encoder's attention
    assert {id(layer) for layer in random_layers} < set(found_ids)
    assert id(deterministic) not in found_ids
    assert all(isinstance(layer, FavorAttention) for layer in found)
    for index, layer in enumerate(found):
        assert count(layer) == 1
        np.testing.assert_array_equal(projection(layer), expected_projection(9, 1, index))
    assert count(deterministic) == 0

    # The same model code gives the same order (the layer index j is the same in every process).
    model_again, _, _ = nested_model()
    callback_again = RedrawRandomFeatures(every_n_epochs=1, seed=9)
    redraw_once(callback_again, model_again)
    seeds = [layer.seed for layer in callback.redrawn_layers]  # every layer has its own seed
    assert len(set(seeds)) == 5
    assert [layer.seed for layer in callback_again.redrawn_layers] == seeds


def test_given_layers_only():
    model, random_layers, deterministic = nested_model()
    inner_attention, in_list, _, shared = random_layers
    before = projection(in_list)
    layers = [shared, deterministic, inner_attention]
    callback = RedrawRandomFeatures(every_n_epochs=1, layers=layers, seed=2)
    redraw_once(callback, model)
    assert callback.redrawn_layers == [shared, inner_attention]  # the elu layer is skipped
    assert count(shared) == count(inner_attention) == 1
    np.testing.assert_array_equal(projection(shared), expected_projection(2, 1, 0))
    np.testing.assert_array_equal(projection(inner_attention), expected_projection(2, 1, 1))
    assert count(in_list) == 0
    np.testing.assert_array_equal(projection(in_list), before)


def test_warns_when_there_is_nothing_to_redraw():
    model, _ = small_model(feature_map="elu")
    x, y = data(4)
    with pytest.warns(UserWarning, match="no `FavorAttention`"):
        model.fit(x, y, batch_size=2, callbacks=[RedrawRandomFeatures(every_n_steps=1)], verbose=0)


# ------------------------------------------------------------------------------------------------
# Seeds.


def two_layer_model(layer_seeds=(0, 1)):
    inputs = keras.Input((LENGTH, EMBED))
    first, second = (attention(seed=s) for s in layer_seeds)
    hidden = first(inputs, inputs)
    return keras.Model(inputs, second(hidden, hidden)), first, second


def test_layers_get_different_projections_and_seeds_reproduce_them():
    def redrawn(callback_seed, layer_seeds=(0, 1)):
        model, first, second = two_layer_model(layer_seeds)
        redraw_once(RedrawRandomFeatures(every_n_epochs=1, seed=callback_seed), model)
        return projection(first), projection(second)

    first, second = redrawn(8)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, expected_projection(8, 1, 0))
    np.testing.assert_array_equal(second, expected_projection(8, 1, 1))
    assert not np.array_equal(redrawn(9)[0], first)

    # seed=None: derived from the layers' projections, so fixed layer seeds reproduce it and
    # other layer seeds change it.
    unseeded = redrawn(None)
    np.testing.assert_array_equal(redrawn(None)[0], unseeded[0])
    assert not np.array_equal(unseeded[0], first)
    assert not np.array_equal(redrawn(None, layer_seeds=(5, 6))[0], unseeded[0])


# ------------------------------------------------------------------------------------------------
# Logging.


def test_verbose_logs_each_redraw_with_step_and_layer_count(capsys):
    model, _ = small_model()
    x, y = data(8)
    callback = RedrawRandomFeatures(every_n_steps=2, seed=0, verbose=1)
    model.fit(x, y, batch_size=2, epochs=1, callbacks=[callback], verbose=0)
    lines = [
        line for line in capsys.readouterr().out.splitlines() if "RedrawRandomFeatures" in line
    ]
    assert lines == ["RedrawRandomFeatures: after 2 steps: redrew the random features of 1 layer."]

    model, _, _ = two_layer_model()
    redraw_once(RedrawRandomFeatures(every_n_epochs=1, verbose=1), model)
    assert capsys.readouterr().out == (
        "RedrawRandomFeatures: after 1 epoch: redrew the random features of 2 layers.\n"
    )

    redraw_once(RedrawRandomFeatures(every_n_epochs=1), model)
    assert count(model.layers[-1]) == 2
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------------------------------------
# Training.


@pytest.mark.parametrize("every_n_steps", [None, 4])
def test_loss_falls_with_and_without_redraws(every_n_steps):
    model, layer = small_model()
    x, y = data(64, seed=1)
    initial_loss = model.evaluate(x, y, verbose=0)
    callbacks = [] if every_n_steps is None else [RedrawRandomFeatures(every_n_steps, seed=0)]
    model.fit(x, y, batch_size=16, epochs=15, callbacks=callbacks, verbose=0)
    final_loss = model.evaluate(x, y, verbose=0)
    assert final_loss < 0.3 * initial_loss, (initial_loss, final_loss)
    assert count(layer) == (0 if every_n_steps is None else (60 - 1) // every_n_steps)


# ------------------------------------------------------------------------------------------------
# Resuming.


def uninterrupted(steps, every_n_steps, seed):
    model, layer = small_model()
    x, y = data(2 * steps)
    callback = RedrawRandomFeatures(every_n_steps=every_n_steps, seed=seed)
    model.fit(x, y, batch_size=2, epochs=1, shuffle=False, callbacks=[callback], verbose=0)
    return model, layer


def assert_same_training_state(model, layer, reference_model, reference_layer):
    assert iterations(model) == iterations(reference_model)
    assert count(layer) == count(reference_layer)
    np.testing.assert_array_equal(projection(layer), projection(reference_layer))
    for weight, reference in zip(model.weights, reference_model.weights):
        np.testing.assert_allclose(to_numpy(weight), to_numpy(reference), rtol=1e-5, atol=1e-6)


def only_attention(model):
    return next(x for x in model.layers if isinstance(x, FavorAttention))


def test_resume_from_keras_file_continues_schedule_and_projection(tmp_path):
    reference_model, reference_layer = uninterrupted(12, every_n_steps=4, seed=6)
    assert count(reference_layer) == 2  # redraws before steps 4 and 8

    model, layer = small_model()
    x, y = data(24)
    callback = RedrawRandomFeatures(every_n_steps=4, seed=6)
    model.fit(x[:16], y[:16], batch_size=2, shuffle=False, callbacks=[callback], verbose=0)
    assert count(layer) == 1  # what step 7 trained with; step 8's redraw is the next fit's
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)

    restored = keras.saving.load_model(path)
    restored_layer = only_attention(restored)
    assert iterations(restored) == 8 and count(restored_layer) == 1
    callback = RedrawRandomFeatures(every_n_steps=4, seed=6)  # a new process would make a new one
    restored.fit(x[16:], y[16:], batch_size=2, shuffle=False, callbacks=[callback], verbose=0)
    assert_same_training_state(restored, restored_layer, reference_model, reference_layer)


def test_resume_every_n_epochs_from_keras_file_with_initial_epoch(tmp_path):
    x, y = data(6)
    reference_model, reference_layer = small_model()
    callback = RedrawRandomFeatures(every_n_epochs=2, seed=8)
    reference_model.fit(
        x, y, batch_size=2, epochs=5, shuffle=False, callbacks=[callback], verbose=0
    )
    assert count(reference_layer) == 2  # as epochs 3 and 5 (counted from 1) start

    model, layer = small_model()
    callback = RedrawRandomFeatures(every_n_epochs=2, seed=8)
    model.fit(x, y, batch_size=2, epochs=4, shuffle=False, callbacks=[callback], verbose=0)
    assert count(layer) == 1
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)

    restored = keras.saving.load_model(path)
    restored_layer = only_attention(restored)
    callback = RedrawRandomFeatures(every_n_epochs=2, seed=8)
    restored.fit(
        x,
        y,
        batch_size=2,
        epochs=5,
        initial_epoch=4,
        shuffle=False,
        callbacks=[callback],
        verbose=0,
    )
    assert_same_training_state(restored, restored_layer, reference_model, reference_layer)


@pytest.mark.parametrize("checkpoint_first", [True, False])
def test_resume_from_model_checkpoint_catches_up_before_its_first_step(tmp_path, checkpoint_first):
    # The file of step 6 holds what step 5 trained with, whatever the order of the callbacks
    # (the redraw for step 6 comes before step 6); the resumed run redraws before step 6.
    reference_model, reference_layer = uninterrupted(12, every_n_steps=3, seed=1)

    model, _ = small_model()
    x, y = data(24)
    path = os.path.join(tmp_path, "checkpoint.keras")
    callbacks = [
        keras.callbacks.ModelCheckpoint(path, save_freq=6),
        RedrawRandomFeatures(every_n_steps=3, seed=1),
    ]
    if not checkpoint_first:
        callbacks.reverse()
    model.fit(x[:16], y[:16], batch_size=2, shuffle=False, callbacks=callbacks, verbose=0)

    restored = keras.saving.load_model(path)
    restored_layer = only_attention(restored)
    assert iterations(restored) == 6 and count(restored_layer) == 1
    np.testing.assert_array_equal(projection(restored_layer), expected_projection(1, 1, 0))
    callback = RedrawRandomFeatures(every_n_steps=3, seed=1)
    restored.fit(x[12:], y[12:], batch_size=2, shuffle=False, callbacks=[callback], verbose=0)
    assert_same_training_state(restored, restored_layer, reference_model, reference_layer)


@tf_only
def test_resume_from_tf_train_checkpoint(tmp_path):
    import tensorflow as tf

    reference_model, reference_layer = uninterrupted(10, every_n_steps=2, seed=3)

    model, layer = small_model()
    x, y = data(20)
    callback = RedrawRandomFeatures(every_n_steps=2, seed=3)
    model.fit(x[:12], y[:12], batch_size=2, shuffle=False, callbacks=[callback], verbose=0)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(
        os.path.join(tmp_path, "ckpt")
    )

    restored, restored_layer = small_model(layer_seed=99)  # a different projection to overwrite
    restored.optimizer.build(restored.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=restored, optimizer=restored.optimizer)
    checkpoint.read(path).assert_consumed()
    assert iterations(restored) == 6 and count(restored_layer) == 2  # step 6's redraw: not yet
    np.testing.assert_array_equal(projection(restored_layer), projection(layer))
    callback = RedrawRandomFeatures(every_n_steps=2, seed=3)
    restored.fit(x[12:], y[12:], batch_size=2, shuffle=False, callbacks=[callback], verbose=0)
    assert_same_training_state(restored, restored_layer, reference_model, reference_layer)
